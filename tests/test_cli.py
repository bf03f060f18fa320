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
from hf_galore.cli import main

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


def test_list_shows_every_optimizer_and_its_knobs(capsys):
    assert main(["list"]) == 0
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
        assert ('pip install "hf_galore[bnb]"' in block) == ("8bit" in name), name

    overview = {line.split()[0]: line.split() for line in out.split("\n\n")[1].splitlines()[1:]}
    assert set(overview) >= EXPECTED_NAMES
    assert overview["galore_adamw_layerwise"][-2:] == ["yes", "no"]
    assert overview["galore_adamw_8bit"][-2:] == ["no", "yes"]
    assert overview["galore_adafactor"][2] == "hf_galore.GaLoreAdafactor"


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
    assert layerwise_8bit["install"] == 'pip install "hf_galore[bnb]"'
    assert {"block_size", "min_8bit_size", "rank"} <= {k["name"] for k in layerwise_8bit["optim_args"]}

    adafactor = {k["name"]: k for k in by_name["galore_adafactor"]["optim_args"]}
    assert adafactor["beta1"]["default"] is None and adafactor["decay_rate"]["default"] == -0.8
    assert by_name["galore_adafactor"]["adam_style"] is False


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


def test_check_targets_regex_reports_skipped_non_linear(roberta_dir, capsys):
    assert main(["check-targets", str(roberta_dir), "--targets", r".*attention\.output\..*"]) == 0
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
