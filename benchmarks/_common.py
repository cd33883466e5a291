"""Shared helpers of the benchmark scripts: run metadata, timing and JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_metadata(command: list[str] | None = None) -> dict[str, Any]:
    """Date, versions, threads and load average: what a reader needs to judge a number."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "load_average_1_5_15": [round(v, 2) for v in load],
        "command": " ".join(command if command is not None else sys.argv),
    }


def print_metadata(meta: dict[str, Any]) -> None:
    print(
        f"# {meta['date_utc']}  torch {meta['torch']}  python {meta['python']}  "
        f"{meta['cpu_count']} CPUs, {meta['torch_threads']} torch thread(s)  "
        f"load {meta['load_average_1_5_15']}"
    )


def interleaved_medians(
    functions: dict[str, Callable[[], object]],
    *,
    rounds: int = 3,
    min_run_time: float = 0.1,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Seconds per call of each function: the median over ``rounds`` of round-robin measurements.

    In each round every function gets one ``torch.utils.benchmark`` ``blocked_autorange`` (which
    picks the calls per block and synchronizes CUDA around blocks) and its per-call median is
    kept; alternating the functions within a round exposes them all to the same load from other
    processes on a shared machine. ``clock=time.process_time`` counts this process's CPU time only
    (user and system, page faults included), leaving out time spent waiting for other processes.
    """
    timers = {
        name: benchmark.Timer(
            stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads(), timer=clock
        )
        for name, fn in functions.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return {name: statistics.median(values) for name, values in samples.items()}


def write_json(path: str | Path, payload: dict[str, Any]) -> Path:
    """Writes ``payload`` as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
