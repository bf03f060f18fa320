"""One command, one table: hf_galore's optimizers against fused AdamW and the published implementations.

For each case of a suite (a model config, weight dtype, autocast, rank and batch) and each method, two fresh
processes (`step_time.py --single`) run on the same random tokens:

* **steady**: the projection gap is larger than the run, so only step 0 refreshes; the median of steps 1..N is the
  steady step time, and the run also gives the optimizer-state bytes and the peak allocated memory (CUDA);
* **refresh**: the gap is `--refresh-gap` G and the run has G + 1 steps, so steps 1..G hold exactly one refresh of
  every basis (staggered or not); `refresh = sum(steps 1..G) - G x steady` is the time of one refresh, and
  `amortized = steady + refresh / 200` the step time at the paper's gap of 200.

Ratios are to fused AdamW from the same invocation. Results accumulate in a JSON file (a case/method pair already
there is not run again, so a suite can be filled over several sessions), and `--write-docs` puts the markdown table
into `docs/benchmarks.md` between its result markers. ::

    pip install --no-deps galore-torch q-galore-torch flora-opt      # benchmark-only baselines
    python benchmarks/run.py --suite quick --device cuda --json benchmarks/results/quick.json --write-docs
    python benchmarks/run.py --suite smoke                            # 1 minute on a CPU: exercises the harness

Never run in CI: timings need a quiet, dedicated machine.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import step_time  # noqa: E402

#: Every method the quick suite compares, ours first, then the baselines (see `baselines.py`).
OURS = [
    "galore_adamw",
    "galore_adamw_8bit",
    "galore_adafactor",
    "galore_adamw_layerwise",
    "galore_adamw_8bit_layerwise",
    "q_galore_adamw_8bit",
    "flora_adamw",
    "flora_adafactor",
]
BASELINES = [
    "adamw",
    "bnb_adamw8bit",
    "galore_torch_adamw",
    "galore_torch_adamw8bit",
    "galore_torch_adamw8bit_layerwise",
    "q_galore_torch_adamw8bit",
    "flora_opt",
]
NO_REFRESH = {"adamw", "bnb_adamw8bit"}  # nothing to refresh: amortized = steady


@dataclass(frozen=True)
class Case:
    """One benchmark configuration (the issue's table rows)."""

    model: str
    dtype: str = "fp32"
    autocast: str = "none"
    rank: int = 128
    batch: int = 4
    seq: int = 128
    grad_checkpointing: bool = False
    steps: int = 12
    refresh_gap: int = 10
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(BASELINES[:1] + OURS + BASELINES[1:]))

    @property
    def key(self) -> str:
        ckpt = "-ckpt" if self.grad_checkpointing else ""
        return f"{self.model}-{self.dtype}-autocast_{self.autocast}-r{self.rank}-{self.batch}x{self.seq}{ckpt}"

    def argv(self, device: str, gap: int, steps: int) -> list[str]:
        values = [
            "--model", self.model, "--device", device, "--dtype", self.dtype, "--autocast", self.autocast,
            "--rank", str(self.rank), "--batch", str(self.batch), "--seq", str(self.seq), "--gap", str(gap),
            "--steps", str(steps),
        ]  # fmt: skip
        return values + (["--grad-checkpointing"] if self.grad_checkpointing else [])


SUITES: dict[str, list[Case]] = {
    # The two reference rows: LLaMA-350M in bf16 at rank 256, RoBERTa-base fp32 + bf16 autocast at rank 8.
    "quick": [
        Case("llama-350m", dtype="bf16", rank=256, batch=16, seq=256),
        Case("roberta-base", dtype="fp32", autocast="bf16", rank=8, batch=32, seq=128),
    ],
    "7b": [
        Case(
            "llama-7b",
            dtype="bf16",
            rank=1024,
            batch=1,
            seq=512,
            grad_checkpointing=True,
            steps=4,
            refresh_gap=0,
            methods=("galore_adamw_8bit_layerwise", "galore_torch_adamw8bit_layerwise"),
        )
    ],
    "smoke": [Case("tiny", rank=8, batch=2, seq=32, steps=4, refresh_gap=2, methods=("adamw", "galore_adamw"))],
}
SUITES["full"] = [
    *SUITES["quick"],
    Case("llama-60m", dtype="bf16", rank=128, batch=16, seq=256),
    Case("llama-1b", dtype="bf16", rank=512, batch=4, seq=256),
    *SUITES["7b"],
]


def summarize(
    steady: dict[str, Any], refresh: dict[str, Any] | None, gap: int, paper_gap: int = 200
) -> dict[str, Any]:
    """Steady median, the time of one refresh and the amortized step at `paper_gap` from the two runs' step times.

    `refresh` is None (no refresh run) for methods without a basis: their refresh time is None and their amortized
    step equals the steady one.
    """
    median = steady["median_step_s"]
    out = {k: v for k, v in steady.items() if k != "step_times_s"}
    if refresh is None or "error" in refresh:
        out.update(refresh_s=None, amortized_step_s=median)
        if refresh is not None:
            out["refresh_error"] = refresh["error"]
        return out
    window = refresh["step_times_s"][1 : gap + 1]
    one_refresh = max(0.0, sum(window) - len(window) * median)
    out.update(refresh_s=one_refresh, amortized_step_s=median + one_refresh / paper_gap)
    return out


def run_case(case: Case, device: str, methods: list[str], done: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run every method of `case` not already in `done` (a dict method -> summary), returning the updated dict."""
    for method in methods:
        if method in done and "error" not in done[method]:
            continue
        steady = step_time.run_in_subprocess(case.argv(device, 10**9, case.steps), method, timeout)
        if "error" in steady:
            done[method] = steady
        else:
            refresh = None
            if case.refresh_gap > 0 and method not in NO_REFRESH:
                argv = case.argv(device, case.refresh_gap, case.refresh_gap + 1)
                refresh = step_time.run_in_subprocess(argv, method, timeout)
            done[method] = summarize(steady, refresh, case.refresh_gap)
        print(f"{case.key} {method}: {_brief(done[method])}", flush=True)
    return done


def _brief(result: dict[str, Any]) -> str:
    if "error" in result:
        return f"failed: {result['error']}"
    refresh = f", refresh {result['refresh_s'] * 1e3:.0f} ms" if result.get("refresh_s") is not None else ""
    return f"{result['median_step_s'] * 1e3:.1f} ms/step{refresh}"


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f}"


def table(case_key: str, results: dict[str, Any]) -> str:
    """Markdown table of one case, with ratios to `adamw` of the same results."""
    base = results.get("adamw")
    base_ok = base is not None and "error" not in base
    lines = [
        f"#### {case_key}",
        "",
        "| method | step (ms) | × AdamW | amortized at gap 200 (ms) | × AdamW | one refresh (ms) | first step (ms) "
        "| optimizer state (MiB) | predicted state (MiB) | peak (MiB) | predicted peak (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, r in results.items():
        if "error" in r:
            lines.append(f"| {method} | failed: {r['error'][:150]} | | | | | | | | | |")
            continue
        ratio = f"{r['median_step_s'] / base['median_step_s']:.2f}" if base_ok else "-"
        amortized_ratio = f"{r['amortized_step_s'] / base['median_step_s']:.2f}" if base_ok else "-"
        refresh = "-" if r.get("refresh_s") is None else f"{r['refresh_s'] * 1e3:,.0f}"
        lines.append(
            f"| {method} | {r['median_step_s'] * 1e3:.1f} | {ratio} | {r['amortized_step_s'] * 1e3:.1f} | "
            f"{amortized_ratio} | {refresh} | {r['first_step_s'] * 1e3:,.0f} | {_mib(r['optimizer_state_bytes'])} | "
            f"{_mib(r.get('predicted_state_bytes'))} | {_mib(r.get('peak_allocated_bytes'))} | "
            f"{_mib(r.get('predicted_peak_bytes'))} |"
        )
    return "\n".join(lines)


DOCS_START, DOCS_END = "<!-- benchmark-results:start -->", "<!-- benchmark-results:end -->"


def write_docs(markdown: str, path: Path) -> None:
    """Replace the text between the result markers of `path` (docs/benchmarks.md) with `markdown`.

    Raises:
        ValueError: when the markers are missing.
    """
    text = path.read_text()
    if DOCS_START not in text or DOCS_END not in text:
        raise ValueError(f"{path} has no {DOCS_START} ... {DOCS_END} block to fill.")
    head, rest = text.split(DOCS_START, 1)
    _, tail = rest.split(DOCS_END, 1)
    path.write_text(f"{head}{DOCS_START}\n{markdown}\n{DOCS_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="quick")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=None, help="Subset of each case's methods.")
    parser.add_argument("--cases", nargs="+", default=None, help="Subset of the suite's models (e.g. roberta-base).")
    parser.add_argument(
        "--json", default=None, help="Results file, read first (resume) and rewritten after each case."
    )
    parser.add_argument("--timeout", type=float, default=900.0, help="Seconds per process.")
    parser.add_argument("--write-docs", action="store_true", help="Put the table into docs/benchmarks.md.")
    args = parser.parse_args(argv)
    if args.device == "cpu" and args.suite != "smoke":
        print("Note: CPU timings say little about GPU performance; the targets are GPU numbers.", file=sys.stderr)

    path = Path(args.json) if args.json else None
    data: dict[str, Any] = json.loads(path.read_text()) if path and path.exists() else {"cases": {}}
    data["environment"] = step_time._environment(args.device)
    data["updated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    for case in SUITES[args.suite]:
        if args.cases and case.model not in args.cases:
            continue
        methods = [m for m in case.methods if args.methods is None or m in args.methods]
        entry = data["cases"].setdefault(case.key, {"case": asdict(case), "results": {}})
        run_case(case, args.device, methods, entry["results"], args.timeout)
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(data, indent=2, default=str))
    environment = ", ".join(f"{k} {v}" for k, v in data["environment"].items())
    markdown = "\n\n".join(
        [f"Environment: {environment}. Updated {data['updated']}."]
        + [table(key, entry["results"]) for key, entry in data["cases"].items()]
    )
    print(markdown)
    if args.write_docs:
        write_docs(markdown, HERE.parent / "docs" / "benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
