"""Fine-tune a sequence classifier on GLUE (or a local CSV/JSON) with any `optim=` name, or LoRA, on the stock Trainer.

One harness for every method, so the baselines are comparable:

* any hf_galore optimizer (`--optim galore_adamw`, `galore_adamw_8bit`, `q_galore_adamw_8bit`, ...), with
  `--rank/--scale/--update_proj_gap/--proj_type` merged into `optim_args`;
* plain full fine-tuning with any transformers optimizer (`--optim adamw_torch`);
* LoRA through PEFT (`--method lora --lora_r 8 --lora_alpha 16 --lora_target_modules query value`), with the
  classifier in `modules_to_save`.

Arguments are `ModelArguments`, `DataArguments` and `TrainingArguments` (see `--help`). `--config file.yaml` supplies
defaults (the command line overrides them); a config may name a `base:` file and hold per-task overrides under
`tasks:`, see `recipes/glue/configs/`. Every evaluation (each epoch with `eval_strategy: epoch`) is recorded, and
`<output_dir>/results.json` gets the best and the final evaluation, the metric path (`evaluate` or `sklearn`) and
the library versions. Launch it with `python` or `accelerate launch --config_file recipes/accelerate_configs/...`.

Example::

    accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml recipes/glue/run_glue.py \\
        --config recipes/glue/configs/galore_r4.yaml --task_name mrpc --seed 1 --output_dir runs/galore_r4/mrpc/1
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import hf_galore  # registers the optim= names; must precede the parser, whose `optim` choices are frozen
except ImportError:  # run from a source checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import hf_galore

import numpy as np
import yaml
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from hf_galore.memory import optimizer_state_bytes

logger = logging.getLogger("run_glue")

#: GLUE task -> its text columns (the second is None for single-sentence tasks).
GLUE_TASKS: dict[str, tuple[str, str | None]] = {
    "cola": ("sentence", None),
    "mnli": ("premise", "hypothesis"),
    "mrpc": ("sentence1", "sentence2"),
    "qnli": ("question", "sentence"),
    "qqp": ("question1", "question2"),
    "rte": ("sentence1", "sentence2"),
    "sst2": ("sentence", None),
    "stsb": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}

#: The metric names `evaluate.load("glue", task)` returns, per task; the sklearn path returns the same keys.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "stsb": ("pearson", "spearmanr"),
    "mrpc": ("accuracy", "f1"),
    "qqp": ("accuracy", "f1"),
}

#: The metric that picks the best epoch and that `sweep.py` tabulates. MRPC uses F1 because that is what the
#: GaLore paper reported for it (maintainer, GaLore#25); QQP's 91-92 in Table 4 is accuracy-sized (F1 is ~88).
PRIMARY_METRIC: dict[str, str] = {"cola": "matthews_correlation", "stsb": "pearson", "mrpc": "f1"}


def normalize_task(name: str | None) -> str | None:
    """`"SST-2"` -> `"sst2"`, `"STS-B"` -> `"stsb"`; None stays None."""
    return None if name is None else name.lower().replace("-", "").replace("_", "")


def task_metric_names(task: str | None, is_regression: bool, num_labels: int) -> tuple[str, ...]:
    """The metric keys computed for `task` (a GLUE name, or None for a local dataset)."""
    if task in GLUE_TASKS:
        return TASK_METRICS.get(task, ("accuracy",))
    if is_regression:
        return ("pearson", "spearmanr")
    return ("accuracy", "f1") if num_labels == 2 else ("accuracy",)


def primary_metric(task: str | None, is_regression: bool, num_labels: int) -> str:
    """The metric that decides the best evaluation (see [`PRIMARY_METRIC`])."""
    if task in PRIMARY_METRIC:
        return PRIMARY_METRIC[task]
    return task_metric_names(task, is_regression, num_labels)[0]


def sklearn_metrics(names: Sequence[str], predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    """The GLUE metrics computed with scikit-learn/scipy, exactly what `evaluate`'s glue metric wraps.

    Args:
        names (`Sequence[str]`): Keys among `accuracy`, `f1` (binary, positive class 1), `matthews_correlation`,
            `pearson`, `spearmanr`.
        predictions (`np.ndarray`): Class ids, or scores for regression.
        references (`np.ndarray`): Gold labels / scores.
    """
    from scipy.stats import pearsonr, spearmanr
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    functions: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
        "accuracy": lambda p, r: accuracy_score(r, p),
        "f1": lambda p, r: f1_score(r, p),
        "matthews_correlation": lambda p, r: matthews_corrcoef(r, p),
        "pearson": lambda p, r: pearsonr(p, r)[0],
        "spearmanr": lambda p, r: spearmanr(p, r)[0],
    }
    unknown = [name for name in names if name not in functions]
    if unknown:
        raise ValueError(f"Unknown metric(s) {unknown}; valid: {sorted(functions)}.")
    return {name: float(functions[name](predictions, references)) for name in names}


def build_metric(
    task: str | None, is_regression: bool, num_labels: int, backend: str = "auto"
) -> tuple[Callable[[np.ndarray, np.ndarray], dict[str, float]], str]:
    """A `(predictions, references) -> metrics` function and the path it uses: `"evaluate"` or `"sklearn"`.

    `evaluate.load("glue", task)` fetches its script from the Hub, so offline it raises; then (or with
    `backend="sklearn"`, or for a non-GLUE dataset) the same metrics come from scikit-learn/scipy.
    """
    if backend not in ("auto", "evaluate", "sklearn"):
        raise ValueError(f"--metric_backend={backend!r} is not valid; choose auto, evaluate or sklearn.")
    names = task_metric_names(task, is_regression, num_labels)
    if backend != "sklearn" and task in GLUE_TASKS:
        try:
            import evaluate

            metric = evaluate.load("glue", task)
            return (lambda p, r: {k: float(v) for k, v in metric.compute(predictions=p, references=r).items()}), (
                "evaluate"
            )
        except Exception as error:
            if backend == "evaluate":
                raise RuntimeError(
                    f'evaluate.load("glue", {task!r}) failed ({error}); use --metric_backend sklearn (or auto).'
                ) from error
            logger.warning("evaluate's glue metric is unavailable (%s); computing it with scikit-learn/scipy.", error)
    return (lambda p, r: sklearn_metrics(names, p, r)), "sklearn"


@dataclass
class ModelArguments:
    """Which model to fine-tune, and how (an `optim=` name on all weights, or LoRA)."""

    model_name_or_path: str = field(
        default="FacebookAI/roberta-base", metadata={"help": "Hub id or local directory (config, weights, tokenizer)."}
    )
    method: str = field(
        default="optim",
        metadata={
            "help": "`optim`: train every weight with --optim (hf_galore names, adamw_torch, ...). "
            "`lora`: wrap the model with PEFT LoRA first (--optim then trains the adapters and modules_to_save).",
            "choices": ["optim", "lora"],
        },
    )
    rank: int | None = field(default=None, metadata={"help": "GaLore-family rank (merged into optim_args)."})
    scale: float | None = field(default=None, metadata={"help": "GaLore-family scale α (merged into optim_args)."})
    update_proj_gap: int | None = field(default=None, metadata={"help": "Steps between subspace refreshes."})
    proj_type: str | None = field(default=None, metadata={"help": "Projection side: std, reverse_std, left, ..."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (with --method lora)."})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA alpha; the update is scaled by alpha / r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules LoRA wraps (default: query value, as Hu et al.)."}
    )
    lora_modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "Fully trained modules next to LoRA (default: classifier)."}
    )


@dataclass
class DataArguments:
    """What to train and evaluate on, and how to score it."""

    task_name: str | None = field(
        default=None, metadata={"help": f"GLUE task ({', '.join(GLUE_TASKS)}); with local files it picks metrics."}
    )
    train_file: str | None = field(default=None, metadata={"help": "Local .csv/.json/.jsonl training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local .csv/.json/.jsonl validation file."})
    text_columns: list[str] | None = field(
        default=None, metadata={"help": "One or two text columns of the local files (default: detected)."}
    )
    label_column: str = field(default="label", metadata={"help": "Label column of the local files."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N validation examples."})
    metric_backend: str = field(
        default="auto",
        metadata={
            "help": "auto: evaluate's glue metric, else scikit-learn/scipy.",
            "choices": ["auto", "evaluate", "sklearn"],
        },
    )
    best_metric: str | None = field(
        default=None, metadata={"help": "Metric that picks the best evaluation (default: the task's primary one)."}
    )


# --------------------------------------------------------------------------------------------- config files


def load_config(path: str | os.PathLike, task: str | None = None) -> dict[str, Any]:
    """Flatten a YAML config: its `base:` file(s) first, then its own keys, then `tasks[task]`.

    Raises:
        ValueError: when the file is not a mapping, or `tasks:` is not a mapping of task names.
    """
    path = Path(path)
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a YAML mapping of argument names to values, got {type(raw).__name__}.")
    values: dict[str, Any] = {}
    base = raw.pop("base", None)
    for base_path in [base] if isinstance(base, str) else base or []:
        values.update(load_config(path.parent / base_path, task))
    tasks = raw.pop("tasks", None) or {}
    if not isinstance(tasks, dict):
        raise ValueError(f"`tasks:` in {path} must map task names to argument overrides.")
    values.update(raw)
    task = normalize_task(task if task is not None else values.get("task_name"))
    for name, overrides in tasks.items():
        if normalize_task(name) == task:
            values.update(overrides or {})
    return values


def _without_option(argv: list[str], option: str) -> list[str]:
    """`argv` minus `option VALUE` / `option=VALUE` (the Trainer's parser does not know `--config`)."""
    kept: list[str] = []
    skip_next = False
    for arg in argv:
        if skip_next:
            skip_next = False
        elif arg == option:
            skip_next = True
        elif not arg.startswith(option + "="):
            kept.append(arg)
    return kept


def parse_args(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    """Parse `argv` (default: `sys.argv[1:]`), with `--config` values as defaults that the command line overrides."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    pre.add_argument("--task_name", default=None)
    known, _ = pre.parse_known_args(argv)
    argv = _without_option(argv, "--config")
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    parser.description = __doc__.split("\n\n")[0]
    if known.config is not None:
        values = load_config(known.config, known.task_name)
        dests = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - dests)
        if unknown:
            hints = {k: difflib.get_close_matches(k, dests, n=1) for k in unknown}
            raise ValueError(
                f"{known.config}: unknown argument(s) {unknown} (closest valid names: {hints}). Keys must be "
                "ModelArguments/DataArguments/TrainingArguments fields; see `run_glue.py --help`."
            )
        # argparse runs `type` over string defaults only, so YAML's "1e-5" (a string to PyYAML) becomes a float
        # and YAML lists (e.g. optim_target_modules) stay lists.
        parser.set_defaults(**values)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args


# --------------------------------------------------------------------------------------------- data


def _load_raw(data_args: DataArguments) -> tuple[Any, str, str]:
    """(DatasetDict, train split name, validation split name)."""
    from datasets import load_dataset

    if data_args.train_file or data_args.validation_file:
        if not (data_args.train_file and data_args.validation_file):
            raise ValueError(
                f"Got --train_file={data_args.train_file!r} and --validation_file={data_args.validation_file!r}: "
                "local data needs both."
            )
        files = {"train": data_args.train_file, "validation": data_args.validation_file}
        extension = Path(data_args.train_file).suffix.lstrip(".").lower()
        builder = {"csv": "csv", "tsv": "csv", "json": "json", "jsonl": "json"}.get(extension)
        if builder is None:
            raise ValueError(f"--train_file={data_args.train_file!r}: the extension must be csv, tsv, json or jsonl.")
        kwargs = {"delimiter": "\t"} if extension == "tsv" else {}
        return load_dataset(builder, data_files=files, **kwargs), "train", "validation"
    if data_args.task_name is None:
        raise ValueError("Pass --task_name (a GLUE task) or --train_file/--validation_file (local data).")
    if data_args.task_name not in GLUE_TASKS:
        raise ValueError(f"--task_name={data_args.task_name!r} is not a GLUE task; choose one of {list(GLUE_TASKS)}.")
    validation = "validation_matched" if data_args.task_name == "mnli" else "validation"
    # "nyu-mll/glue" is where the hub's "glue" id points; naming it directly avoids the redirect.
    return load_dataset("nyu-mll/glue", data_args.task_name), "train", validation


def _text_columns(columns: Sequence[str], data_args: DataArguments) -> tuple[str, str | None]:
    if data_args.text_columns:
        missing = [c for c in data_args.text_columns if c not in columns]
        if missing or len(data_args.text_columns) > 2:
            raise ValueError(
                f"--text_columns={data_args.text_columns} must name one or two of the file's columns {list(columns)}."
            )
        first, *rest = data_args.text_columns
        return first, rest[0] if rest else None
    candidates = ([GLUE_TASKS[data_args.task_name]] if data_args.task_name in GLUE_TASKS else []) + list(
        dict.fromkeys(GLUE_TASKS.values())
    )
    candidates.append(("text", None))
    for first, second in candidates:
        if first in columns and (second is None or second in columns):
            return first, second
    raise ValueError(
        f"Could not detect the text column(s) among {list(columns)}; pass --text_columns (one or two names)."
    )


def prepare_datasets(
    data_args: DataArguments, tokenizer: Any, training_args: TrainingArguments
) -> tuple[Any, Any, Any, bool, list[Any] | None]:
    """Tokenized (train, validation, MNLI-mismatched or None), whether it is regression, and the label list."""
    raw, train_split, eval_split = _load_raw(data_args)
    columns = raw[train_split].column_names
    label_column = data_args.label_column if data_args.label_column in columns else None
    if label_column is None:
        raise ValueError(
            f"--label_column={data_args.label_column!r} is not a column of the data {columns}; pass the right one."
        )
    first, second = _text_columns(columns, data_args)
    feature = raw[train_split].features[label_column]
    if hasattr(feature, "names"):  # a datasets ClassLabel: GLUE from the hub
        is_regression, label_list = False, list(feature.names)
    else:
        train_labels = raw[train_split][label_column]
        is_regression = data_args.task_name == "stsb" or (
            feature.dtype.startswith("float") and any(float(v) != int(v) for v in train_labels)
        )
        label_list = None if is_regression else sorted(set(train_labels))
    label_to_id = None if is_regression or hasattr(feature, "names") else {v: i for i, v in enumerate(label_list)}

    def tokenize(batch: dict[str, list[Any]]) -> dict[str, Any]:
        texts = (batch[first],) if second is None else (batch[first], batch[second])
        encoded = tokenizer(*texts, truncation=True, max_length=data_args.max_seq_length)
        labels = batch[label_column]
        if is_regression:
            encoded["labels"] = [float(v) for v in labels]
        elif label_to_id is not None:
            unseen = sorted({v for v in labels if v not in label_to_id}, key=str)
            if unseen:
                raise ValueError(f"Validation labels {unseen} do not occur in the training labels {label_list}.")
            encoded["labels"] = [label_to_id[v] for v in labels]
        else:
            encoded["labels"] = labels
        return encoded

    def encode(split: str, limit: int | None) -> Any:
        dataset = raw[split]
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        with training_args.main_process_first(desc=f"tokenizing {split}"):
            return dataset.map(tokenize, batched=True, remove_columns=dataset.column_names, desc=f"Tokenizing {split}")

    mismatched = None
    if "validation_mismatched" in raw:
        mismatched = encode("validation_mismatched", data_args.max_eval_samples)
    return (
        encode(train_split, data_args.max_train_samples),
        encode(eval_split, data_args.max_eval_samples),
        mismatched,
        is_regression,
        label_list,
    )


# --------------------------------------------------------------------------------------------- model and optimizer


def apply_method(model: Any, model_args: ModelArguments, training_args: TrainingArguments) -> Any:
    """Wrap `model` with LoRA for `--method lora`; set the hf_galore `optim_args`/targets for hf_galore optimizers."""
    if model_args.method == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules or ["query", "value"],
            modules_to_save=model_args.lora_modules_to_save or ["classifier"],
        )
        model = get_peft_model(model, config)
    optim = str(getattr(training_args.optim, "value", training_args.optim))
    if optim in hf_galore.REGISTRY:
        training_args.optim_args = merged_optim_args(optim, training_args.optim_args, model_args)
        if training_args.optim_target_modules is None:
            logger.info(
                "No optim_target_modules given: using 'all-linear' (every Linear; the classifier head too under the "
                "galore_* names, as in transformers)."
            )
            training_args.optim_target_modules = "all-linear"
    return model


def merged_optim_args(optim: str, optim_args: str | None, model_args: ModelArguments) -> str | None:
    """`optim_args` plus `--rank/--scale/--update_proj_gap/--proj_type`, kept only where `optim` accepts them.

    Raises:
        ValueError: when a key is set both in `--optim_args` and by its own flag, to different values.
    """
    spec = hf_galore.get_spec(optim)
    valid = {f.name for config in spec.config_classes for f in dataclasses.fields(config)}
    values = dict(item.split("=", 1) for item in (optim_args or "").replace(" ", "").split(",") if item)
    for key in ("rank", "scale", "update_proj_gap", "proj_type"):
        flag = getattr(model_args, key)
        if flag is None:
            continue
        if key not in valid:
            logger.warning("--%s=%s is ignored: %s takes no %r (valid: %s).", key, flag, optim, key, sorted(valid))
            continue
        if key in values and values[key] != str(flag):
            raise ValueError(
                f"{key} is set twice: --optim_args has {key}={values[key]} and --{key} {flag}; keep one of them."
            )
        values[key] = str(flag)
    return ", ".join(f"{k}={v}" for k, v in values.items()) or None


# --------------------------------------------------------------------------------------------- metrics history


class EvalHistoryCallback(TrainerCallback):
    """Records every evaluation's metrics with its epoch and step (the best and final epoch come from this)."""

    def __init__(self) -> None:
        self.history: list[dict[str, Any]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs):
        if metrics is not None:
            self.history.append({"epoch": state.epoch, "step": state.global_step, "metrics": dict(metrics)})


def best_and_final(history: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """`{"best": entry with the highest eval_<metric>, "final": the last entry}` (ties: the earliest)."""
    if not history:
        raise ValueError("No evaluation ran; set eval_strategy to epoch or steps.")
    key = metric if metric.startswith("eval_") else f"eval_{metric}"
    if key not in history[-1]["metrics"]:
        raise ValueError(f"--best_metric={metric!r} is not among the eval metrics {sorted(history[-1]['metrics'])}.")
    best = max(history, key=lambda entry: entry["metrics"][key])  # max keeps the first of equal values
    return {"best": best, "final": history[-1]}


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    versions = {"python": sys.version.split()[0]}
    for package in ("torch", "transformers", "accelerate", "peft", "datasets", "evaluate", "hf_galore"):
        with contextlib.suppress(md.PackageNotFoundError):  # optional packages (peft, evaluate) may be absent
            versions[package] = md.version(package)
    return versions


# --------------------------------------------------------------------------------------------- main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Train, evaluate each epoch, write `<output_dir>/results.json`, and return its content."""
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    data_args.task_name = normalize_task(data_args.task_name)
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    train_dataset, eval_dataset, mismatched, is_regression, label_list = prepare_datasets(
        data_args, tokenizer, training_args
    )
    num_labels = 1 if is_regression else len(label_list)
    config = AutoConfig.from_pretrained(
        model_args.model_name_or_path, num_labels=num_labels, finetuning_task=data_args.task_name
    )
    if not is_regression:
        config.label2id = {str(label): i for i, label in enumerate(label_list)}
        config.id2label = {i: str(label) for i, label in enumerate(label_list)}
    model = AutoModelForSequenceClassification.from_pretrained(model_args.model_name_or_path, config=config)
    model = apply_method(model, model_args, training_args)

    metric_fn, metric_path = build_metric(data_args.task_name, is_regression, num_labels, data_args.metric_backend)
    best_metric = data_args.best_metric or primary_metric(data_args.task_name, is_regression, num_labels)

    def compute_metrics(eval_pred: Any) -> dict[str, float]:
        logits, labels = eval_pred
        logits = logits[0] if isinstance(logits, tuple) else logits
        predictions = np.squeeze(logits, axis=-1) if is_regression else np.argmax(logits, axis=-1)
        return metric_fn(predictions, labels)

    history = EvalHistoryCallback()
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_metrics,
        callbacks=[history],
    )
    train_output = trainer.train()
    if not history.history or history.history[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # the final state must be evaluated even when the last step is not an eval step
    summary = best_and_final(history.history, best_metric)
    results: dict[str, Any] = {
        "task": data_args.task_name,
        "data": data_args.train_file or f"glue/{data_args.task_name}",
        "model": model_args.model_name_or_path,
        "method": "lora" if model_args.method == "lora" else str(getattr(training_args.optim, "value", "")),
        "optim": str(getattr(training_args.optim, "value", training_args.optim)),
        "optim_args": training_args.optim_args,
        "seed": training_args.seed,
        "metric_path": metric_path,
        "metric_names": list(task_metric_names(data_args.task_name, is_regression, num_labels)),
        "best_metric": best_metric,
        "best": summary["best"],
        "final": summary["final"],
        "history": history.history,
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "optimizer_state_bytes": optimizer_state_bytes(trainer.optimizer),  # Q-GaLore's INT8 weights excluded
        "train_runtime_s": train_output.metrics.get("train_runtime"),
        "versions": _versions(),
    }
    if mismatched is not None:  # MNLI: the mismatched dev set, once, with the final weights
        results["final_mismatched"] = trainer.evaluate(mismatched, metric_key_prefix="eval_mm")
    if trainer.is_world_process_zero():
        os.makedirs(training_args.output_dir, exist_ok=True)
        path = Path(training_args.output_dir) / "results.json"
        path.write_text(json.dumps(results, indent=2, default=str))
        best, final = summary["best"]["metrics"], summary["final"]["metrics"]
        key = f"eval_{best_metric}"
        logger.info(
            "%s: best %s %.4f (epoch %s), final %.4f (epoch %s), metrics via %s -> %s",
            data_args.task_name or "data",
            best_metric,
            best[key],
            summary["best"]["epoch"],
            final[key],
            summary["final"]["epoch"],
            metric_path,
            path,
        )
    return results


if __name__ == "__main__":
    main()
