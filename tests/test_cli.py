"""Tests of the `hf-galore` command line (`hf_galore.cli`), run in-process through `main([...])`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LLAMA_LINEARS, ROBERTA_ENCODER_LINEARS, tiny_llama_config, tiny_roberta_config

import hf_galore
from hf_galore.cli import example_optim_args, main
from hf_galore.configs import parse_optim_args
from hf_galore.utils.imports import BNB_INSTALL

EXPECTED_NAMES = {
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise",
}

ROBERTA_HEADS = {"classifier.dense", "classifier.out_proj"}


def _section(output: str, title: str) -> dict[str, str]:
    """`{name: second column}` of the table printed under the line starting with `title (N)`; checks N."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title + " ("))
    count = int(lines[start][len(title) + 2 :].split(")")[0])
    rows: dict[str, str] = {}
    for line in lines[start + 2 :]:  # skip the title and the table's header row
        if not line.startswith("  "):
            break
        name, rest = line.strip().split(maxsplit=1)
        rows[name] = rest.strip()
    assert len(rows) == count, f"{title}: header says {count}, table has {len(rows)} rows"
    return rows


def _projected(output: str) -> dict[str, str]:
    return _section(output, "Projected modules")


@pytest.fixture
def roberta_dir(tmp_path: Path) -> Path:
    tiny_roberta_config().save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture
def llama_dir(tmp_path: Path) -> Path:
    tiny_llama_config().save_pretrained(tmp_path)
    return tmp_path


# ---------------------------------------------------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------------------------------------------------


def test_list_all_shows_every_optimizer_and_its_knobs(capsys):
    assert main(["list", "--all"]) == 0
    out = capsys.readouterr().out
    blocks = {}
    for block in out.split("\n\n"):
        head = block.split(":", 1)[0]
        if head in EXPECTED_NAMES:
            blocks[head] = block
    assert set(blocks) == EXPECTED_NAMES

    galore_knobs = {"rank": ["int", "128"], "update_proj_gap": ["int", "200"], "scale": ["float", "0.25"]}
    for name, block in blocks.items():
        rows = {line.split()[0]: line.split() for line in block.splitlines() if line.startswith("    ")}
        for knob, type_and_default in galore_knobs.items():
            assert rows[knob][1:3] == type_and_default, (name, knob)
        assert ("block_size" in rows) == ("8bit" in name), name
        assert ("clip_threshold" in rows) == ("adafactor" in name), name
        assert (BNB_INSTALL in block) == ("8bit" in name), name
        assert ("optimizer=hf_galore.GaLoreAdafactor," in block) == (name == "galore_adafactor"), name


def test_list_json_matches_registry(capsys):
    assert main(["list", "--json"]) == 0
    infos = json.loads(capsys.readouterr().out)
    by_name = {info["name"]: info for info in infos}
    assert EXPECTED_NAMES == {n for n, s in hf_galore.REGISTRY.items() if s.method == "GaLore"} <= set(by_name)
    assert set(by_name) == set(hf_galore.REGISTRY)

    adamw = by_name["galore_adamw"]
    assert adamw["optimizer_class"] == "hf_galore.GaLoreAdamW"
    assert adamw["layerwise"] is False and adamw["needs_bitsandbytes"] is False and adamw["install"] is None
    knobs = {k["name"]: k for k in adamw["optim_args"]}
    assert set(knobs) == {
        f[0] for cls in (hf_galore.GaLoreConfig, hf_galore.MultiTensorConfig) for f in cls.field_docs()
    }
    assert knobs["rank"] == {
        "name": "rank",
        "type": "int",
        "default": 128,
        "help": "Projection rank r.",
        "section": "GaLore projection",
    }
    assert knobs["update_proj_gap"]["default"] == 200

    layerwise_8bit = by_name["galore_adamw_8bit_layerwise"]
    assert layerwise_8bit["layerwise"] is True and layerwise_8bit["needs_bitsandbytes"] is True
    assert layerwise_8bit["install"] == BNB_INSTALL
    assert {"block_size", "min_8bit_size", "rank"} <= {k["name"] for k in layerwise_8bit["optim_args"]}

    adafactor = {k["name"]: k for k in by_name["galore_adafactor"]["optim_args"]}
    assert adafactor["beta1"]["default"] is None and adafactor["decay_rate"]["default"] == -0.8
    assert by_name["galore_adafactor"]["adam_style"] is False


def test_list_default_is_one_row_per_optimizer_with_a_valid_example(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) < len(hf_galore.REGISTRY) + 10  # compact: no per-knob tables
    rows = {line.split()[0]: line.split(None, 4) for line in out.splitlines() if line.startswith("  ")}
    assert set(rows) == set(hf_galore.REGISTRY) | {"NAME"}
    assert rows["galore_adamw_layerwise"][1:4] == ["GaLore", "yes", "no"]
    assert rows["galore_adamw_8bit"][1:4] == ["GaLore", "no", "yes"]
    for name, spec in hf_galore.REGISTRY.items():
        example = example_optim_args(spec)
        assert rows[name][4] == f'optim_args="{example}"'
        parse_optim_args(example, spec.config_classes, name)  # valid by construction, for every method
    assert example_optim_args(hf_galore.REGISTRY["flora_adamw"]) == "rank=128, kappa=1000"
    assert example_optim_args(hf_galore.REGISTRY["welore_adamw"]) == "target_compression=0.5, min_reduction=0.5"
    assert BNB_INSTALL in out and "hf-galore list NAME" in out


def test_list_name_shows_only_that_optimizer(capsys):
    assert main(["list", "flora_adamw"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("flora_adamw: ")
    assert 'optim_args (e.g. optim_args="rank=128, kappa=1000")' in out
    keys = {line.split()[0] for line in out.splitlines() if line.startswith("    ")}
    assert {"rank", "kappa", "accumulation"} <= keys and "update_proj_gap" not in keys
    assert "galore_adamw" not in out


def test_list_unknown_name_is_one_error_line(capsys):
    assert main(["list", "flora_adam"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("hf-galore: error: optim='flora_adam' is not a known optimizer.")
    assert "'flora_adamw'" in captured.err and captured.err.count("\n") == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf-galore {hf_galore.__version__}"


# ---------------------------------------------------------------------------------------------------------------------
# check-targets
# ---------------------------------------------------------------------------------------------------------------------


def test_check_targets_all_linear_excludes_classifier(roberta_dir, capsys):
    assert main(["check-targets", str(roberta_dir), "--targets", "all-linear"]) == 0
    out = capsys.readouterr().out
    projected = _projected(out)
    assert set(projected) == ROBERTA_ENCODER_LINEARS
    assert projected["roberta.encoder.layer.0.intermediate.dense"] == "37x32"
    assert projected["roberta.encoder.layer.1.output.dense"] == "32x37"
    assert projected["roberta.encoder.layer.0.attention.self.query"] == "32x32"
    assert "Skipped modules (0): none" in out
    heads = _section(out, "Output heads left out by all-linear")
    assert heads == {"classifier.dense": "32x32", "classifier.out_proj": "2x32"}
    assert "RobertaForSequenceClassification" in out
    summary = next(line for line in out.splitlines() if line.startswith("Summary:"))
    assert summary.startswith("Summary: 12 weight(s): ")
    assert "roberta.encoder.layer.*.attention.self.query ×2" in summary


def test_check_targets_accepts_config_file(roberta_dir, capsys):
    assert main(["check-targets", str(roberta_dir / "config.json"), "--targets", "all_linear"]) == 0
    assert set(_projected(capsys.readouterr().out)) == ROBERTA_ENCODER_LINEARS


def test_check_targets_include_heads(roberta_dir, capsys):
    assert main(["check-targets", str(roberta_dir), "--targets", "all-linear", "--include-heads"]) == 0
    out = capsys.readouterr().out
    assert set(_projected(out)) == ROBERTA_ENCODER_LINEARS | ROBERTA_HEADS
    assert "Output heads left out" not in out


def test_check_targets_list_of_suffixes(roberta_dir, capsys):
    assert main(["check-targets", str(roberta_dir), "--targets", "query", "value"]) == 0
    out = capsys.readouterr().out
    assert set(_projected(out)) == {
        f"roberta.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "value")
    }
    assert "a list entry matches a module name exactly, as a substring, or as a regex" in out


def test_check_targets_regex(roberta_dir, capsys):
    assert main(["check-targets", str(roberta_dir), "--targets", r".*attention\.self\.(query|key)"]) == 0
    out = capsys.readouterr().out
    assert set(_projected(out)) == {
        f"roberta.encoder.layer.{i}.attention.self.{p}" for i in range(2) for p in ("query", "key")
    }
    assert "Skipped modules (0): none" in out


def test_check_targets_regex_counts_skipped_modules_per_reason(roberta_dir, capsys):
    assert main(["check-targets", str(roberta_dir), "--targets", r".*attention.*"]) == 0
    out = capsys.readouterr().out
    assert len(_projected(out)) == 8
    lines = out.splitlines()
    start = lines.index("Skipped modules (12, matched but not projected; --all-skipped lists each):")
    rows = [line.split(None, 1) for line in lines[start + 2 : start + 7]]
    assert lines[start + 7] == ""  # one row per reason, not a row per module
    # Most frequent first, layer indices folded into `*`.
    assert rows[0] == ["4", rows[0][1]] and rows[0][1].startswith("not an nn.Linear (Dropout)")
    assert "roberta.encoder.layer.*.attention.self.dropout ×2" in rows[0][1]
    reasons = {row[1].split(")")[0] + ")" for row in rows}
    classes = ("Dropout", "RobertaAttention", "RobertaSelfAttention", "RobertaSelfOutput", "LayerNorm")
    assert reasons == {f"not an nn.Linear ({cls})" for cls in classes}


def test_check_targets_all_skipped_lists_each_module(roberta_dir, capsys):
    args = ["check-targets", str(roberta_dir), "--targets", r".*attention\.output\..*", "--all-skipped"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert set(_projected(out)) == {f"roberta.encoder.layer.{i}.attention.output.dense" for i in range(2)}
    skipped = _section(out, "Skipped modules")
    assert set(skipped) == {
        f"roberta.encoder.layer.{i}.attention.output.{m}" for i in range(2) for m in ("LayerNorm", "dropout")
    }
    assert skipped["roberta.encoder.layer.0.attention.output.LayerNorm"] == "not an nn.Linear (LayerNorm)"


def test_check_targets_no_match_exits_2(roberta_dir, capsys):
    assert main(["check-targets", str(roberta_dir), "--targets", "nonexistent"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "'nonexistent'" in captured.err
    assert "roberta.encoder.layer.0.attention.self.query" in captured.err
    assert "Traceback" not in captured.err


def test_check_targets_single_name_is_a_regex(roberta_dir, capsys):
    # As in TrainingArguments: one value is a string, i.e. a regex matched against the whole name.
    assert main(["check-targets", str(roberta_dir), "--targets", "query"]) == 2
    assert "'query'" in capsys.readouterr().err


def test_check_targets_missing_config_exits_2(tmp_path, capsys):
    assert main(["check-targets", str(tmp_path), "--targets", "all-linear"]) == 2
    assert "config.json" in capsys.readouterr().err
    assert main(["check-targets", str(tmp_path / "missing"), "--targets", "all-linear"]) == 2
    assert "missing" in capsys.readouterr().err


def test_check_targets_llama_excludes_lm_head(llama_dir, capsys):
    assert main(["check-targets", str(llama_dir), "--targets", "all-linear"]) == 0
    out = capsys.readouterr().out
    projected = _projected(out)
    assert set(projected) == LLAMA_LINEARS
    assert len(projected) == 14
    assert projected["model.layers.0.self_attn.k_proj"] == "16x32"  # 2 kv heads × head_dim 8
    assert projected["model.layers.1.mlp.down_proj"] == "32x37"
    assert _section(out, "Output heads left out by all-linear") == {"lm_head": "99x32"}


@pytest.fixture
def bert_backbone_dir(tmp_path: Path) -> Path:
    """A config like the demo's all-MiniLM-L6-v2 folder: it names the bare backbone (`BertModel`)."""
    from transformers import BertConfig

    config = BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=40, architectures=["BertModel"])  # fmt: skip
    config.save_pretrained(tmp_path)
    return tmp_path


def test_check_targets_task_builds_the_task_model(bert_backbone_dir, capsys):
    assert main(["check-targets", str(bert_backbone_dir), "--targets", "all-linear"]) == 0
    backbone = _projected(capsys.readouterr().out)
    assert all(name.startswith(("encoder.layer.", "pooler.")) for name in backbone)  # BertModel: no `bert.`, no head

    args = ["check-targets", "--model", str(bert_backbone_dir), "--task", "sequence-classification"]
    assert main([*args, "--targets", "all-linear"]) == 0
    out = capsys.readouterr().out
    assert "Model:   BertForSequenceClassification" in out
    assert set(_projected(out)) == {f"bert.{name}" for name in backbone}
    assert _section(out, "Output heads left out by all-linear") == {"classifier": "2x32"}
    assert main([*args, "--targets", "classifier"]) == 0
    assert _projected(capsys.readouterr().out) == {"classifier": "2x32"}


def test_check_targets_model_given_twice_or_not_at_all_exits_2(roberta_dir, tmp_path, capsys):
    assert main(["check-targets", str(roberta_dir), "--model", str(tmp_path / "other"), "--targets", "x"]) == 2
    assert capsys.readouterr().err.startswith("hf-galore: error: got two models")
    assert main(["check-targets", "--targets", "all-linear"]) == 2
    assert "give the model" in capsys.readouterr().err


def test_check_targets_invalid_regex_is_one_error_line(roberta_dir, capsys):
    assert main(["check-targets", str(roberta_dir), "--targets", "attention.(query"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("hf-galore: error: ") and captured.err.count("\n") == 1
    assert "'attention.(query'" in captured.err


def test_check_targets_requires_targets(roberta_dir):
    with pytest.raises(SystemExit) as info:
        main(["check-targets", str(roberta_dir)])
    assert info.value.code == 2


# ---------------------------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------------------------


def test_module_entry_point_runs():
    repo_root = Path(hf_galore.__file__).resolve().parent.parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "hf_galore.cli", "list"],
        capture_output=True,
        text=True,
        env=env,
        cwd=repo_root,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    for name in EXPECTED_NAMES:
        assert name in result.stdout


def test_estimate_memory_help_shows_defaults_and_what_is_not_modelled(capsys):
    with pytest.raises(SystemExit):
        main(["estimate-memory", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 1)", "(default: 512)", "(default: fp32)", "(default: 1.0", "(default: all-linear)"):
        assert default in out
    assert "WeLore names are estimated on a WeLore checkpoint" in out and "welore analyze" in out
    assert "FLoRA" not in out  # estimated from its own rules
    assert "MODEL_DIR_OR_CONFIG" in out  # the same model form as check-targets


# ---------------------------------------------------------------------------------------------------------------------
# start-up: the console script imports neither torch nor transformers for --help / --version
# ---------------------------------------------------------------------------------------------------------------------

#: What pip / setuptools write for the `hf-galore = hf_galore.cli:main` console script.
LAUNCHER = """import re
import sys
from hf_galore.cli import main
if __name__ == '__main__':
    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])
    sys.exit(main())
"""


def _imported_by_console_script(tmp_path: Path, *args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    """Top-level packages the console script imports (from `-X importtime`), and its result."""
    launcher = tmp_path / "hf-galore"
    launcher.write_text(LAUNCHER)
    repo_root = Path(hf_galore.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(repo_root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-X", "importtime", str(launcher), *args], capture_output=True,
                            text=True, env=env, timeout=300)  # fmt: skip
    modules = {
        line.split("|")[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    return modules, result


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["list", "--help"]])
def test_console_script_help_and_version_import_neither_torch_nor_transformers(tmp_path, args):
    modules, result = _imported_by_console_script(tmp_path, *args)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "hf_galore" in modules  # the measurement sees our imports
    assert not modules & {"torch", "transformers", "peft", "accelerate", "bitsandbytes"}, sorted(modules)


def test_console_script_list_imports_torch_but_not_transformers(tmp_path):
    modules, result = _imported_by_console_script(tmp_path, "list")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "flora_adamw" in result.stdout
    assert "torch" in modules  # the registry holds the optimizer classes
    assert not modules & {"transformers", "peft", "accelerate", "bitsandbytes"}, sorted(modules)


# ---------------------------------------------------------------------------------------------------------------------
# install hints: every command the package prints works from an index and from a clone
# ---------------------------------------------------------------------------------------------------------------------


def test_bitsandbytes_hint_names_commands_that_exist():
    assert "hf_galore[bnb]" not in BNB_INSTALL.replace('-e ".[bnb]"', "")  # no index serves hf_galore
    assert BNB_INSTALL.startswith("pip install bitsandbytes") and 'pip install -e ".[bnb]"' in BNB_INSTALL
    setup_cfg = (Path(hf_galore.__file__).resolve().parent.parent / "setup.cfg").read_text()
    assert "bnb =\n    bitsandbytes" in setup_cfg  # the extra the clone command installs


def test_missing_bitsandbytes_gives_the_install_command(monkeypatch):
    from hf_galore.errors import MissingDependencyError
    from hf_galore.utils import imports

    monkeypatch.setattr(imports, "is_bitsandbytes_available", lambda: False)
    with pytest.raises(MissingDependencyError, match="not installed") as info:
        imports.require_bitsandbytes("optim='galore_adamw_8bit'")
    assert BNB_INSTALL in str(info.value) and "galore_adamw" in str(info.value)


def test_broken_bitsandbytes_gives_our_error_with_the_cause(tmp_path, monkeypatch):
    from hf_galore.errors import MissingDependencyError
    from hf_galore.utils import imports

    fake = tmp_path / "bitsandbytes"
    fake.mkdir()
    (fake / "__init__.py").write_text('raise OSError("libbitsandbytes_cpu.so: cannot open shared object file")\n')
    for name in [m for m in sys.modules if m == "bitsandbytes" or m.startswith("bitsandbytes.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    imports.is_bitsandbytes_available.cache_clear()
    imports.bitsandbytes_import_error.cache_clear()
    try:
        with pytest.raises(MissingDependencyError, match=r"installed .* but fails to import") as info:
            imports.require_bitsandbytes("optim='galore_adamw_8bit'")
    finally:
        imports.is_bitsandbytes_available.cache_clear()
        imports.bitsandbytes_import_error.cache_clear()
        sys.modules.pop("bitsandbytes", None)
    message = str(info.value)
    assert "OSError: libbitsandbytes_cpu.so: cannot open shared object file" in message
    assert "pip install --force-reinstall bitsandbytes" in message and "galore_adamw" in message
