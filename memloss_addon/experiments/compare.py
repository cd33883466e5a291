"""The comparison job: every base method with and without MemLoss over several seeds, end to end.

:func:`run_comparison` trains and evaluates every run of a
:class:`~memloss_addon.experiments.compare_config.CompareConfig` (in worker processes when asked),
keeps results.json in the output folder up to date after each run, and at the end writes the
complete results.json and the clean-vs-robust plot; with ``diagnostics`` also every run's
per-epoch records (epochs.jsonl, epochs.csv) and their plot of forgetting and test robustness
(diagnostics.png). It is what ``memloss compare`` runs; the
command adds the progress display and the printed table.

The parts: :mod:`~memloss_addon.experiments.compare_config` (the settings),
:mod:`~memloss_addon.experiments.compare_runs` (training and evaluating the runs),
:mod:`~memloss_addon.experiments.compare_report` (summary, table, results.json) and
:mod:`~memloss_addon.experiments.compare_plot` (the plot).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memloss_addon.checks import positive_int
from memloss_addon.experiments.attacks import import_torchattacks
from memloss_addon.experiments.compare_config import CompareConfig
from memloss_addon.experiments.compare_plot import plot_tradeoff
from memloss_addon.experiments.compare_report import Summary, summarize, write_results
from memloss_addon.experiments.compare_runs import (
    ResultCallback,
    RunResult,
    train_and_evaluate_all,
)
from memloss_addon.experiments.datasets import DatasetSplits
from memloss_addon.experiments.epoch_records import (
    EPOCH_COLUMNS,
    RUN_COLUMNS,
    plot_epoch_curves,
    write_epoch_records,
)
from memloss_addon.experiments.epoch_records import PLOT_FILE as DIAGNOSTICS_PLOT_FILE
from memloss_addon.experiments.training import BatchWrapper

__all__ = [
    "DIAGNOSTICS_PLOT_FILE",
    "PLOT_FILE",
    "RESULTS_FILE",
    "ComparisonReport",
    "default_jobs",
    "run_comparison",
]

RESULTS_FILE = "results.json"
PLOT_FILE = "tradeoff.png"


@dataclass(frozen=True)
class ComparisonReport:
    """What a finished comparison produced.

    Attributes:
        results: Every run's result, in plan order (seeds outermost, then methods, base first).
        summary: :func:`~memloss_addon.experiments.compare_report.summarize` of the results.
        seconds: Wall-clock time of training and evaluating all runs.
        results_path: The complete results.json.
        plot_path: The trade-off plot, or ``None`` when it could not be drawn.
        plot_error: Why there is no plot (``None`` when there is one).
        epoch_files: The per-epoch records and their plot (with ``diagnostics``; the plot is left
            out without matplotlib).
    """

    results: list[RunResult]
    summary: Summary
    seconds: float
    results_path: Path
    plot_path: Path | None
    plot_error: str | None
    epoch_files: tuple[Path, ...] = ()


def default_jobs() -> int:
    """Runs in parallel by default: two, or one on a one-core machine.

    Example:
        >>> default_jobs() in (1, 2)
        True
    """
    return min(2, os.cpu_count() or 1)


def run_comparison(
    config: CompareConfig,
    splits: DatasetSplits,
    *,
    out: str | Path,
    jobs: int | None = None,
    data_dir: str | Path = "data",
    on_result: ResultCallback | None = None,
    wrap: BatchWrapper | None = None,
) -> ComparisonReport:
    """Train and evaluate every run of ``config`` and write its results to ``out``.

    After each run, ``out/results.json`` holds the runs finished so far (``"complete": false``);
    at the end it holds all of them and their summary, and ``out/tradeoff.png`` plots clean
    against robust accuracy (skipped, with the reason in the report, without matplotlib).

    Args:
        config: The comparison's settings.
        splits: The dataset.
        out: The output folder (created if needed).
        jobs: Runs in parallel, one process each (``None``: :func:`default_jobs`).
        data_dir: Where worker processes read local datasets from.
        on_result: Called after each run (and after results.json is updated) with the result, how
            many runs have finished and the number of runs.
        wrap: Wraps each epoch's batch iterable, e.g. in a progress bar (one job only).

    Returns:
        The results, their summary and the files written.

    Raises:
        ImportError: If ``config.attacks`` holds AutoAttack and torchattacks is not installed
            (before any run starts).
        FloatingPointError: If a run's loss becomes non-finite; results.json keeps the runs
            finished before it.
    """
    jobs = default_jobs() if jobs is None else positive_int("jobs", jobs)
    if "autoattack" in config.attacks:
        import_torchattacks()  # fail before any training when the extra is missing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    start = time.perf_counter()
    finished: list[RunResult] = []

    def record(result: RunResult, number: int, total: int) -> None:
        finished.append(result)
        seconds = time.perf_counter() - start
        write_results(
            results_path,
            config=config,
            splits=splits,
            results=finished,
            seconds=seconds,
            complete=False,
        )
        if on_result is not None:
            on_result(result, number, total)

    results = train_and_evaluate_all(
        config, splits, jobs=jobs, data_dir=data_dir, on_result=record, wrap=wrap
    )
    seconds = time.perf_counter() - start
    summary = summarize(results)
    write_results(
        results_path, config=config, splits=splits, results=results, seconds=seconds, complete=True
    )
    plot_path: Path | None = out / PLOT_FILE
    plot_error = None
    try:
        plot_tradeoff(
            summary,
            out / PLOT_FILE,
            robust=config.robust_attacks,
            title=f"{splits.name}, eps={config.eps:g}",
            seeds=len(config.seeds),
        )
    except ImportError as err:
        plot_path, plot_error = None, str(err)
    epoch_files: tuple[Path, ...] = ()
    if config.diagnostics:
        epoch_files = _write_epoch_files(results, out, title=f"{splits.name}, eps={config.eps:g}")
    return ComparisonReport(
        results=results,
        summary=summary,
        seconds=seconds,
        results_path=results_path,
        plot_path=plot_path,
        plot_error=plot_error,
        epoch_files=epoch_files,
    )


def _write_epoch_files(results: list[RunResult], out: Path, *, title: str) -> tuple[Path, ...]:
    """Every run's per-epoch records in one pair of files, and the plot base vs + MemLoss."""
    records = [
        {"method": r.method, "memory": r.memory, "seed": r.seed, **epoch}
        for r in results
        for epoch in r.epochs
    ]
    files = write_epoch_records(records, out, columns=RUN_COLUMNS + EPOCH_COLUMNS)
    groups: dict[str, list[list[dict[str, Any]]]] = {}
    styles: dict[str, dict[str, Any]] = {}
    methods = list(dict.fromkeys(r.method for r in results))
    for r in results:
        label = f"{r.method} + MemLoss" if r.memory else f"{r.method} base"
        groups.setdefault(label, []).append(r.epochs)
        styles[label] = {
            "color": f"C{methods.index(r.method) % 10}",
            "linestyle": "-" if r.memory else "--",
        }
    try:
        plot_epoch_curves(groups, out / DIAGNOSTICS_PLOT_FILE, title=title, styles=styles)
    except ImportError:
        return files
    return (*files, out / DIAGNOSTICS_PLOT_FILE)
