"""The comparison job: every base method with and without MemLoss, over several seeds.

For each seed and method, two runs share everything (initialisation, data order, attack settings)
except the memory term, so the difference between them is a paired comparison. Each trained model is
evaluated on the test set; :func:`summarize` turns the per-run numbers into mean and standard
deviation per method and variant, :func:`format_table` prints them, and :func:`plot_tradeoff`
draws clean against robust accuracy.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import multiprocessing
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch.utils.data import DataLoader, Subset

from memloss_addon.experiments.datasets import DatasetSplits, load_dataset
from memloss_addon.experiments.training import METHOD_NAMES, TrainConfig, TrainingRun
from memloss_addon.version import __version__

__all__ = [
    "ATTACK_LABELS",
    "CompareConfig",
    "RunResult",
    "compare",
    "format_table",
    "plot_tradeoff",
    "summarize",
    "write_results",
]

ATTACK_LABELS: dict[str, str] = {
    "clean": "clean",
    "pgd": "PGD-20",
    "cw": "CW-20",
    "autoattack": "AutoAttack",
}


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Settings of a comparison; the defaults are the ones ``memloss compare`` uses on digits.

    Attributes:
        methods: Base methods to compare.
        seeds: Seeds; each method trains once per seed with and once without MemLoss.
        epochs: Adversarial training epochs per run.
        eps: L-inf radius for training and evaluation, in ``[0, 1]`` pixel units.
        steps: Training attack steps (step size ``eps / 4``; single-step uses one FGSM step).
        lr: Base learning rate.
        batch_size: Training batch size.
        beta_prime: MemLoss weight beta'.
        helper_epochs: Cross-entropy epochs for HAT's helper.
        attacks: Evaluations to run (names of :func:`memloss_addon.experiments.evaluate.evaluate`).
        pgd_steps: Steps of the PGD and CW evaluations.
        autoattack: ``"standard"`` (the reference counts) or ``"fast"`` (10 iterations,
            3 targets, 100 Square queries: for smoke tests; not comparable with published numbers).
        eval_samples: Evaluate on the first this many test images (``None``: all).
        device: Training and evaluation device.
    """

    methods: tuple[str, ...] = METHOD_NAMES
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 15
    eps: float = 0.15
    steps: int = 10
    lr: float = 0.05
    batch_size: int = 128
    beta_prime: float = 2.0
    helper_epochs: int = 5
    attacks: tuple[str, ...] = ("clean", "pgd", "autoattack")
    pgd_steps: int = 20
    autoattack: Literal["standard", "fast"] = "standard"
    eval_samples: int | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_NAMES]
        if unknown or not self.methods:
            raise ValueError(f"methods must be a non-empty subset of {METHOD_NAMES}, got {unknown}")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods contains a repeat: {self.methods!r}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds!r}")
        if self.autoattack not in ("standard", "fast"):
            raise ValueError(f"autoattack must be 'standard' or 'fast', got {self.autoattack!r}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"eval_samples must be positive or None, got {self.eval_samples!r}")
        if "clean" not in self.attacks or len(self.attacks) < 2:
            raise ValueError(
                f"attacks must hold 'clean' and at least one attack, got {self.attacks}"
            )

    def train_config(self, method: str, *, memory: bool, seed: int) -> TrainConfig:
        """The :class:`TrainConfig` of one run."""
        return TrainConfig(
            method=method,  # type: ignore[arg-type]
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            eps=self.eps,
            steps=self.steps,
            helper_epochs=self.helper_epochs,
            memory=memory,
            beta_prime=self.beta_prime,
            device=self.device,
            seed=seed,
        )

    @property
    def robust_attack(self) -> str:
        """The attack the trade-off plot uses: the strongest one run."""
        for name in ("autoattack", "cw", "pgd"):
            if name in self.attacks:
                return name
        raise ValueError("no attack configured")  # unreachable after __post_init__


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
    """

    method: str
    memory: bool
    seed: int
    accuracy: dict[str, float]
    train_seconds: float
    eval_seconds: float
    final_loss: float
    final_memory_term: float


def _eval_loader(splits: DatasetSplits, eval_samples: int | None) -> DataLoader:
    test = splits.test
    if eval_samples is not None and eval_samples < len(test):
        test = Subset(test, range(eval_samples))
    return DataLoader(test, batch_size=512, shuffle=False)


def _train_and_evaluate(
    config: CompareConfig,
    splits: DatasetSplits,
    *,
    seed: int,
    method: str,
    memory: bool,
    wrap: Callable[[Iterable], Iterable] | None = None,
) -> RunResult:
    from memloss_addon.experiments.attacks import AutoAttackConfig
    from memloss_addon.experiments.evaluate import evaluate

    start = time.perf_counter()
    run = TrainingRun(config.train_config(method, memory=memory, seed=seed), splits)
    run.fit(wrap=wrap)
    trained = time.perf_counter()
    accuracy = evaluate(
        run.model,
        _eval_loader(splits, config.eval_samples),
        eps=config.eps,
        attacks=list(config.attacks),
        pgd_steps=config.pgd_steps,
        autoattack=AutoAttackConfig.fast() if config.autoattack == "fast" else AutoAttackConfig(),
        seed=seed,
        progress=False,
    )
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
    )


# The dataset of a worker process, loaded once by _init_worker.
_worker_splits: DatasetSplits | None = None


def _init_worker(name: str, data_dir: str, split_seed: int, augment: bool, threads: int) -> None:
    global _worker_splits
    torch.set_num_threads(threads)
    _worker_splits = load_dataset(name, data_dir=data_dir, split_seed=split_seed, augment=augment)


def _run_in_worker(config: CompareConfig, seed: int, method: str, memory: bool) -> RunResult:
    if _worker_splits is None:  # pragma: no cover - the pool's initializer always runs first
        raise RuntimeError("worker process has no dataset")
    return _train_and_evaluate(config, _worker_splits, seed=seed, method=method, memory=memory)


def compare(
    config: CompareConfig,
    splits: DatasetSplits,
    *,
    jobs: int = 1,
    data_dir: str | Path = "data",
    on_result: Callable[[RunResult, int, int], None] | None = None,
    wrap: Callable[[Iterable], Iterable] | None = None,
) -> list[RunResult]:
    """Train and evaluate every (seed, method, with/without memory) combination.

    Every run seeds itself, so its numbers do not depend on the order or the process it runs in
    (up to floating-point differences between thread counts).

    Args:
        config: The comparison's settings.
        splits: The dataset.
        jobs: Runs in parallel, each in its own process with ``cpu_count // jobs`` threads
            (default: 1, in this process). Small models train faster as several one-thread
            processes than as one multi-threaded process.
        data_dir: Where worker processes read local datasets from (``jobs > 1``).
        on_result: Called after each run with the result, how many runs have finished and the
            number of runs, e.g. to print progress or save partial results.
        wrap: Wraps each epoch's batch iterable, e.g. in a progress bar (``jobs == 1`` only).

    Returns:
        The results in plan order: seeds outermost, then methods, base before MemLoss.

    Raises:
        ValueError: If ``jobs`` is not a positive integer.
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    plan = [(s, m, mem) for s in config.seeds for m in config.methods for mem in (False, True)]
    results: dict[int, RunResult] = {}
    if jobs == 1:
        for position, (seed, method, memory) in enumerate(plan):
            results[position] = _train_and_evaluate(
                config, splits, seed=seed, method=method, memory=memory, wrap=wrap
            )
            if on_result is not None:
                on_result(results[position], len(results), len(plan))
        return [results[i] for i in range(len(plan))]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    context = multiprocessing.get_context("spawn")  # forking a process that ran torch is unsafe
    init_args = (splits.name, str(data_dir), splits.split_seed, splits.augment, threads)
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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarize(results: Sequence[RunResult]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Mean and sample standard deviation per method, variant and attack.

    Variants are ``"base"``, ``"memloss"`` and ``"difference"`` (MemLoss minus base, paired by seed;
    only seeds with both runs count). Values are ``[mean, std]`` fractions; the std is 0 for a
    single seed.

    Example:
        >>> rows = [(False, 0, 0.5), (True, 0, 0.6), (False, 1, 0.7), (True, 1, 0.6)]
        >>> runs = [RunResult("trades", m, s, {"clean": c}, 0, 0, 0, 0) for m, s, c in rows]
        >>> summary = summarize(runs)["trades"]
        >>> [round(v, 4) for v in summary["base"]["clean"]]
        [0.6, 0.1414]
        >>> [round(v, 4) for v in summary["difference"]["clean"]]
        [0.0, 0.1414]
    """
    summary: dict[str, dict[str, dict[str, list[float]]]] = {}
    methods = list(dict.fromkeys(r.method for r in results))
    for method in methods:
        runs = [r for r in results if r.method == method]
        names = list(runs[0].accuracy)
        by_seed = {(r.seed, r.memory): r for r in runs}
        paired = sorted(s for s, mem in by_seed if not mem and (s, True) in by_seed)
        entry: dict[str, dict[str, list[float]]] = {}
        for variant, memory in (("base", False), ("memloss", True)):
            chosen = [r for r in runs if r.memory is memory]
            if chosen:
                entry[variant] = {
                    n: list(_mean_std([r.accuracy[n] for r in chosen])) for n in names
                }
        if paired:
            entry["difference"] = {
                n: list(
                    _mean_std(
                        [
                            by_seed[(s, True)].accuracy[n] - by_seed[(s, False)].accuracy[n]
                            for s in paired
                        ]
                    )
                )
                for n in names
            }
        summary[method] = entry
    return summary


def format_table(summary: dict[str, dict[str, dict[str, list[float]]]]) -> str:
    """A plain-text table of :func:`summarize`'s output, in percent.

    Example:
        >>> print(format_table({"pgd_at": {"base": {"clean": [0.9, 0.01]}}}))
        method       variant   clean
        pgd_at       base      90.00 ± 1.00
    """
    names: list[str] = []
    for entry in summary.values():
        for values in entry.values():
            names.extend(n for n in values if n not in names)
    labels = {"base": "base", "memloss": "+MemLoss", "difference": "Δ"}
    width = 15
    header = f"{'method':<12} {'variant':<9} " + " ".join(
        f"{ATTACK_LABELS.get(n, n):<{width}}" for n in names
    )
    lines = [header.rstrip()]
    for method, entry in summary.items():
        first = True
        for variant in ("base", "memloss", "difference"):
            if variant not in entry:
                continue
            sign = "+" if variant == "difference" else ""
            cells = []
            for n in names:
                mean, std = entry[variant].get(n, [math.nan, math.nan])
                cells.append(f"{100 * mean:{sign}.2f} ± {100 * std:.2f}".ljust(width))
            row = f"{method if first else '':<12} {labels[variant]:<9} " + " ".join(cells)
            lines.append(row.rstrip())
            first = False
    return "\n".join(lines)


def write_results(
    path: str | Path,
    *,
    config: CompareConfig,
    splits: DatasetSplits,
    results: Sequence[RunResult],
    seconds: float,
    complete: bool,
) -> dict[str, Any]:
    """Write results.json: config, environment, every run's numbers and the summary.

    Returns:
        The document written.
    """
    document = {
        "tool": "memloss compare",
        "memloss_addon_version": __version__,
        "torch_version": str(torch.__version__),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "complete": complete,
        "seconds": round(seconds, 2),
        "dataset": {
            "name": splits.name,
            "num_train": len(splits.train),
            "num_test": len(splits.test),
            "num_eval": min(len(splits.test), config.eval_samples or len(splits.test)),
            "sample_shape": list(splits.sample_shape),
            "synthetic": splits.synthetic,
            "split_seed": splits.split_seed,
        },
        "config": dataclasses.asdict(config),
        "train_config_example": config.train_config(
            config.methods[0], memory=True, seed=config.seeds[0]
        ).to_dict(),
        "evaluation": _evaluation_note(config),
        "runs": [dataclasses.asdict(r) for r in results],
        "summary": summarize(results) if results else {},
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return document


def _evaluation_note(config: CompareConfig) -> str:
    parts = [f"L-inf eps={config.eps:g} on the test set"]
    if "pgd" in config.attacks or "cw" in config.attacks:
        parts.append(
            f"PGD/CW: {config.pgd_steps} steps of 2.5*eps/{config.pgd_steps}, random start"
        )
    if "autoattack" in config.attacks:
        if config.autoattack == "standard":
            parts.append(
                "AutoAttack: APGD-CE 100 it., APGD-T 100 it. x 9 targets, FAB-T 100 it. x 9 "
                "targets, Square 5000 queries (torchattacks classes, reference counts)"
            )
        else:
            parts.append(
                "AutoAttack 'fast': 10 iterations, 3 targets, 100 Square queries "
                "(smoke test only; not comparable with published numbers)"
            )
    return "; ".join(parts)


def plot_tradeoff(
    summary: dict[str, dict[str, dict[str, list[float]]]],
    path: str | Path,
    *,
    robust: str,
    title: str = "",
) -> None:
    """Save a clean-vs-robust accuracy plot: one colour per method, an arrow base -> MemLoss.

    Args:
        summary: :func:`summarize`'s output.
        path: Where to save the PNG.
        robust: Which attack's accuracy goes on the vertical axis.
        title: Plot title.

    Raises:
        ImportError: If matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")  # file output only; works without a display
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError(
            'the trade-off plot needs matplotlib: pip install "memloss-addon[examples]"'
        ) from err
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colours = plt.get_cmap("tab10")
    for i, (method, entry) in enumerate(summary.items()):
        points = {}
        for variant, marker in (("base", "o"), ("memloss", "^")):
            if variant not in entry or robust not in entry[variant]:
                continue
            (cx, sx), (ry, sy) = entry[variant]["clean"], entry[variant][robust]
            label = f"{method}" + (" + MemLoss" if variant == "memloss" else "")
            ax.errorbar(
                100 * cx,
                100 * ry,
                xerr=100 * sx,
                yerr=100 * sy,
                fmt=marker,
                color=colours(i),
                markerfacecolor="none" if variant == "base" else colours(i),
                capsize=3,
                label=label,
            )
            points[variant] = (100 * cx, 100 * ry)
        if len(points) == 2:
            ax.annotate(
                "",
                xy=points["memloss"],
                xytext=points["base"],
                arrowprops={"arrowstyle": "->", "color": colours(i), "alpha": 0.6},
            )
    ax.set_xlabel("clean accuracy (%)")
    ax.set_ylabel(f"{ATTACK_LABELS.get(robust, robust)} accuracy (%)")
    ax.set_title(title or "clean vs robust accuracy (open: base, filled: + MemLoss)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
