"""The runs of a comparison: train and evaluate each (seed, method, with/without MemLoss).

For each seed and method, two runs share everything (initialisation, data order, attack settings)
except the memory term, so the difference between them is a paired comparison. Runs go one after
another in this process or in parallel in worker processes; every run seeds itself, so its numbers
do not depend on the order or the process it runs in (up to floating-point differences between
thread counts).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import torch
from torch import nn

from memloss_addon.checks import positive_int
from memloss_addon.experiments.compare_config import CompareConfig
from memloss_addon.experiments.datasets import DatasetName, DatasetSplits, load_dataset
from memloss_addon.experiments.evaluate import evaluate
from memloss_addon.experiments.evaluation_data import evaluation_loader
from memloss_addon.experiments.evaluation_settings import autoattack_config
from memloss_addon.experiments.train_config import MethodName
from memloss_addon.experiments.training import BatchWrapper, TrainingRun

__all__ = [
    "ResultCallback",
    "RunResult",
    "run_plan",
    "train_and_evaluate",
    "train_and_evaluate_all",
]


@dataclass(frozen=True)
class RunResult:
    """One trained and evaluated model.

    Attributes:
        method: Base method.
        memory: Whether MemLoss was on.
        seed: Seed of the run.
        accuracy: ``{attack name: accuracy}`` on the test set, fractions in [0, 1].
        train_seconds: Training time, including HAT's helper.
        eval_seconds: Evaluation time.
        final_loss: Mean base loss of the last epoch.
        final_memory_term: Mean memory term of the last epoch.
        train_cpu_seconds: Process CPU time of the training epochs (helper and evaluations after
            each epoch not included).
        best_epoch: The epoch with the best held-out PGD-20 accuracy (``None`` without holdout).
        best_accuracy: The accuracies of that epoch's weights (``None`` without holdout).
        epochs: The per-epoch records (:class:`~.epoch_records.EpochStats` as dicts).
    """

    method: str
    memory: bool
    seed: int
    accuracy: dict[str, float]
    train_seconds: float
    eval_seconds: float
    final_loss: float
    final_memory_term: float
    train_cpu_seconds: float = 0.0
    best_epoch: int | None = None
    best_accuracy: dict[str, float] | None = None
    epochs: list[dict[str, Any]] = field(default_factory=list)


ResultCallback = Callable[[RunResult, int, int], None]
"""Called after each run with its result, how many runs have finished and the number of runs."""

_Run = tuple[int, MethodName, bool]  # (seed, method, memory)


def run_plan(config: CompareConfig) -> list[_Run]:
    """Every run as ``(seed, method, memory)``: seeds outermost, then methods, base first.

    Example:
        >>> run_plan(CompareConfig(methods=("trades",), seeds=(0, 1)))
        [(0, 'trades', False), (0, 'trades', True), (1, 'trades', False), (1, 'trades', True)]
    """
    return [(s, m, mem) for s in config.seeds for m in config.methods for mem in (False, True)]


def train_and_evaluate(
    config: CompareConfig,
    splits: DatasetSplits,
    *,
    seed: int,
    method: MethodName,
    memory: bool,
    wrap: BatchWrapper | None = None,
) -> RunResult:
    """Train one model of the comparison and evaluate it on the test set (with ``holdout``, also
    the weights of its best epoch)."""
    start = time.perf_counter()
    run = TrainingRun(config.train_config(method, memory=memory, seed=seed), splits)
    run.fit(wrap=wrap)
    trained = time.perf_counter()

    def accuracies(model: nn.Module) -> dict[str, float]:
        return evaluate(
            model,
            evaluation_loader(splits.test, config.eval_samples),
            eps=config.eps,
            attacks=config.attacks,
            pgd_steps=config.pgd_steps,
            autoattack=autoattack_config(config.autoattack),
            seed=seed,
            progress=False,
        )

    accuracy = accuracies(run.model)
    best = run.best
    best_accuracy = None if best is None else accuracies(run.model_with("best"))
    last = run.history[-1]
    return RunResult(
        method=method,
        memory=memory,
        seed=seed,
        accuracy=accuracy,
        train_seconds=trained - start,
        eval_seconds=time.perf_counter() - trained,
        final_loss=float(last["loss"]),
        final_memory_term=float(last["memory_term"]),
        train_cpu_seconds=sum(float(h["cpu_seconds"]) for h in run.history),
        best_epoch=None if best is None else int(best["epoch"]),
        best_accuracy=best_accuracy,
        epochs=list(run.history),
    )


def train_and_evaluate_all(
    config: CompareConfig,
    splits: DatasetSplits,
    *,
    jobs: int = 1,
    data_dir: str | Path = "data",
    on_result: ResultCallback | None = None,
    wrap: BatchWrapper | None = None,
) -> list[RunResult]:
    """Train and evaluate every run of :func:`run_plan`.

    Args:
        config: The comparison's settings.
        splits: The dataset.
        jobs: Runs in parallel, each in its own process with ``cpu_count // jobs`` threads
            (default: 1, in this process). Small models train faster as several one-thread
            processes than as one multi-threaded process.
        data_dir: Where worker processes read local datasets from (``jobs > 1``).
        on_result: Called after each run, e.g. to print progress or save partial results.
        wrap: Wraps each epoch's batch iterable, e.g. in a progress bar (``jobs == 1`` only).

    Returns:
        The results in plan order.

    Raises:
        TypeError: If ``jobs`` is not an int.
        ValueError: If ``jobs`` is below 1, or ``jobs > 1`` with a dataset worker processes
            cannot load by name.
    """
    positive_int("jobs", jobs)
    plan = run_plan(config)
    if jobs == 1:
        results: list[RunResult] = []
        for seed, method, memory in plan:
            results.append(
                train_and_evaluate(
                    config, splits, seed=seed, method=method, memory=memory, wrap=wrap
                )
            )
            if on_result is not None:
                on_result(results[-1], len(results), len(plan))
        return results
    return _in_worker_processes(config, splits, plan, jobs, data_dir, on_result)


def _in_worker_processes(
    config: CompareConfig,
    splits: DatasetSplits,
    plan: list[_Run],
    jobs: int,
    data_dir: str | Path,
    on_result: ResultCallback | None,
) -> list[RunResult]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # forking a process that ran torch is unsafe
    init_args = (_dataset_name(splits), str(data_dir), splits.split_seed, splits.augment, threads)
    results: dict[int, RunResult] = {}
    with ProcessPoolExecutor(
        max_workers=min(jobs, len(plan)),
        mp_context=context,
        initializer=_init_worker,
        initargs=init_args,
    ) as pool:
        futures = {
            pool.submit(_run_in_worker, config, seed, method, memory): position
            for position, (seed, method, memory) in enumerate(plan)
        }
        try:
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                if on_result is not None:
                    on_result(results[futures[future]], len(results), len(plan))
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [results[i] for i in range(len(plan))]


def _dataset_name(splits: DatasetSplits) -> DatasetName:
    """The name worker processes load ``splits`` by."""
    for name in get_args(DatasetName):
        if name == splits.name:
            return name
    raise ValueError(
        f"worker processes load datasets by name, and {splits.name!r} is not one of "
        f"{get_args(DatasetName)}; run it with jobs=1"
    )


# The dataset of a worker process, loaded once by _init_worker.
_worker_splits: DatasetSplits | None = None


def _init_worker(
    name: DatasetName, data_dir: str, split_seed: int, augment: bool, threads: int
) -> None:
    global _worker_splits
    torch.set_num_threads(threads)
    _worker_splits = load_dataset(name, data_dir=data_dir, split_seed=split_seed, augment=augment)


def _run_in_worker(config: CompareConfig, seed: int, method: MethodName, memory: bool) -> RunResult:
    if _worker_splits is None:  # pragma: no cover - the pool's initializer always runs first
        raise RuntimeError("worker process has no dataset")
    return train_and_evaluate(config, _worker_splits, seed=seed, method=method, memory=memory)
