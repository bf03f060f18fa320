"""The `hf-galore` command line.

Commands:

* `hf-galore list [NAME ...] [--all] [--json]`: one line per registered `optim=` name (method, layer-wise,
  bitsandbytes, a valid example `optim_args`); with NAMEs or `--all`, each one's summary, optimizer class and the
  `optim_args` knobs it accepts (name, type, default, help).
* `hf-galore check-targets MODEL_DIR_OR_CONFIG --targets T [T ...] [--task TASK] [--include-heads]`: a dry run of
  `optim_target_modules` resolution on a model built from its `config.json` on the meta device (no weights are
  loaded and no memory is allocated), printing the projected modules with their weight shapes and a summary of the
  matched modules that are not projected.
* `hf-galore estimate-memory MODEL_DIR_OR_CONFIG --optim NAME [--rank R --batch B --seq S ...] [--fsdp2
  --world-size N] [--json]`: predicted bytes of weights, gradients, optimizer states, bases, refresh workspace and
  (roughly) activations, per process under FSDP2 with `--fsdp2`, see `hf_galore.memory`.
* `hf-galore welore analyze|compress|merge`: WeLore's spectrum report and LRC/N-LRC split, factorized compression
  of a local model directory, and merging a factorized checkpoint back to dense.

Each command is one `_add_<command>_parser(subparsers)` function registered in `_COMMANDS`; it sets `func` on its
parser to a handler `(args) -> exit code`. Exit codes: 0 on success, 2 on a usage error or an [`HfGaloreError`]
(one `hf-galore: error: ...` line on stderr, without a traceback; `--verbose` adds the traceback).

Start-up: this module imports only the standard library at import time, and the console script does not register
the optimizers with transformers (see `hf_galore._started_by_console_script`), so `--help` and `--version` never
import torch or transformers; `list` imports torch (the registry holds the optimizer classes), the model commands
import transformers.

Example:
    ```bash
    hf-galore list
    hf-galore list flora_adamw
    hf-galore check-targets ./my-llama --targets all-linear
    hf-galore check-targets ./all-MiniLM-L6-v2 --task sequence-classification --targets ".*attention.*"
    hf-galore check-targets ./my-roberta/config.json --targets query value
    hf-galore estimate-memory ./my-llama --optim galore_adamw_8bit --rank 128 --batch 8 --seq 512 --dtype bf16
    hf-galore estimate-memory ./my-llama --optim galore_adamw --rank 128 --dtype bf16 --fsdp2 --world-size 8
    ```

Both model commands take the model positionally; `--model MODEL_DIR_OR_CONFIG` is accepted as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import HfGaloreError
from .utils.imports import BNB_INSTALL, is_bitsandbytes_available

if TYPE_CHECKING:  # imported inside the commands that need them: they import torch
    from .registry import OptimizerSpec
    from .targeting import TargetResolution, TargetSpec

logger = logging.getLogger(__name__)

#: `--task` values of check-targets -> the transformers auto class that builds the task model.
TASK_AUTO_CLASSES = {
    "base": "AutoModel",
    "causal-lm": "AutoModelForCausalLM",
    "masked-lm": "AutoModelForMaskedLM",
    "seq2seq-lm": "AutoModelForSeq2SeqLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}

#: Exit code of a failed command (same as argparse's usage errors).
EXIT_ERROR = 2


# --------------------------------------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------------------------------------


def _format_table(headers: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Left-aligned plain-text table; the last column is not padded."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row)]

    def line(cells: Sequence[str]) -> str:
        padded = [cell.ljust(w) for cell, w in zip(cells[:-1], widths[:-1])]
        return (indent + "  ".join([*padded, cells[-1]])).rstrip()

    return [line(headers)] + [line(row) for row in rows]


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _qualified_name(cls: type) -> str:
    """`hf_galore.GaLoreAdamW` when the class is exported at the package top level, else its module path."""
    import hf_galore

    if getattr(hf_galore, cls.__name__, None) is cls:
        return f"hf_galore.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


# --------------------------------------------------------------------------------------------------------------------
# hf-galore list
# --------------------------------------------------------------------------------------------------------------------


def example_optim_args(spec: OptimizerSpec) -> str:
    """A valid `optim_args` string for `spec`: the first two keys of its first config, at their defaults.

    Derived from the config dataclass, so it is valid by construction for every method (GaLore's `rank=128,
    update_proj_gap=200`, FLoRA's `rank=128, kappa=1000`, WeLore's `target_compression=0.5, min_reduction=0.5`).
    """
    fields = [(name, default) for name, _, default, _ in spec.config_classes[0].field_docs() if default is not None]
    return ", ".join(f"{name}={default}" for name, default in fields[:2])


def optimizer_info(spec: OptimizerSpec) -> dict[str, Any]:
    """JSON-serialisable description of one registered optimizer, as printed by `hf-galore list`.

    Args:
        spec ([`OptimizerSpec`]): The registered optimizer.

    Returns:
        `dict`: `name`, `method`, `optimizer_class`, `layerwise`, `adam_style`, `needs_bitsandbytes`, `install`
        (the pip command of the dependency it needs, or `None`), `summary`, `example_optim_args` (a valid
        `optim_args` string) and `optim_args`: one `{"name", "type", "default", "help", "section"}` dict per
        accepted `optim_args` key.
    """
    knobs = []
    for config_cls in spec.config_classes:
        section = getattr(config_cls, "section", "") or config_cls.__name__
        for name, type_name, default, help_text in config_cls.field_docs():
            knobs.append({"name": name, "type": type_name, "default": default, "help": help_text, "section": section})
    return {
        "name": spec.name,
        "method": spec.method,
        "optimizer_class": _qualified_name(spec.optimizer_cls),
        "layerwise": spec.layerwise,
        "adam_style": spec.adam_style,
        "needs_bitsandbytes": spec.needs_bitsandbytes,
        "install": BNB_INSTALL if spec.needs_bitsandbytes else None,
        "summary": spec.summary,
        "example_optim_args": example_optim_args(spec),
        "optim_args": knobs,
    }


def _bnb_note(infos: Sequence[dict[str, Any]], bnb_available: bool) -> list[str]:
    if not any(info["needs_bitsandbytes"] for info in infos):
        return []
    state = "installed" if bnb_available else "NOT installed"
    return ["", f"BITSANDBYTES=yes needs bitsandbytes ({state}): {BNB_INSTALL}"]


def format_optimizer_list(infos: Sequence[dict[str, Any]], bnb_available: bool) -> str:
    """The compact overview printed by `hf-galore list`: one row per optimizer, with a valid `optim_args`."""
    lines = ["Registered optimizers (pass the name as TrainingArguments(optim=...)):", ""]
    overview = [
        [
            info["name"],
            info["method"],
            _yes_no(info["layerwise"]),
            _yes_no(info["needs_bitsandbytes"]),
            f'optim_args="{info["example_optim_args"]}"',
        ]
        for info in infos
    ]
    lines += _format_table(["NAME", "METHOD", "LAYER-WISE", "BITSANDBYTES", "EXAMPLE"], overview, indent="  ")
    lines += _bnb_note(infos, bnb_available)
    lines += ["", "Every optim_args key of one optimizer: hf-galore list NAME (all of them: --all, or --json)."]
    return "\n".join(lines)


def format_optimizer_details(infos: Sequence[dict[str, Any]], bnb_available: bool) -> str:
    """Each optimizer's summary, class and `optim_args` knobs, as printed by `hf-galore list NAME` / `--all`."""
    lines: list[str] = []
    for info in infos:
        if lines:
            lines.append("")
        lines.append(f"{info['name']}: {info['summary']}")
        details = [
            f"method={info['method']}",
            f"optimizer={info['optimizer_class']}",
            f"layer-wise={_yes_no(info['layerwise'])}",
            "betas/eps from adam_beta1/adam_beta2/adam_epsilon" if info["adam_style"] else "no betas/eps",
        ]
        lines.append("  " + ", ".join(details))
        if info["install"]:
            state = "installed" if bnb_available else "NOT installed"
            lines.append(f"  needs bitsandbytes ({state}): {info['install']}")
        lines.append(f'  optim_args (e.g. optim_args="{info["example_optim_args"]}"):')
        rows = [[k["name"], k["type"], str(k["default"]), f"{k['help']} [{k['section']}]"] for k in info["optim_args"]]
        lines += _format_table(["KEY", "TYPE", "DEFAULT", "HELP"], rows, indent="    ")
    return "\n".join(lines)


def _run_list(args: argparse.Namespace) -> int:
    from . import methods  # noqa: F401 - registers every method's optim= names
    from .registry import REGISTRY, get_spec

    specs = [get_spec(name) for name in args.names] if args.names else list(REGISTRY.values())
    infos = [optimizer_info(spec) for spec in specs]
    if args.json:
        print(json.dumps(infos, indent=2))
    elif args.names or args.all:
        print(format_optimizer_details(infos, is_bitsandbytes_available()))
    else:
        print(format_optimizer_list(infos, is_bitsandbytes_available()))
    return 0


def _add_list_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "list",
        help="List the registered optim= names; with NAME, its optim_args knobs.",
        description="List every optimizer hf_galore registers as a TrainingArguments `optim=` choice with a valid "
        "example `optim_args`; with NAME (or --all), also its summary, optimizer class and every `optim_args` key "
        "it accepts (name, type, default, help).",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="Show these optimizers in full (e.g. flora_adamw).")
    parser.add_argument("--all", action="store_true", help="Show every optimizer in full.")
    parser.add_argument("--json", action="store_true", help="Print the full description as JSON.")
    parser.set_defaults(func=_run_list)


# --------------------------------------------------------------------------------------------------------------------
# hf-galore check-targets
# --------------------------------------------------------------------------------------------------------------------


def build_meta_model(path: str, task: str | None = None) -> Any:
    """Build the model described by a local `config.json` on the meta device: no weights, no memory.

    [`hf_galore.loading.build_meta_model`] with the auto class of `task` (a key of `TASK_AUTO_CLASSES`, e.g.
    `"sequence-classification"`: `AutoModelForSequenceClassification`, which names the weights as the fine-tuned
    task model does), or `config.architectures[0]` when no task is given.
    """
    from .loading import build_meta_model as build

    return build(path, TASK_AUTO_CLASSES[task] if task is not None else None)


def _targets_value(values: Sequence[str]) -> TargetSpec:
    """What `TrainingArguments.optim_target_modules` would hold: one value is a string, several a list."""
    return values[0] if len(values) == 1 else list(values)


def _describe_targets(targets: TargetSpec) -> str:
    from .targeting import ALL_LINEAR

    if isinstance(targets, str) and targets in ALL_LINEAR:
        return f"{targets!r} (every trainable nn.Linear except output heads; galore_* names include them)"
    if isinstance(targets, str):
        return f"{targets!r} (a single value is a regex matched against the whole module name)"
    return f"{targets!r} (a list entry matches a module name exactly, as a substring, or as a regex)"


def format_skipped(skipped: Sequence[tuple[str, str]], examples: int = 3) -> list[str]:
    """Matched-but-not-projected modules as one line per reason: its count and a few names, layer indices folded.

    A regex such as `.*attention.*` also matches every dropout and LayerNorm under it; listing each one would bury
    the few that matter (a frozen or quantized Linear), so they are counted per reason instead.
    """
    from .targeting import summarize_names

    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped:
        by_reason.setdefault(reason, []).append(name)
    rows = []
    for reason, names in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        patterns = summarize_names(names).split(", ")
        shown = ", ".join(patterns[:examples]) + (", ..." if len(patterns) > examples else "")
        rows.append([str(len(names)), reason, shown])
    return _format_table(["COUNT", "REASON", "E.G."], rows, indent="  ")


def format_resolution(
    model: Any,
    config_file: str,
    targets: TargetSpec,
    resolution: TargetResolution,
    heads_left_out: Sequence[tuple[str, tuple[int, ...]]] = (),
    all_skipped: bool = False,
) -> str:
    """Plain-text report of a target resolution: projected modules with weight shapes, skipped ones, summary.

    The skipped modules are summarised per reason (see [`format_skipped`]), or listed one by one with
    `all_skipped=True`.
    """
    from .targeting import summarize_names

    lines = [
        f"Model:   {type(model).__name__} (meta device, no weights loaded)",
        f"Config:  {config_file}",
        f"Targets: {_describe_targets(targets)}",
        "",
        f"Projected modules ({len(resolution.modules)}):",
    ]
    rows = [[name, "x".join(str(d) for d in module.weight.shape)] for name, module in resolution.modules]
    lines += _format_table(["NAME", "WEIGHT SHAPE"], rows, indent="  ")
    lines.append("")
    skipped = resolution.skipped + resolution.ignored  # ignored: non-Linear modules a regex matched (not logged)
    if skipped and all_skipped:
        lines.append(f"Skipped modules ({len(skipped)}):")
        lines += _format_table(["NAME", "REASON"], [[n, r] for n, r in skipped], indent="  ")
    elif skipped:
        lines.append(f"Skipped modules ({len(skipped)}, matched but not projected; --all-skipped lists each):")
        lines += format_skipped(skipped)
    else:
        lines.append("Skipped modules (0): none")
    if heads_left_out:
        lines += ["", f"Output heads left out by all-linear ({len(heads_left_out)}), --include-heads projects them:"]
        rows = [[name, "x".join(str(d) for d in shape)] for name, shape in heads_left_out]
        lines += _format_table(["NAME", "WEIGHT SHAPE"], rows, indent="  ")
    lines += ["", f"Summary: {len(resolution.modules)} weight(s): {summarize_names(resolution.names)}"]
    return "\n".join(lines)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model of a model command: positional `MODEL_DIR_OR_CONFIG`, or `--model` (the same, kept for scripts).

    Every model command takes the same form; read it back with [`_model_argument`].
    """
    parser.add_argument(
        "model",
        nargs="?",
        metavar="MODEL_DIR_OR_CONFIG",
        help="A local model directory containing config.json, or a config.json.",
    )
    parser.add_argument("--model", dest="model_option", metavar="MODEL_DIR_OR_CONFIG", help="The same, as an option.")


def _model_argument(args: argparse.Namespace) -> str:
    """The model path of a model command, given as the positional argument or as --model (not both)."""
    if args.model and args.model_option and args.model != args.model_option:
        raise CommandError(f"got two models, {args.model!r} and --model {args.model_option!r}; give one.")
    model = args.model or args.model_option
    if not model:
        raise CommandError(f"give the model: hf-galore {args.command} MODEL_DIR_OR_CONFIG (or --model ...).")
    return model


def _run_check_targets(args: argparse.Namespace) -> int:
    from .targeting import ALL_LINEAR, resolve_target_modules

    path = _model_argument(args)
    try:
        model = build_meta_model(path, args.task)
    except (OSError, ValueError) as exc:
        hint = "" if args.task else " If the config names no task model, pick one with --task."
        raise CommandError(f"cannot build a model from {path!r}: {exc}{hint}") from exc
    targets = _targets_value(args.targets)
    all_linear = isinstance(targets, str) and targets in ALL_LINEAR
    if args.include_heads and not all_linear:
        logger.warning("--include-heads only changes 'all-linear'; %r is used as given.", targets)
    resolution = resolve_target_modules(model, targets, include_heads=args.include_heads)
    heads_left_out: list[tuple[str, tuple[int, ...]]] = []
    if all_linear and not args.include_heads:
        projected = set(resolution.names)
        with_heads = resolve_target_modules(model, targets, include_heads=True)
        heads_left_out = [(n, tuple(m.weight.shape)) for n, m in with_heads.modules if n not in projected]
    from .loading import config_path

    config_file = str(config_path(path))
    print(format_resolution(model, config_file, targets, resolution, heads_left_out, args.all_skipped))
    return 0


def _add_check_targets_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-targets",
        help="Dry-run optim_target_modules resolution on a model built from its config (no weights).",
        description="Build the model of MODEL_DIR_OR_CONFIG on the meta device (nothing is downloaded, loaded or "
        "allocated) and show which weights `optim_target_modules` would project. One --targets value is passed as "
        'a string (a regex matched against the whole module name, or "all-linear"); several are passed as a list '
        "(each entry matches a name exactly, as a substring, or as a regex), exactly as in TrainingArguments.",
    )
    _add_model_arguments(parser)
    parser.add_argument(
        "--task",
        choices=sorted(TASK_AUTO_CLASSES),
        default=None,
        help="Build the task model with its transformers auto class (e.g. sequence-classification: "
        "AutoModelForSequenceClassification, whose weights are named bert.encoder.* with a classifier head) "
        "instead of config.architectures[0] (default; AutoModel, the bare backbone, when the config names none).",
    )
    parser.add_argument(
        "--targets",
        nargs="+",
        required=True,
        metavar="T",
        help='"all-linear", one regex, or several module names/substrings/regexes (e.g. --targets q_proj v_proj).',
    )
    parser.add_argument(
        "--include-heads",
        action="store_true",
        help="With all-linear, also project output heads / task classifiers (lm_head, classifier.*, score, ...), "
        "as optim=galore_* does (transformers' all-linear).",
    )
    parser.add_argument(
        "--all-skipped",
        action="store_true",
        help="List every matched-but-skipped module instead of counting them per reason.",
    )
    parser.set_defaults(func=_run_check_targets)


# --------------------------------------------------------------------------------------------------------------------
# hf-galore welore analyze | compress | merge
# --------------------------------------------------------------------------------------------------------------------


def _copy_side_files(src: str, dst: str) -> None:
    """Copy tokenizer and other non-weight files, so the output directory is usable on its own."""
    import shutil

    skip = {"config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}
    for entry in Path(src).iterdir():
        if entry.is_file() and entry.name not in skip and not entry.name.startswith("model-"):
            shutil.copy2(entry, Path(dst) / entry.name)


def _welore_config(args: argparse.Namespace) -> Any:
    from .methods.welore import WeLoreConfig

    return WeLoreConfig(target_compression=args.target_compression, min_reduction=args.min_reduction)


def _run_welore_analyze(args: argparse.Namespace) -> int:
    from .loading import load_dense_model
    from .methods import welore

    plan = welore.analyze(load_dense_model(args.model), _welore_config(args), _targets_value(args.targets))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    rows = [
        [
            m.name,
            "x".join(str(d) for d in m.shape),
            f"{m.stable_rank:.1f}",
            f"{m.kept_rank}/{m.full_rank}",
            f"{m.reduction:.1%}",
            "LRC" if m.lrc else "N-LRC",
            f"{m.dense_params:,} -> {m.params_after:,}",
        ]
        for m in plan.matrices
    ]
    headers = ["NAME", "SHAPE", "STABLE RANK", "KEPT RANK", "REDUCTION", "SPLIT", "PARAMETERS"]
    print("\n".join([*_format_table(headers, rows), "", plan.summary()]))
    return 0


def _run_welore_compress(args: argparse.Namespace) -> int:
    from .loading import load_dense_model
    from .methods import welore

    model = load_dense_model(args.model)
    plan = welore.compress(model, _welore_config(args), _targets_value(args.targets))
    model.save_pretrained(args.out)
    _copy_side_files(args.model, args.out)
    print(plan.summary())
    print(f"Factorized checkpoint written to {args.out}; load it with hf_galore.welore.from_pretrained({args.out!r}).")
    return 0


def _run_welore_merge(args: argparse.Namespace) -> int:
    from .methods import welore

    model = welore.merge(welore.from_pretrained(args.model))
    model.save_pretrained(args.out)
    _copy_side_files(args.model, args.out)
    print(f"Dense checkpoint written to {args.out}; it loads with plain transformers from_pretrained.")
    return 0


def _add_welore_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "welore",
        help="WeLore: analyze weight spectra, compress a model to low-rank factors, merge them back.",
        description="WeLore one-shot compression (arXiv:2407.11239): one global threshold on min-max normalised "
        "singular values, solved to remove --target-compression of the targeted weights' parameters.",
    )
    commands = parser.add_subparsers(dest="welore_command", metavar="SUBCOMMAND", required=True)

    def add_split_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--target-compression", type=float, default=0.5, help="Fraction of parameters to remove.")
        sub.add_argument(
            "--min-reduction", type=float, default=0.5, help="Rank reduction above which a weight is LRC."
        )
        sub.add_argument("--targets", nargs="+", default=["all-linear"], metavar="T", help="As optim_target_modules.")

    analyze = commands.add_parser(
        "analyze",
        help="Per-matrix spectrum summary, the LRC/N-LRC split, parameter and memory savings.",
        description="Load MODEL_DIR and report, without changing it, the split WeLore would make.",
    )
    analyze.add_argument("model", metavar="MODEL_DIR", help="A local model directory (config.json + weights).")
    add_split_options(analyze)
    analyze.add_argument("--json", action="store_true", help="Print the full report as JSON.")
    analyze.set_defaults(func=_run_welore_analyze)

    compress = commands.add_parser(
        "compress",
        help="Write a factorized (smaller) checkpoint of MODEL_DIR to OUT.",
        description="Compress MODEL_DIR and save it to OUT; the config records the factor ranks.",
    )
    compress.add_argument("model", metavar="MODEL_DIR", help="A local dense model directory.")
    compress.add_argument("out", metavar="OUT", help="Output directory of the factorized checkpoint.")
    add_split_options(compress)
    compress.set_defaults(func=_run_welore_compress)

    merge = commands.add_parser(
        "merge",
        help="Merge a factorized checkpoint back into a dense one (loadable without hf_galore).",
        description="Load the WeLore checkpoint OUT, replace each factor pair by its product, save to DENSE_OUT.",
    )
    merge.add_argument("model", metavar="OUT", help="A factorized checkpoint written by compress or save_model.")
    merge.add_argument("out", metavar="DENSE_OUT", help="Output directory of the dense checkpoint.")
    merge.set_defaults(func=_run_welore_merge)


# --------------------------------------------------------------------------------------------------------------------
# hf-galore estimate-memory
# --------------------------------------------------------------------------------------------------------------------


def _run_estimate_memory(args: argparse.Namespace) -> int:
    from .memory import estimate_memory

    estimate = estimate_memory(
        _model_argument(args),
        args.optim,
        rank=args.rank,
        batch=args.batch,
        seq=args.seq,
        layerwise=True if args.layerwise else None,
        grad_checkpointing=args.grad_checkpointing,
        dtype=args.dtype,
        optim_args=args.optim_args,
        target_modules=_targets_value(args.targets),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        world_size=args.world_size,
        fsdp2=args.fsdp2,
    )
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.table())
    return 0


def _add_estimate_memory_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "estimate-memory",
        help="Estimate weights/gradients/optimizer-state/activation memory of one training step (no weights).",
        description="Build the model of MODEL_DIR_OR_CONFIG on the meta device and count, from its parameter shapes "
        "and the optimizer's own storage rules, the bytes of weights, gradients, optimizer states, projection bases "
        "and the refresh workspace; activations are a rough transformer formula.",
        epilog="The WeLore names are estimated on a WeLore checkpoint (the folder `hf-galore welore compress` or "
        "Trainer.save_model writes: its config records the split); a dense model is not modelled for them (the "
        "LRC/N-LRC split needs the weights' singular values; run `hf-galore welore analyze MODEL_DIR`, which reports "
        "WeLore's parameters and memory), and asking exits with an error saying so.",
    )
    _add_model_arguments(parser)
    parser.add_argument("--optim", required=True, help="A registered optim= name, or adamw_torch / adamw_8bit.")
    parser.add_argument(
        "--rank", type=int, default=None, help="Projection rank (default: the optim_args rank, else 128)."
    )
    parser.add_argument("--batch", type=int, default=1, help="Per-device batch size (default: 1).")
    parser.add_argument("--seq", type=int, default=512, help="Sequence length (default: 512).")
    parser.add_argument(
        "--layerwise", action="store_true", help="Use the optimizer's layer-wise form (default: as --optim names it)."
    )
    parser.add_argument(
        "--grad-checkpointing", action="store_true", help="Activations with gradient checkpointing (default: off)."
    )
    parser.add_argument(
        "--gradient-accumulation-steps", type=int, default=1, help="Micro-steps per step (default: 1)."
    )
    parser.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="Clipping norm, 0 = off (default: 1.0, as TrainingArguments)."
    )
    parser.add_argument(
        "--dtype", choices=["bf16", "fp32", "fp16"], default="fp32", help="Weight/gradient dtype (default: fp32)."
    )
    parser.add_argument(
        "--optim-args", default=None, help='As TrainingArguments.optim_args, e.g. "proj_type=full" (default: none).'
    )
    parser.add_argument(
        "--targets", nargs="+", default=["all-linear"], metavar="T", help="optim_target_modules (default: all-linear)."
    )
    parser.add_argument(
        "--fsdp2",
        action="store_true",
        help="Bytes of one process under FSDP2 (fully_shard): rows of every weight, gradient and row-wise state, "
        "replicated bases whole; process 0's (the largest) plus every process' state bytes (default: off).",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="Processes sharding the model, with --fsdp2 (default: 1). Without --fsdp2 every process holds the "
        "one-process bytes (DDP), so a larger value is refused.",
    )
    parser.add_argument("--json", action="store_true", help="Print the estimate as JSON instead of a table.")
    parser.set_defaults(func=_run_estimate_memory)


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------

#: One `_add_<command>_parser(subparsers)` per command, in `--help` order.
_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _add_list_parser,
    _add_check_targets_parser,
    _add_welore_parser,
    _add_estimate_memory_parser,
)


class CommandError(HfGaloreError, ValueError):
    """A command-line value that cannot work (e.g. two different models); printed as one line, exit code 2."""


#: Errors printed as one `hf-galore: error: ...` line (exit code 2) instead of a traceback: ours, a missing or
#: unreadable file, a value transformers cannot parse (a config.json), an invalid regex.
_USER_ERRORS = (HfGaloreError, OSError, ValueError, re.error)


def build_parser() -> argparse.ArgumentParser:
    """The `hf-galore` argument parser, one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="hf-galore",
        description="GaLore-family optimizers for the Hugging Face Trainer: inspect the registered optimizers, "
        "check which weights optim_target_modules selects, estimate memory, run WeLore's compression.",
    )
    parser.add_argument("--version", action="version", version=f"hf-galore {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="Show INFO diagnostics, and the traceback of an error, on stderr."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `hf-galore` command line.

    Args:
        argv (`list[str]`, *optional*): The arguments without the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: The exit code: 0 on success, 2 when the command failed (one `hf-galore: error: ...` line on stderr,
        the traceback too with `--verbose`). Usage errors, `--help` and `--version` exit through argparse's
        `SystemExit` as usual.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("hf_galore").setLevel(logging.INFO)
    try:
        return args.func(args)
    except _USER_ERRORS as exc:
        if args.verbose:
            logger.exception("%s failed:", args.command)
        message = " ".join(str(exc).split())  # one line, whatever the message's own line breaks
        if isinstance(exc, re.error):  # raised by a --targets regex (before targeting wraps it in our own error)
            message = f"invalid regular expression {exc.pattern!r}: {message}"
        print(f"hf-galore: error: {message}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
