"""Run the GLUE recipe over tasks × methods × seeds and tabulate it next to the GaLore paper's Table 4.

Each run is a subprocess of `run_glue.py --config configs/<method>.yaml --task_name <task> --seed <seed>` writing
`<output_dir>/<method>/<task>/seed<seed>/results.json`. The summary (`results.md` and `results.json` in
`<output_dir>`) gives, per method and task, the median over seeds of the best epoch and of the final epoch, in
percent, on the task's primary metric (CoLA MCC, STS-B Pearson, MRPC F1, accuracy elsewhere), and the average over
tasks, with the paper's numbers alongside. Examples::

    python recipes/glue/sweep.py --dry-run                                    # print the 8 × 5 × 3 commands
    python recipes/glue/sweep.py --tasks mrpc rte --methods galore_r4 lora_r4 --seeds 1 2 3
    python recipes/glue/sweep.py --launcher "accelerate launch --config_file recipes/accelerate_configs/single_gpu.yaml"
    python recipes/glue/sweep.py --summarize-only --output_dir runs/glue
    python recipes/glue/sweep.py --tasks mrpc -- --max_train_samples 512      # after `--`: passed to run_glue.py
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CONFIGS = HERE / "configs"
TASKS = ("cola", "stsb", "mrpc", "rte", "sst2", "mnli", "qnli", "qqp")  # Table 4's column order
METHODS = ("full_ft", "galore_r4", "lora_r4", "galore_r8", "lora_r8")

#: GaLore paper (ICML'24), Table 4: RoBERTa-base on GLUE.
PAPER_TABLE4: dict[str, dict[str, float]] = {
    "full_ft": dict(zip(TASKS, (62.24, 90.92, 91.30, 79.42, 94.57, 87.18, 92.33, 92.28), strict=True)),
    "galore_r4": dict(zip(TASKS, (60.35, 90.73, 92.25, 79.42, 94.04, 87.00, 92.24, 91.06), strict=True)),
    "lora_r4": dict(zip(TASKS, (61.38, 90.57, 91.07, 78.70, 92.89, 86.82, 92.18, 91.29), strict=True)),
    "galore_r8": dict(zip(TASKS, (60.06, 90.82, 92.01, 79.78, 94.38, 87.17, 92.20, 91.11), strict=True)),
    "lora_r8": dict(zip(TASKS, (61.83, 90.80, 91.90, 79.06, 93.46, 86.94, 92.25, 91.22), strict=True)),
}
PAPER_AVERAGE: dict[str, float] = {
    "full_ft": 86.28,
    "galore_r4": 85.89,
    "lora_r4": 85.61,
    "galore_r8": 85.94,
    "lora_r8": 85.93,
}


def available_methods() -> list[str]:
    """The method configs in `configs/` (every YAML file but `base.yaml`)."""
    return sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem != "base")


def commands(
    tasks: Sequence[str],
    methods: Sequence[str],
    seeds: Sequence[int],
    output_dir: Path,
    launcher: str | None = None,
    extra: Sequence[str] = (),
) -> list[tuple[Path, list[str]]]:
    """`(run directory, argv)` of every run, methods outermost."""
    prefix = shlex.split(launcher) if launcher else [sys.executable]
    runs = []
    for method in methods:
        for task in tasks:
            for seed in seeds:
                run_dir = output_dir / method / task / f"seed{seed}"
                argv = [
                    *prefix,
                    str(HERE / "run_glue.py"),
                    "--config", str(CONFIGS / f"{method}.yaml"),
                    "--task_name", task,
                    "--seed", str(seed),
                    "--output_dir", str(run_dir),
                    *extra,
                ]  # fmt: skip
                runs.append((run_dir, argv))
    return runs


def _metric(entry: dict[str, Any], name: str) -> float:
    return 100.0 * float(entry["metrics"][f"eval_{name}"])


def summarize(output_dir: str | Path) -> dict[str, Any]:
    """Collect `<output_dir>/*/*/seed*/results.json`; write and return the median-over-seeds table.

    Returns:
        `{"methods": {method: {task: {"best", "final", "seeds", "metric"}, "average": {...}}}, "paper": ...}`;
        scores in percent. The average is over the tasks that ran; it is comparable with the paper's only when
        all 8 did (`"tasks"` in the average says how many).
    """
    output_dir = Path(output_dir)
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for path in sorted(output_dir.glob("*/*/seed*/results.json")):
        method, task = path.parts[-4], path.parts[-3]
        runs.setdefault(method, {}).setdefault(task, []).append(json.loads(path.read_text()))
    table: dict[str, Any] = {"methods": {}, "paper_table4": PAPER_TABLE4, "paper_average": PAPER_AVERAGE}
    for method, by_task in runs.items():
        row: dict[str, Any] = {}
        for task in [t for t in TASKS if t in by_task] + sorted(set(by_task) - set(TASKS)):
            results = by_task[task]
            metric = results[0]["best_metric"]
            row[task] = {
                "metric": metric,
                "best": statistics.median(_metric(r["best"], metric) for r in results),
                "final": statistics.median(_metric(r["final"], metric) for r in results),
                "seeds": len(results),
                "metric_path": sorted({r.get("metric_path", "?") for r in results}),
            }
        row["average"] = {
            kind: statistics.fmean(cell[kind] for cell in row.values()) for kind in ("best", "final")
        } | {"tasks": len(row)}
        table["methods"][method] = row
    (output_dir / "results.json").write_text(json.dumps(table, indent=2))
    (output_dir / "results.md").write_text(markdown(table))
    return table


def markdown(table: dict[str, Any]) -> str:
    """The summary as a markdown table: `best / final` medians per task, then the paper's row."""
    tasks = [t for t in TASKS if any(t in row for row in table["methods"].values())]
    header = ["Method", *tasks, "Avg"]
    lines = [
        "Median over seeds, best epoch / final epoch, in percent. Metrics: CoLA MCC, STS-B Pearson, MRPC F1, "
        "accuracy elsewhere. `paper` rows: GaLore Table 4 (not said whether best or final epoch).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for method, row in table["methods"].items():
        cells = [f"{row[t]['best']:.2f} / {row[t]['final']:.2f}" if t in row else "–" for t in tasks]
        average = row["average"]
        note = "" if average["tasks"] == len(TASKS) else f" ({average['tasks']} tasks)"
        lines.append(
            f"| {method} | " + " | ".join(cells) + f" | {average['best']:.2f} / {average['final']:.2f}{note} |"
        )
        if method in PAPER_TABLE4:
            paper = [f"{PAPER_TABLE4[method][t]:.2f}" if t in PAPER_TABLE4[method] else "–" for t in tasks]
            lines.append(f"| {method} (paper) | " + " | ".join(paper) + f" | {PAPER_AVERAGE[method]:.2f} |")
    seeds = sorted({cell["seeds"] for row in table["methods"].values() for k, cell in row.items() if k != "average"})
    paths = sorted(
        {
            p
            for row in table["methods"].values()
            for k, cell in row.items()
            if k != "average"
            for p in cell["metric_path"]
        }
    )
    lines += ["", f"Seeds per cell: {seeds}. Metric path: {paths}."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """Run (or print) the sweep, then summarize; returns the number of failed runs (0: all passed)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, metavar="TASK")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD", help="Config names.")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--output_dir", default="runs/glue")
    parser.add_argument("--launcher", default=None, help='e.g. "accelerate launch --config_file ...".')
    parser.add_argument("--dry-run", action="store_true", help="Print the commands; run nothing.")
    parser.add_argument("--summarize-only", action="store_true", help="Only rebuild results.md/json.")
    parser.add_argument("--skip-existing", action="store_true", help="Skip runs that already have results.json.")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(available_methods()))
    if unknown:
        parser.error(f"--methods {unknown} have no config in {CONFIGS}; choose from {available_methods()}.")
    output_dir = Path(args.output_dir)
    failures = 0
    if not args.summarize_only:
        for run_dir, command in commands(args.tasks, args.methods, args.seeds, output_dir, args.launcher, extra):
            print(shlex.join(command), flush=True)
            if args.dry_run or (args.skip_existing and (run_dir / "results.json").exists()):
                continue
            failures += subprocess.run(command, check=False).returncode != 0  # keep going: one bad seed ≠ no table
    if args.dry_run:
        return 0
    if output_dir.exists():
        summarize(output_dir)
        print((output_dir / "results.md").read_text())
    if failures:
        print(f"{failures} run(s) failed; see their logs above.", file=sys.stderr)
    return failures


if __name__ == "__main__":
    sys.exit(main())
