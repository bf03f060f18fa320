"""The GLUE recipe: Table 7 configs, metric selection, and end-to-end runs on a tiny RoBERTa and a 16-row CSV."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_roberta_config
from script_utils import load_script

ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = ROOT / "recipes" / "glue"
CONFIGS = GLUE_DIR / "configs"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "glue_tiny"
TASKS = ("mnli", "sst2", "mrpc", "cola", "qnli", "qqp", "rte", "stsb")

#: GaLore paper, Table 7: learning rate per rank and task.
TABLE7_LR = {
    4: {"mnli": 1e-5, "sst2": 1e-5, "mrpc": 3e-5, "cola": 3e-5, "qnli": 1e-5, "qqp": 1e-5, "rte": 1e-5, "stsb": 1e-5},
    8: {"mnli": 1e-5, "sst2": 2e-5, "mrpc": 2e-5, "cola": 1e-5, "qnli": 1e-5, "qqp": 2e-5, "rte": 2e-5, "stsb": 3e-5},
}
TABLE7_SCALE = {4: 4, 8: 2}


def _load(name: str):
    return load_script(GLUE_DIR / f"{name}.py", f"glue_{name}")


run_glue = _load("run_glue")
sweep = _load("sweep")


# ------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize("rank", [4, 8])
def test_galore_configs_hold_table7(rank):
    for task in TASKS:
        values = run_glue.load_config(CONFIGS / f"galore_r{rank}.yaml", task)
        assert float(values["learning_rate"]) == TABLE7_LR[rank][task], task
        assert values["optim"] == "galore_adamw"
        assert values["rank"] == rank and values["scale"] == TABLE7_SCALE[rank]
        assert values["update_proj_gap"] == 500
        assert values["num_train_epochs"] == 30 and values["max_seq_length"] == 512
        assert values["per_device_train_batch_size"] == (32 if task == "cola" else 16)
        assert values["optim_target_modules"] == [
            "query",
            "key",
            "value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ]


@pytest.mark.parametrize("name", ["full_ft", "lora_r4", "lora_r8"])
def test_baseline_configs_share_the_protocol(name):
    for task in TASKS:
        values = run_glue.load_config(CONFIGS / f"{name}.yaml", task)
        assert values["num_train_epochs"] == 30 and values["max_seq_length"] == 512
        assert values["per_device_train_batch_size"] == (32 if task == "cola" else 16)
    if name.startswith("lora"):
        assert values["method"] == "lora" and values["lora_r"] == int(name[-1])
        assert values["lora_modules_to_save"] == ["classifier"]
    else:
        assert values["optim"] == "adamw_torch"


@pytest.mark.parametrize("name", ["full_ft", "galore_r4", "galore_r8", "lora_r4", "lora_r8"])
def test_configs_parse_into_training_arguments(name, tmp_path):
    model_args, data_args, args = run_glue.parse_args(
        ["--config", str(CONFIGS / f"{name}.yaml"), "--task_name", "cola", "--output_dir", str(tmp_path)]
    )
    assert args.num_train_epochs == 30 and args.per_device_train_batch_size == 32
    assert data_args.max_seq_length == 512 and data_args.task_name == "cola"
    if name == "galore_r4":
        assert args.learning_rate == 3e-5 and model_args.rank == 4
        assert isinstance(args.optim_target_modules, list)
    # The command line overrides the YAML.
    _, _, args = run_glue.parse_args(
        ["--config", str(CONFIGS / f"{name}.yaml"), "--task_name", "cola", "--learning_rate", "7e-4"]
    )
    assert args.learning_rate == 7e-4


def test_unknown_config_key_names_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 1.0e-5\n")
    with pytest.raises(ValueError, match=r"learning_rat.*learning_rate"):
        run_glue.parse_args(["--config", str(bad)])


def test_paper_reference_table():
    assert sweep.PAPER_AVERAGE == {
        "full_ft": 86.28,
        "galore_r4": 85.89,
        "lora_r4": 85.61,
        "galore_r8": 85.94,
        "lora_r8": 85.93,
    }
    for method, row in sweep.PAPER_TABLE4.items():
        assert round(sum(row.values()) / len(row), 2) == pytest.approx(sweep.PAPER_AVERAGE[method], abs=0.011)


# ------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize(
    ("task", "names", "primary"),
    [
        ("cola", ("matthews_correlation",), "matthews_correlation"),
        ("stsb", ("pearson", "spearmanr"), "pearson"),
        ("mrpc", ("accuracy", "f1"), "f1"),
        ("qqp", ("accuracy", "f1"), "accuracy"),
        ("sst2", ("accuracy",), "accuracy"),
        ("mnli", ("accuracy",), "accuracy"),
        ("qnli", ("accuracy",), "accuracy"),
        ("rte", ("accuracy",), "accuracy"),
    ],
)
def test_metric_selection_per_task(task, names, primary):
    regression = task == "stsb"
    num_labels = 1 if regression else (3 if task == "mnli" else 2)
    assert run_glue.task_metric_names(task, regression, num_labels) == names
    assert run_glue.primary_metric(task, regression, num_labels) == primary


def test_metric_selection_for_local_data():
    assert run_glue.task_metric_names(None, False, 2) == ("accuracy", "f1")
    assert run_glue.task_metric_names(None, False, 3) == ("accuracy",)
    assert run_glue.task_metric_names(None, True, 1) == ("pearson", "spearmanr")


def test_sklearn_metric_values_on_hand_made_predictions():
    refs = np.array([1, 1, 0, 0, 1, 0])
    preds = np.array([1, 0, 0, 0, 1, 1])  # TP 2, FN 1, TN 2, FP 1
    compute, path = run_glue.build_metric("mrpc", False, 2, backend="sklearn")
    assert path == "sklearn"
    assert compute(preds, refs) == pytest.approx({"accuracy": 4 / 6, "f1": 2 / 3})
    compute, _ = run_glue.build_metric("cola", False, 2, backend="sklearn")
    assert compute(preds, refs) == pytest.approx({"matthews_correlation": (2 * 2 - 1 * 1) / 9})  # (TP·TN−FP·FN)/…
    compute, _ = run_glue.build_metric("stsb", True, 1, backend="sklearn")
    scores = compute(np.array([1.0, 2.0, 3.0, 5.0]), np.array([2.0, 4.0, 6.0, 7.0]))
    assert scores["spearmanr"] == pytest.approx(1.0)
    assert scores["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 5], [2, 4, 6, 7])[0, 1])
    compute, _ = run_glue.build_metric("rte", False, 2, backend="sklearn")
    assert compute(preds, refs) == {"accuracy": pytest.approx(4 / 6)}


def test_evaluate_backend_falls_back_offline(monkeypatch):
    import evaluate

    def offline(*args, **kwargs):
        raise FileNotFoundError("Couldn't find a module script at glue/glue.py (offline)")

    monkeypatch.setattr(evaluate, "load", offline)
    _, path = run_glue.build_metric("mrpc", False, 2, backend="auto")
    assert path == "sklearn"
    with pytest.raises(RuntimeError, match="--metric_backend sklearn"):
        run_glue.build_metric("mrpc", False, 2, backend="evaluate")


def test_best_and_final():
    history = [{"epoch": e, "step": 2 * e, "metrics": {"eval_f1": v}} for e, v in [(1, 0.5), (2, 0.8), (3, 0.7)]]
    summary = run_glue.best_and_final(history, "f1")
    assert summary["best"]["epoch"] == 2 and summary["final"]["epoch"] == 3
    with pytest.raises(ValueError, match="eval_f1"):
        run_glue.best_and_final(history, "accuracy")


# ------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A tiny RoBERTa classifier and a WordLevel tokenizer over the fixture's words, saved like a hub checkpoint."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, RobertaForSequenceClassification

    path = tmp_path_factory.mktemp("tiny_roberta")
    lines = [line for name in ("train.csv", "dev.csv") for line in (FIXTURE / name).read_text().splitlines()[1:]]
    words = sorted({w for line in lines for w in line.replace(",", " ").split() if not w.isdigit()})
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} | {w: i + 4 for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_input_names=["input_ids", "attention_mask"],
    )
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    RobertaForSequenceClassification(tiny_roberta_config(vocab_size=len(vocab))).save_pretrained(path)
    return path


def _run(model_dir, out, *extra):
    argv = [
        "--model_name_or_path", str(model_dir),
        "--train_file", str(FIXTURE / "train.csv"),
        "--validation_file", str(FIXTURE / "dev.csv"),
        "--task_name", "mrpc",
        "--metric_backend", "sklearn",
        "--max_seq_length", "24",
        "--output_dir", str(out),
        "--per_device_train_batch_size", "8",
        "--max_steps", "4",
        "--eval_strategy", "steps",
        "--eval_steps", "2",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_cpu",
        "--disable_tqdm", "true",
        "--learning_rate", "1e-3",
        "--seed", "0",
        *extra,
    ]  # fmt: skip
    results = run_glue.main(argv)
    on_disk = json.loads((Path(out) / "results.json").read_text())
    assert on_disk["best"] == json.loads(json.dumps(results["best"], default=str))
    return on_disk


@pytest.mark.parametrize(
    ("label", "extra"),
    [
        ("galore_adamw", ["--optim", "galore_adamw", "--rank", "4", "--scale", "2", "--update_proj_gap", "2"]),
        ("adamw_torch", ["--optim", "adamw_torch"]),
        ("lora", ["--method", "lora", "--lora_r", "4", "--lora_alpha", "8", "--optim", "adamw_torch"]),
        ("galore_adafactor_layerwise", ["--optim", "galore_adafactor_layerwise", "--rank", "4"]),
        ("galore_adamw_8bit", ["--optim", "galore_adamw_8bit", "--rank", "4"]),
        ("q_galore_adamw_8bit", ["--optim", "q_galore_adamw_8bit", "--rank", "4", "--update_proj_gap", "2"]),
        ("flora_adamw", ["--optim", "flora_adamw", "--rank", "4", "--optim_args", "kappa=2"]),
        ("welore_adamw", ["--optim", "welore_adamw", "--optim_args", "target_compression=0.3, train_heads=true"]),
    ],
)
def test_run_glue_end_to_end(tiny_model_dir, tmp_path, label, extra):
    results = _run(tiny_model_dir, tmp_path, *extra)
    assert results["metric_path"] == "sklearn" and results["best_metric"] == "f1"
    assert [entry["step"] for entry in results["history"]] == [2, 4]
    assert results["final"]["step"] == 4
    assert results["best"]["metrics"]["eval_f1"] == max(e["metrics"]["eval_f1"] for e in results["history"])
    assert {"eval_accuracy", "eval_f1"} <= set(results["final"]["metrics"])
    assert results["method"] == ("lora" if label == "lora" else label)
    if label not in ("adamw_torch", "lora", "welore_adamw"):
        assert "rank=4" in results["optim_args"]
        assert results["trainable_parameters"] > 0
    assert results["optimizer_state_bytes"] > 0
    if label == "lora":
        assert results["trainable_parameters"] < 10_000  # adapters + classifier only
    assert results["versions"]["transformers"]


def test_run_glue_with_config_file_and_text_columns(tiny_model_dir, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(
        "base: " + str(CONFIGS / "base.yaml") + "\n"
        "optim: galore_adamw\nrank: 2\nupdate_proj_gap: 2\nnum_train_epochs: 2\n"
        "optim_target_modules: [query, value]\n"
        "tasks:\n  mrpc: {learning_rate: 2.0e-3}\n"
    )
    results = _run(
        tiny_model_dir,
        tmp_path / "out",
        "--config", str(config),
        "--text_columns", "sentence1",
        "--eval_strategy", "epoch",
        "--max_steps", "-1",
    )  # fmt: skip
    assert [entry["epoch"] for entry in results["history"]] == [1.0, 2.0]
    assert "rank=2" in results["optim_args"]


# ------------------------------------------------------------------------------------------- sweep


def test_sweep_dry_run_prints_the_commands(capsys, tmp_path):
    code = sweep.main(
        ["--tasks", "mrpc", "cola", "--methods", "galore_r4", "lora_r8", "--seeds", "1", "2", "--output_dir",
         str(tmp_path), "--dry-run"]
    )  # fmt: skip
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "run_glue.py" in line]
    assert len(lines) == 8
    assert any(
        "configs/galore_r4.yaml" in line and "--task_name cola" in line and "--seed 2" in line for line in lines
    )


def test_sweep_summary_medians_best_and_final(tmp_path):
    def write(method, task, seed, best, final):
        path = tmp_path / method / task / f"seed{seed}"
        path.mkdir(parents=True)
        metric = "eval_" + run_glue.primary_metric(task, task == "stsb", 2)
        entries = {
            kind: {"epoch": 1.0, "step": 1, "metrics": {metric: v}} for kind, v in (("best", best), ("final", final))
        }
        path.joinpath("results.json").write_text(
            json.dumps({"task": task, "best_metric": metric[5:], "metric_path": "sklearn", **entries})
        )

    for seed, (best, final) in enumerate([(0.90, 0.80), (0.92, 0.85), (0.95, 0.70)]):
        write("galore_r4", "mrpc", seed, best, final)
        write("galore_r4", "rte", seed, best - 0.1, final - 0.1)
    table = sweep.summarize(tmp_path)
    row = table["methods"]["galore_r4"]
    assert row["mrpc"]["best"] == pytest.approx(92.0) and row["mrpc"]["final"] == pytest.approx(80.0)
    assert row["average"]["best"] == pytest.approx((92.0 + 82.0) / 2)
    markdown = (tmp_path / "results.md").read_text()
    assert "85.89" in markdown and "galore_r4" in markdown
    assert json.loads((tmp_path / "results.json").read_text())["methods"]["galore_r4"]["mrpc"]["seeds"] == 3


# ------------------------------------------------------------------------------------------- PEFT interplay

CLASSIFIER_REGEX = r".*classifier\.modules_to_save\.default\.(dense|out_proj)"


def _lora(model):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]
    )
    return get_peft_model(model, config)


def test_all_linear_on_a_lora_model_per_name_family(tiny_roberta, tmp_path):
    from trainer_utils import classification_dataset, make_trainer, training_args

    from hf_galore.errors import NoTargetModulesError

    # Under hf_galore's own names all-linear leaves the head out, so a LoRA model has nothing to project.
    args = training_args(tmp_path, "flora_adamw", max_steps=2, optim_args="rank=4")
    trainer = make_trainer(_lora(tiny_roberta), args, classification_dataset(16))
    with pytest.raises(NoTargetModulesError, match=r"PEFT model.*modules_to_save.*adamw_torch"):
        trainer.train()
    # Under the galore_* names all-linear is transformers' (heads included): the modules_to_save copies only.
    model = _lora(tiny_roberta)
    import hf_galore

    _, kwargs = hf_galore.optimizer_cls_and_kwargs(training_args(tmp_path, "galore_adamw"), model)
    (low_rank,) = [g for g in kwargs["params"] if g.get("low_rank")]
    head = model.base_model.model.classifier.modules_to_save["default"]
    assert {id(p) for p in low_rank["params"]} == {id(head.dense.weight), id(head.out_proj.weight)}


def test_galore_on_a_lora_model_projects_modules_to_save_only(tiny_roberta, tmp_path):
    from trainer_utils import classification_dataset, make_trainer, training_args

    model = _lora(tiny_roberta)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = training_args(tmp_path, "galore_adamw", optim_target_modules=CLASSIFIER_REGEX, max_steps=3)
    trainer = make_trainer(model, args, classification_dataset(24))
    trainer.train()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = getattr(trainer.optimizer, "optimizer", trainer.optimizer).param_groups  # unwrap accelerate's wrapper
    projected = {names[id(p)] for g in groups if g.get("low_rank") for p in g["params"]}
    plain = {names[id(p)] for g in groups if not g.get("low_rank") for p in g["params"]}
    assert projected == {
        "base_model.model.classifier.modules_to_save.default.dense.weight",
        "base_model.model.classifier.modules_to_save.default.out_proj.weight",
    }
    assert any("lora_A" in n for n in plain) and any("lora_B" in n for n in plain)  # plain inner update
    assert not any("base_layer" in n or "original_module" in n for n in projected | plain)  # frozen: untouched
    changed = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert any("lora_B" in n for n in changed) and any("modules_to_save.default.dense" in n for n in changed)


def test_run_glue_lora_with_a_galore_optimizer(tiny_model_dir, tmp_path):
    results = _run(
        tiny_model_dir,
        tmp_path,
        "--method", "lora",
        "--lora_r", "4",
        "--optim", "galore_adamw",
        "--rank", "2",
        "--optim_target_modules", CLASSIFIER_REGEX,
    )  # fmt: skip
    assert results["method"] == "lora" and results["optim"] == "galore_adamw"
