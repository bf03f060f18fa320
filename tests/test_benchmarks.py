"""The benchmark harness's arithmetic and output (`benchmarks/run.py`); the timings themselves never run in CI."""

from __future__ import annotations

from pathlib import Path

import pytest
from script_utils import load_script

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    return load_script(BENCHMARKS / f"{name}.py")


def _steady(median: float) -> dict:
    return {"method": "m", "median_step_s": median, "first_step_s": 1.0, "optimizer_state_bytes": 2**20,
            "step_times_s": [1.0] + [median] * 5}  # fmt: skip


def test_refresh_time_and_amortized_step_from_the_two_runs():
    run = _load("run")
    # Steps 1..4 of the refresh run: three steady steps and one that also refreshed every basis (+0.8 s).
    refresh = {"step_times_s": [1.0, 0.1, 0.1, 0.1, 0.9, 0.1]}
    summary = run.summarize(_steady(0.1), refresh, gap=4)
    assert summary["refresh_s"] == pytest.approx(0.8)
    assert summary["amortized_step_s"] == pytest.approx(0.1 + 0.8 / 200)
    assert "step_times_s" not in summary
    # Staggered refreshes spread over the window give the same total.
    staggered = {"step_times_s": [1.0, 0.3, 0.3, 0.3, 0.3]}
    assert run.summarize(_steady(0.1), staggered, gap=4)["refresh_s"] == pytest.approx(0.8)
    # No basis: nothing to amortize.
    assert run.summarize(_steady(0.1), None, gap=4)["amortized_step_s"] == 0.1
    failed = run.summarize(_steady(0.1), {"method": "m", "error": "boom"}, gap=4)
    assert failed["refresh_s"] is None and failed["refresh_error"] == "boom"


def test_table_reports_ratios_to_adamw_and_failures():
    run = _load("run")
    results = {
        "adamw": run.summarize(_steady(0.1), None, gap=4),
        "galore_adamw": run.summarize(_steady(0.105), {"step_times_s": [1, 0.105, 0.105, 0.105, 2.105]}, gap=4),
        "q_galore_torch_adamw8bit": {"method": "q_galore_torch_adamw8bit", "error": "KeyError: 'percentile_clipping'"},
    }
    text = run.table("case", results)
    assert "| galore_adamw | 105.0 | 1.05 | 115.0 | 1.15 | 2,000 |" in text
    assert "| q_galore_torch_adamw8bit | failed: KeyError: 'percentile_clipping' |" in text


def test_write_docs_replaces_only_the_marked_block(tmp_path):
    run = _load("run")
    page = tmp_path / "benchmarks.md"
    page.write_text(f"intro\n{run.DOCS_START}\nold\n{run.DOCS_END}\noutro\n")
    run.write_docs("new table", page)
    assert page.read_text() == f"intro\n{run.DOCS_START}\nnew table\n{run.DOCS_END}\noutro\n"
    page.write_text("no markers")
    with pytest.raises(ValueError, match="benchmark-results"):
        run.write_docs("x", page)


def test_the_docs_page_has_the_markers():
    run = _load("run")
    text = (BENCHMARKS.parent / "docs" / "benchmarks.md").read_text()
    assert run.DOCS_START in text and run.DOCS_END in text


def test_every_suite_names_known_models_and_methods():
    run = _load("run")
    import hf_galore

    baselines = _load("baselines")
    for suite, cases in run.SUITES.items():
        for case in cases:
            assert case.model in run.step_time.MODELS, (suite, case.model)
            unknown = [m for m in case.methods if m not in hf_galore.REGISTRY and m not in baselines.PACKAGES]
            assert unknown == [], (suite, unknown)
