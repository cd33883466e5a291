"""What a comparison reports: per-method summaries, a plain-text table and results.json.

:func:`summarize` turns the per-run numbers into mean and standard deviation per method and
variant (base, +MemLoss and their paired difference), :func:`format_table` prints them, and
:func:`write_results` records everything, with the config and environment, in results.json.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from memloss_addon.experiments.compare_config import CompareConfig
from memloss_addon.experiments.compare_runs import RunResult
from memloss_addon.experiments.datasets import DatasetSplits
from memloss_addon.experiments.evaluation_data import first_samples, sample_count
from memloss_addon.version import __version__

__all__ = [
    "ATTACK_LABELS",
    "Summary",
    "format_table",
    "summarize",
    "summarize_best",
    "write_results",
]

ATTACK_LABELS: dict[str, str] = {
    "clean": "clean",
    "pgd": "PGD-20",
    "cw": "CW-20",
    "autoattack": "AutoAttack",
}

Summary = dict[str, dict[str, dict[str, list[float]]]]
"""``{method: {variant: {attack: [mean, std]}}}``, as :func:`summarize` returns it."""


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def summarize(results: Sequence[RunResult]) -> Summary:
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
    summary: Summary = {}
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


def summarize_best(results: Sequence[RunResult]) -> Summary:
    """:func:`summarize` of the best-epoch accuracies (runs trained with a held-out split only).

    Example:
        >>> runs = [RunResult("mart", False, 0, {"clean": 0.5}, 0, 0, 0, 0, best_epoch=2,
        ...                   best_accuracy={"clean": 0.75})]
        >>> summarize_best(runs)["mart"]["base"]["clean"]
        [0.75, 0.0]
    """
    return summarize(
        [
            dataclasses.replace(r, accuracy=r.best_accuracy)
            for r in results
            if r.best_accuracy is not None
        ]
    )


def format_table(summary: Summary) -> str:
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
            "num_test": sample_count(splits.test),
            "num_eval": sample_count(first_samples(splits.test, config.eval_samples)),
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
        "summary_best": summarize_best(results),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return document


def _evaluation_note(config: CompareConfig) -> str:
    parts = [f"L-inf eps={config.eps:g} on the test set"]
    if config.holdout:
        parts.append(
            f"each run at its last epoch ('summary') and at its best epoch by PGD-20 on "
            f"{config.holdout} held-out training samples ('summary_best')"
        )
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
