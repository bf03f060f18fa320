"""Run the repository's scripts in tests: import them (`recipes/`, `benchmarks/` are folders of scripts, not
packages), or launch one on several gloo processes with `torch.distributed.run`."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, module_name: str | None = None) -> ModuleType:
    """Import the script at `path` as `module_name` (default: its stem), once; later calls reuse the module.

    The script's folder goes on `sys.path` first, so its sibling imports (`import offline_assets`) resolve.
    """
    name = module_name or path.stem
    if name in sys.modules:
        return sys.modules[name]
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def free_port() -> int:
    """A port that is free now (each launch gets its own, so back-to-back launches never collide)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_script(
    script: Path, out: Path, processes: int, *args: str, torchrun: bool = False
) -> subprocess.CompletedProcess:
    """Run `script --out OUT *args` on `processes` gloo processes (`torch.distributed.run`; one process runs it
    directly unless `torchrun`, which gives it a process group of one) and return the finished process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if processes == 1 and not torchrun:
        command = [sys.executable, str(script)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_port", str(free_port()), str(script)]  # fmt: skip
    return subprocess.run([*command, "--out", str(out), *args], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip


#: What a process prints when a C++ thread still running at its exit aborts it (std::terminate on a joinable thread):
#: seen twice in one run of every multi-process test on a 2-core machine loaded with other test runs, rank 0 aborted
#: with no Python error (gloo's threads at exit; 6 repeats of one of those launches alone all passed). Such a launch
#: runs once more; any other failure fails at once.
THREAD_ABORT_AT_EXIT = "terminate called without an active exception"


def launch(script: Path, out: Path, processes: int, *args: str, torchrun: bool = False) -> list[dict]:
    """[`run_script`], asserting success, then load what each rank saved as `OUT/rank{r}.pt`.

    A launch that a thread abort at exit ([`THREAD_ABORT_AT_EXIT`]) failed is run a second time (with its outputs
    removed first, so only a complete run's outputs are read); a second failure of any kind fails the test.
    """
    for attempt in range(2):
        for rank in range(processes):
            (out / f"rank{rank}.pt").unlink(missing_ok=True)
        result = run_script(script, out, processes, *args, torchrun=torchrun)
        if result.returncode == 0 or THREAD_ABORT_AT_EXIT not in result.stderr or attempt:
            break
        warnings.warn(
            f"{script.name}: a process aborted at exit ({THREAD_ABORT_AT_EXIT!r}); running it again", stacklevel=2
        )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(processes)]
