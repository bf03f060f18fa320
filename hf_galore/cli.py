"""The `hf-galore` command line.

Commands:

* `hf-galore list [--json]`: every registered `optim=` name with its optimizer class, whether it is layer-wise,
  whether it needs bitsandbytes, and the `optim_args` knobs it accepts (name, type, default, help).
* `hf-galore check-targets MODEL_DIR_OR_CONFIG --targets T [T ...] [--include-heads]`: a dry run of
  `optim_target_modules` resolution on a model built from its `config.json` on the meta device (no weights are
  loaded and no memory is allocated), printing the projected modules with their weight shapes and the skipped ones.
* `hf-galore estimate-memory --model CONFIG --optim NAME [--rank R --batch B --seq S ...] [--json]`: predicted bytes
  of weights, gradients, optimizer states, bases, refresh workspace and (roughly) activations, see `hf_galore.memory`.
* `hf-galore welore analyze|compress|merge`: WeLore's spectrum report and LRC/N-LRC split, factorized compression
  of a local model directory, and merging a factorized checkpoint back to dense.

Each command is one `_add_<command>_parser(subparsers)` function registered in `_COMMANDS`; it sets `func` on its
parser to a handler `(args) -> exit code`. Exit codes: 0 on success, 2 on a usage error or an [`HfGaloreError`]
(the message goes to stderr, without a traceback).

Example:
    ```bash
    hf-galore list
    hf-galore check-targets ./my-llama --targets all-linear
    hf-galore check-targets ./my-roberta/config.json --targets query value
    ```
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import HfGaloreError
from .registry import REGISTRY, OptimizerSpec
from .targeting import ALL_LINEAR, TargetResolution, TargetSpec, resolve_target_modules, summarize_names
from .utils.imports import is_bitsandbytes_available

logger = logging.getLogger(__name__)

#: How to install the optional bitsandbytes dependency of the 8-bit optimizers.
BNB_INSTALL = 'pip install "hf_galore[bnb]"'

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


def optimizer_info(spec: OptimizerSpec) -> dict[str, Any]:
    """JSON-serialisable description of one registered optimizer, as printed by `hf-galore list`.

    Args:
        spec ([`OptimizerSpec`]): The registered optimizer.

    Returns:
        `dict`: `name`, `method`, `optimizer_class`, `layerwise`, `adam_style`, `needs_bitsandbytes`, `install`
        (the pip command of the extra it needs, or `None`), `summary`, and `optim_args`: one
        `{"name", "type", "default", "help", "section"}` dict per accepted `optim_args` key.
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
        "optim_args": knobs,
    }


def format_optimizer_list(infos: Sequence[dict[str, Any]], bnb_available: bool) -> str:
    """Plain-text rendering of [`optimizer_info`] dicts: an overview table, then each optimizer's knobs."""
    lines = ["Registered optimizers (pass the name as TrainingArguments(optim=...)):", ""]
    overview = [
        [
            info["name"],
            info["method"],
            info["optimizer_class"],
            _yes_no(info["layerwise"]),
            _yes_no(info["needs_bitsandbytes"]),
        ]
        for info in infos
    ]
    lines += _format_table(["NAME", "METHOD", "OPTIMIZER", "LAYER-WISE", "BITSANDBYTES"], overview, indent="  ")
    if any(info["needs_bitsandbytes"] for info in infos):
        state = "installed" if bnb_available else "NOT installed"
        lines += ["", f"  BITSANDBYTES=yes needs the bnb extra: {BNB_INSTALL} (bitsandbytes is {state})."]
    for info in infos:
        lines += ["", f"{info['name']}: {info['summary']}"]
        details = [
            f"method={info['method']}",
            f"optimizer={info['optimizer_class']}",
            f"layer-wise={_yes_no(info['layerwise'])}",
            "betas/eps from adam_beta1/adam_beta2/adam_epsilon" if info["adam_style"] else "no betas/eps",
        ]
        lines.append("  " + ", ".join(details))
        if info["install"]:
            lines.append(f"  needs bitsandbytes: {info['install']}")
        lines.append('  optim_args (e.g. optim_args="rank=8, update_proj_gap=200"):')
        rows = [[k["name"], k["type"], str(k["default"]), f"{k['help']} [{k['section']}]"] for k in info["optim_args"]]
        lines += _format_table(["KEY", "TYPE", "DEFAULT", "HELP"], rows, indent="    ")
    return "\n".join(lines)


def _run_list(args: argparse.Namespace) -> int:
    infos = [optimizer_info(spec) for spec in REGISTRY.values()]
    if args.json:
        print(json.dumps(infos, indent=2))
    else:
        print(format_optimizer_list(infos, is_bitsandbytes_available()))
    return 0


def _add_list_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "list",
        help="List the registered optim= names and their optim_args knobs.",
        description="List every optimizer hf_galore registers as a TrainingArguments `optim=` choice, with the "
        "`optim_args` keys it accepts (name, type, default, help).",
    )
    parser.add_argument("--json", action="store_true", help="Print the list as JSON instead of a table.")
    parser.set_defaults(func=_run_list)


# --------------------------------------------------------------------------------------------------------------------
# hf-galore check-targets
# --------------------------------------------------------------------------------------------------------------------


def _config_path(path: str) -> Path:
    """The `config.json` named by `path` (a directory holding one, or the file itself)."""
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / "config.json"
        if not candidate.is_file():
            raise FileNotFoundError(f"{path!r} is a directory without a config.json.")
    elif not candidate.is_file():
        raise FileNotFoundError(f"{path!r} is neither a directory containing config.json nor a config.json file.")
    return candidate


def build_meta_model(path: str) -> Any:
    """Build the model described by a local `config.json` on the meta device: no weights, no memory.

    The class is `config.architectures[0]` looked up in `transformers`, or `AutoModel` (the bare backbone, without
    a task head) when the config names no architecture or one transformers does not have.

    Args:
        path (`str`): A directory containing `config.json`, or the path of a `config.json` file.

    Returns:
        `PreTrainedModel`: The model, with every parameter on the meta device.

    Raises:
        `FileNotFoundError`: when `path` holds no `config.json`.
        `ValueError` or `OSError`: when transformers cannot parse the config.
    """
    import torch
    import transformers

    config_file = _config_path(path)
    # A file path is accepted by `from_pretrained`; a directory must be passed as itself (for sibling files).
    source = str(config_file.parent) if config_file.name == "config.json" else str(config_file)
    config = transformers.AutoConfig.from_pretrained(source)
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    if model_cls is None:
        if architectures:
            logger.warning(
                "transformers %s has no class %r; using AutoModel (the backbone without its task head).",
                transformers.__version__,
                architectures[0],
            )
        else:
            logger.warning("%s names no `architectures`; using AutoModel (no task head).", config_file)
    logger.info("Building %s from %s on the meta device.", getattr(model_cls, "__name__", "AutoModel"), config_file)
    with torch.device("meta"):
        if model_cls is None:
            return transformers.AutoModel.from_config(config)
        if hasattr(model_cls, "_from_config"):
            return model_cls._from_config(config)
        return model_cls.from_config(config)


def _targets_value(values: Sequence[str]) -> TargetSpec:
    """What `TrainingArguments.optim_target_modules` would hold: one value is a string, several a list."""
    return values[0] if len(values) == 1 else list(values)


def _describe_targets(targets: TargetSpec) -> str:
    if isinstance(targets, str) and targets in ALL_LINEAR:
        return f"{targets!r} (every trainable nn.Linear except output heads; galore_* names include them)"
    if isinstance(targets, str):
        return f"{targets!r} (a single value is a regex matched against the whole module name)"
    return f"{targets!r} (a list entry matches a module name exactly, as a substring, or as a regex)"


def format_resolution(
    model: Any,
    config_file: str,
    targets: TargetSpec,
    resolution: TargetResolution,
    heads_left_out: Sequence[tuple[str, tuple[int, ...]]] = (),
) -> str:
    """Plain-text report of a target resolution: projected modules with weight shapes, skipped ones, summary."""
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
    if skipped:
        lines.append(f"Skipped modules ({len(skipped)}):")
        lines += _format_table(["NAME", "REASON"], [[n, r] for n, r in skipped], indent="  ")
    else:
        lines.append("Skipped modules (0): none")
    if heads_left_out:
        lines += ["", f"Output heads left out by all-linear ({len(heads_left_out)}), --include-heads projects them:"]
        rows = [[name, "x".join(str(d) for d in shape)] for name, shape in heads_left_out]
        lines += _format_table(["NAME", "WEIGHT SHAPE"], rows, indent="  ")
    lines += ["", f"Summary: {len(resolution.modules)} weight(s): {summarize_names(resolution.names)}"]
    return "\n".join(lines)


def _run_check_targets(args: argparse.Namespace) -> int:
    try:
        model = build_meta_model(args.model)
    except (OSError, ValueError) as exc:
        print(f"error: cannot build a model from {args.model!r}: {exc}", file=sys.stderr)
        return EXIT_ERROR
    targets = _targets_value(args.targets)
    all_linear = isinstance(targets, str) and targets in ALL_LINEAR
    if args.include_heads and not all_linear:
        logger.warning("--include-heads only changes 'all-linear'; %r is used as given.", targets)
    try:
        resolution = resolve_target_modules(model, targets, include_heads=args.include_heads)
    except HfGaloreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    heads_left_out: list[tuple[str, tuple[int, ...]]] = []
    if all_linear and not args.include_heads:
        projected = set(resolution.names)
        with_heads = resolve_target_modules(model, targets, include_heads=True)
        heads_left_out = [(n, tuple(m.weight.shape)) for n, m in with_heads.modules if n not in projected]
    print(format_resolution(model, str(_config_path(args.model)), targets, resolution, heads_left_out))
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
    parser.add_argument(
        "model",
        metavar="MODEL_DIR_OR_CONFIG",
        help="A local model directory containing config.json, or a config.json.",
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
    parser.set_defaults(func=_run_check_targets)


# --------------------------------------------------------------------------------------------------------------------
# hf-galore welore analyze | compress | merge
# --------------------------------------------------------------------------------------------------------------------


def _load_dense_model(path: str) -> Any:
    """The model of a local directory, with weights, as `config.architectures[0]` (else `AutoModel`)."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    architectures = getattr(config, "architectures", None) or []
    model_cls = getattr(transformers, architectures[0], None) if architectures else None
    return (model_cls or transformers.AutoModel).from_pretrained(path)


def _copy_side_files(src: str, dst: str) -> None:
    """Copy tokenizer and other non-weight files, so the output directory is usable on its own."""
    import shutil

    skip = {"config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}
    for entry in Path(src).iterdir():
        if entry.is_file() and entry.name not in skip and not entry.name.startswith("model-"):
            shutil.copy2(entry, Path(dst) / entry.name)


def _welore_config(args: argparse.Namespace) -> Any:
    from .configs import WeLoreConfig

    return WeLoreConfig(target_compression=args.target_compression, min_reduction=args.min_reduction)


def _run_welore_analyze(args: argparse.Namespace) -> int:
    from . import welore

    plan = welore.analyze(_load_dense_model(args.model), _welore_config(args), _targets_value(args.targets))
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
    from . import welore

    model = _load_dense_model(args.model)
    plan = welore.compress(model, _welore_config(args), _targets_value(args.targets))
    model.save_pretrained(args.out)
    _copy_side_files(args.model, args.out)
    print(plan.summary())
    print(f"Factorized checkpoint written to {args.out}; load it with hf_galore.welore.from_pretrained({args.out!r}).")
    return 0


def _run_welore_merge(args: argparse.Namespace) -> int:
    from . import welore

    model = welore.merge(welore.from_pretrained(args.model))
    model.save_pretrained(args.out)
    _copy_side_files(args.model, args.out)
    print(f"Dense checkpoint written to {args.out}; it loads with plain transformers from_pretrained.")
    return 0


def _welore_handler(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except (HfGaloreError, OSError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    return handler


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
    analyze.set_defaults(func=_welore_handler(_run_welore_analyze))

    compress = commands.add_parser(
        "compress",
        help="Write a factorized (smaller) checkpoint of MODEL_DIR to OUT.",
        description="Compress MODEL_DIR and save it to OUT; the config records the factor ranks.",
    )
    compress.add_argument("model", metavar="MODEL_DIR", help="A local dense model directory.")
    compress.add_argument("out", metavar="OUT", help="Output directory of the factorized checkpoint.")
    add_split_options(compress)
    compress.set_defaults(func=_welore_handler(_run_welore_compress))

    merge = commands.add_parser(
        "merge",
        help="Merge a factorized checkpoint back into a dense one (loadable without hf_galore).",
        description="Load the WeLore checkpoint OUT, replace each factor pair by its product, save to DENSE_OUT.",
    )
    merge.add_argument("model", metavar="OUT", help="A factorized checkpoint written by compress or save_model.")
    merge.add_argument("out", metavar="DENSE_OUT", help="Output directory of the dense checkpoint.")
    merge.set_defaults(func=_welore_handler(_run_welore_merge))


# --------------------------------------------------------------------------------------------------------------------
# hf-galore estimate-memory
# --------------------------------------------------------------------------------------------------------------------


def _run_estimate_memory(args: argparse.Namespace) -> int:
    from .memory import estimate_memory

    try:
        estimate = estimate_memory(
            args.model,
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
        )
    except (OSError, ValueError, HfGaloreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(json.dumps(estimate.to_dict(), indent=2) if args.json else estimate.table())
    return 0


def _add_estimate_memory_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "estimate-memory",
        help="Estimate weights/gradients/optimizer-state/activation memory of one training step (no weights).",
        description="Build the model of --model on the meta device and count, from its parameter shapes and the "
        "optimizer's storage rules, the bytes of weights, gradients, optimizer states, projection bases and the "
        "refresh workspace; activations are a rough transformer formula.",
    )
    parser.add_argument("--model", required=True, metavar="CONFIG_DIR_OR_JSON", help="config.json or its folder.")
    parser.add_argument("--optim", required=True, help="A registered optim= name, or adamw_torch / adamw_8bit.")
    parser.add_argument("--rank", type=int, default=None, help="Projection rank (default: optim_args or 128).")
    parser.add_argument("--batch", type=int, default=1, help="Per-device batch size.")
    parser.add_argument("--seq", type=int, default=512, help="Sequence length.")
    parser.add_argument("--layerwise", action="store_true", help="Use the optimizer's layer-wise form.")
    parser.add_argument("--grad-checkpointing", action="store_true", help="Activations with gradient checkpointing.")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="Micro-steps per step.")
    parser.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="Clipping (TrainingArguments' default 1.0; 0 = off)."
    )
    parser.add_argument("--dtype", choices=["bf16", "fp32", "fp16"], default="fp32", help="Weight/gradient dtype.")
    parser.add_argument("--optim-args", default=None, help='As TrainingArguments.optim_args, e.g. "proj_type=full".')
    parser.add_argument("--targets", nargs="+", default=["all-linear"], metavar="T", help="optim_target_modules.")
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


def build_parser() -> argparse.ArgumentParser:
    """The `hf-galore` argument parser, one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="hf-galore",
        description="GaLore-family optimizers for the Hugging Face Trainer: inspect the registered optimizers and "
        "check which weights optim_target_modules selects.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="Show INFO diagnostics on stderr.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add_command in _COMMANDS:
        add_command(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `hf-galore` command line.

    Args:
        argv (`list[str]`, *optional*): The arguments without the program name; defaults to `sys.argv[1:]`.

    Returns:
        `int`: The exit code: 0 on success, 2 when the command failed (the reason is printed to stderr).
        Usage errors and `--help` exit through argparse's `SystemExit` as usual.
    """
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    if args.verbose:
        logging.getLogger("hf_galore").setLevel(logging.INFO)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
