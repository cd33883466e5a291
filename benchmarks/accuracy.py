"""Accuracy study on scikit-learn's handwritten digits: each base method with and without MemLoss.

Usage:
    python benchmarks/accuracy.py [--smoke] [--jobs N] [--seeds N] [--out DIR] [--resume]

Every run trains the default digits model (``memloss_addon.experiments.models``, an MLP with
BatchNorm) with ``memloss_addon.experiments.training.TrainingRun`` and evaluates it with
``memloss_addon.experiments.evaluate``:

- main comparison: PGD-AT, TRADES, MART, HAT, ST (squeeze) and single-step, each without and with
  MemLoss (beta' = 2, depth 1, difficulty weighting, float32 examples), on every seed;
- ablations on TRADES + MemLoss: weighting none, depth 2 and 4, float16 and uint8 storage, and
  perturbation mode (int8, at eps/127), each compared with TRADES + MemLoss at the defaults.

Clean and PGD-20 accuracy are measured on the whole test split (360 digits); AutoAttack (the
reference counts: APGD-CE 100, APGD-T 100 x 9 targets, FAB-T 100 x 9 targets, Square 5000
queries) on its first ``--aa-samples`` digits, for the main comparison only unless
``--aa-ablations`` is given: on a 2-core CPU AutoAttack costs about 4x the training of a run,
and the ablations are compared on clean and PGD-20 accuracy. Each pair of runs shares its seed
(initialisation, data order and attack starts), so differences are paired.

For every comparison the script prints the mean difference, the pooled seed-to-seed standard
deviation and Welch's t-test p-value, and says whether the difference exceeds the spread
(``|mean difference| > pooled std``). It writes ``accuracy.json`` (every run), ``accuracy.md``
(the tables) and ``accuracy_tradeoff.png`` (clean against AutoAttack accuracy, one point per run).
``--smoke`` trains TRADES with and without MemLoss for two short epochs on one seed and runs a
shortened AutoAttack on 16 digits (for tests; its numbers mean nothing).

Every finished training and AutoAttack run is appended to ``accuracy_runs.jsonl`` as it finishes
(``_study.ResultLog``); ``--resume`` keeps the runs already there instead of starting the log
afresh (trained runs whose weights are gone, e.g. in the default temporary ``--models`` folder,
are trained again).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, print_metadata, run_metadata, write_json
from _study import ResultLog, cell, make_executor, pooled_std, run_tasks, welch_p
from torch.utils.data import DataLoader, Subset

METHODS = ("pgd_at", "trades", "mart", "hat", "squeeze", "single_step")
METHOD_LABELS = {
    "pgd_at": "PGD-AT",
    "trades": "TRADES",
    "mart": "MART",
    "hat": "HAT",
    "squeeze": "ST",
    "single_step": "single-step",
}
# TRADES + MemLoss with one setting changed; the reference is TRADES + MemLoss at the defaults.
ABLATIONS: dict[str, dict[str, Any]] = {
    "weighting none": {"weighting": "none"},
    "depth 2": {"depth": 2},
    "depth 4": {"depth": 4},
    "float16": {"memory_dtype": "float16"},
    "uint8": {"memory_dtype": "uint8"},
    "perturbation (int8)": {"memory_mode": "perturbation", "memory_dtype": "int8"},
}
ATTACKS = ("clean", "pgd", "autoattack")
ATTACK_LABELS = {"clean": "clean", "pgd": "PGD-20", "autoattack": "AutoAttack"}


@dataclass(frozen=True)
class Study:
    """Settings shared by every run of the study."""

    epochs: int = 10
    eps: float = 0.1
    steps: int = 10
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    aa_samples: int = 180
    aa_fast: bool = False
    ablations: bool = True
    aa_ablations: bool = False  # AutoAttack on the ablation runs too (about 4x their cost)


@dataclass(frozen=True)
class RunSpec:
    """One training run: a variant of a method on a seed."""

    variant: str  # e.g. "TRADES", "TRADES + MemLoss", "TRADES + MemLoss, depth 2"
    method: str
    memory: bool
    seed: int
    overrides: dict[str, Any] = field(default_factory=dict)
    autoattack: bool = True


def plan(study: Study, methods: tuple[str, ...]) -> list[RunSpec]:
    """Every run, seeds outermost so that partial results cover all variants evenly."""
    specs = []
    for seed in study.seeds:
        for method in methods:
            label = METHOD_LABELS[method]
            specs.append(RunSpec(label, method, False, seed))
            specs.append(RunSpec(f"{label} + MemLoss", method, True, seed))
        if study.ablations:
            for name, overrides in ABLATIONS.items():
                variant = f"TRADES + MemLoss, {name}"
                specs.append(RunSpec(variant, "trades", True, seed, overrides, study.aa_ablations))
    return specs


def slug(spec: RunSpec) -> str:
    name = "".join(c if c.isalnum() else "_" for c in spec.variant)
    return f"{name}-seed{spec.seed}"


def train_task(study: Study, spec: RunSpec, models_dir: str) -> dict[str, Any]:
    """Trains one model, measures clean and PGD-20 accuracy and saves the weights (a worker)."""
    from memloss_addon.experiments.datasets import load_digits
    from memloss_addon.experiments.evaluate import evaluate
    from memloss_addon.experiments.train_config import TrainConfig
    from memloss_addon.experiments.training import TrainingRun

    torch.set_num_threads(1)
    splits = load_digits()
    config = TrainConfig(
        method=spec.method,
        epochs=study.epochs,
        eps=study.eps,
        steps=study.steps,
        memory=spec.memory,
        seed=spec.seed,
        **spec.overrides,
    )
    start = time.perf_counter()
    run = TrainingRun(config, splits)
    run.fit()
    trained = time.perf_counter()
    accuracy = evaluate(
        run.model,
        DataLoader(splits.test, batch_size=512),
        eps=study.eps,
        attacks=("clean", "pgd"),
        pgd_steps=20,
        seed=spec.seed,
        progress=False,
    )
    model_path = Path(models_dir) / f"{slug(spec)}.pt"
    torch.save({"model_name": run.model_name, "state": run.model.state_dict()}, model_path)
    return {
        "variant": spec.variant,
        "method": spec.method,
        "memory": spec.memory,
        "seed": spec.seed,
        "overrides": spec.overrides,
        "accuracy": {**accuracy, "autoattack": None},
        "train_seconds": trained - start,
        "pgd_seconds": time.perf_counter() - trained,
        "final_memory_term": float(run.history[-1]["memory_term"]),
        "model_path": str(model_path),
    }


def autoattack_task(study: Study, spec: RunSpec, model_path: str) -> dict[str, Any]:
    """AutoAttack accuracy of a saved model on the first ``aa_samples`` test digits (a worker)."""
    from memloss_addon.experiments.attacks import AutoAttackConfig
    from memloss_addon.experiments.datasets import load_digits
    from memloss_addon.experiments.evaluate import evaluate
    from memloss_addon.experiments.models import build_model

    torch.set_num_threads(1)
    splits = load_digits()
    saved = torch.load(model_path, weights_only=True)
    model = build_model(
        saved["model_name"], sample_shape=splits.sample_shape, num_classes=splits.num_classes
    )
    model.load_state_dict(saved["state"])
    start = time.perf_counter()
    subset = Subset(splits.test, range(min(study.aa_samples, len(splits.test))))
    accuracy = evaluate(
        model,
        DataLoader(subset, batch_size=512),
        eps=study.eps,
        attacks=("autoattack",),
        autoattack=AutoAttackConfig.fast() if study.aa_fast else AutoAttackConfig(),
        seed=spec.seed,
        progress=False,
    )
    return {"autoattack": accuracy["autoattack"], "aa_seconds": time.perf_counter() - start}


def run_all(
    study: Study,
    specs: list[RunSpec],
    *,
    jobs: int,
    log: ResultLog,
    models_dir: Path,
    budget_seconds: float,
) -> tuple[list[dict], int]:
    """Trains every run, then runs AutoAttack on those that ask for it, seed by seed, until the
    time budget is spent. Returns the results and how many AutoAttack runs were not started.

    Runs already in ``log`` (``--resume``) are not repeated: a finished AutoAttack entry is taken
    as it is, and a finished training entry whose weights are still on disk only needs its
    AutoAttack.
    """
    results: dict[int, dict] = {}
    started = time.perf_counter()
    keys = [slug(spec) for spec in specs]
    trained_before, attacked_before = log.done("train"), log.done("autoattack")
    for i, key in enumerate(keys):
        entry = attacked_before.get(key) or trained_before.get(key)
        if entry is not None and (key in attacked_before or Path(entry["model_path"]).exists()):
            results[i] = {k: v for k, v in entry.items() if k not in ("phase", "key")}
    if results:
        print(f"resuming: {len(results)} trained run(s) taken from {log.path}", flush=True)

    def trained(task: tuple[Any, ...], result: dict) -> None:
        i = specs.index(task[2])
        results[i] = result
        log.append({"phase": "train", "key": keys[i], **result})
        acc = result["accuracy"]
        print(
            f"[train {len(results):3d}/{len(specs)} {time.perf_counter() - started:6.0f}s] "
            f"{result['variant']:34s} seed {result['seed']}: clean {acc['clean']:.3f} "
            f"PGD-20 {acc['pgd']:.3f} (train {result['train_seconds']:.0f}s)",
            flush=True,
        )

    attacked = 0

    def robust(task: tuple[Any, ...], outcome: dict) -> None:
        nonlocal attacked
        attacked += 1
        i = specs.index(task[2])
        result = results[i]
        result["accuracy"]["autoattack"] = outcome["autoattack"]
        result["aa_seconds"] = outcome["aa_seconds"]
        log.append({"phase": "autoattack", "key": keys[i], **result})
        print(
            f"[AA {attacked:3d} {time.perf_counter() - started:6.0f}s] {result['variant']:34s} "
            f"seed {result['seed']}: AutoAttack {outcome['autoattack']:.3f} "
            f"({outcome['aa_seconds']:.0f}s)",
            flush=True,
        )

    with make_executor(jobs) as executor:
        train_tasks = [
            (train_task, study, spec, str(models_dir))
            for i, spec in enumerate(specs)
            if i not in results
        ]
        run_tasks(executor, train_tasks, jobs=jobs, on_done=trained)
        order = sorted(
            (
                s
                for i, s in enumerate(specs)
                if s.autoattack and results[i]["accuracy"]["autoattack"] is None
            ),
            key=lambda s: s.seed,
        )
        aa_tasks = [
            (autoattack_task, study, spec, results[specs.index(spec)]["model_path"])
            for spec in order
        ]
        skipped = run_tasks(
            executor, aa_tasks, jobs=jobs, deadline=started + budget_seconds, on_done=robust
        )
    return [results[i] for i in sorted(results)], skipped


def by_variant(results: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """``{variant: {attack: {seed: accuracy}}}``, leaving out metrics that were not measured."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for result in sorted(results, key=lambda r: r["seed"]):
        row = table.setdefault(result["variant"], {a: {} for a in ATTACKS})
        for attack in ATTACKS:
            if result["accuracy"].get(attack) is not None:
                row[attack][result["seed"]] = result["accuracy"][attack]
    return table


def comparisons(results: list[dict]) -> list[tuple[str, str]]:
    """(reference, variant) pairs: each method with vs without MemLoss, each ablation vs TRADES."""
    variants = {r["variant"] for r in results}
    pairs = []
    for method in METHODS:
        base, with_memory = METHOD_LABELS[method], f"{METHOD_LABELS[method]} + MemLoss"
        if base in variants and with_memory in variants:
            pairs.append((base, with_memory))
    for name in ABLATIONS:
        variant = f"TRADES + MemLoss, {name}"
        if variant in variants and "TRADES + MemLoss" in variants:
            pairs.append(("TRADES + MemLoss", variant))
    return pairs


def format_tables(results: list[dict], study: Study) -> str:
    table = by_variant(results)
    lines = [
        f"Accuracy in % (mean ± std over {len(study.seeds)} seeds); clean and PGD-20 on all 360 "
        f"test digits, AutoAttack on the first {study.aa_samples} (n/a: not run, see the text).",
        "",
        "| variant | clean | PGD-20 | AutoAttack | runs |",
        "|---|---|---|---|---|",
    ]
    for variant, row in table.items():
        cells = [cell(list(row[a].values()), len(study.seeds)) for a in ATTACKS]
        lines.append(f"| {variant} | {' | '.join(cells)} | {len(row['clean'])} |")
    lines += [
        "",
        "Differences (variant minus reference, percentage points, over the seeds both have). "
        "'exceeds spread': |mean difference| > pooled seed-to-seed std; p: Welch's t-test, "
        "two-sided.",
        "",
        "| reference | variant | metric | seeds | difference | pooled std | exceeds spread | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for reference, variant in comparisons(results):
        for attack in ATTACKS:
            seeds = sorted(set(table[reference][attack]) & set(table[variant][attack]))
            if not seeds:
                continue
            a = [table[reference][attack][s] for s in seeds]
            b = [table[variant][attack][s] for s in seeds]
            diff = 100 * (statistics.fmean(b) - statistics.fmean(a))
            pooled = 100 * pooled_std(a, b)
            exceeds = ("yes" if abs(diff) > pooled else "no") if len(seeds) > 1 else "n/a"
            p = welch_p(a, b)
            lines.append(
                f"| {reference} | {variant} | {ATTACK_LABELS[attack]} | {len(seeds)} | "
                f"{diff:+.2f} | {pooled:.2f} | {exceeds} | {p:.3f} |"
            )
    return "\n".join(lines)


def plot_tradeoff(results: list[dict], path: Path) -> bool:
    """Clean against AutoAttack accuracy, one point per run; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    colors = plt.get_cmap("tab10")
    main = [r for r in results if not r["overrides"]]
    main_metric = "autoattack"
    if all(r["accuracy"]["autoattack"] is None for r in main):
        main_metric = "pgd"
    main = [r for r in main if r["accuracy"][main_metric] is not None]
    for i, method in enumerate(METHODS):
        for memory, marker in ((False, "o"), (True, "^")):
            runs = [r for r in main if r["method"] == method and r["memory"] == memory]
            if runs:
                axes[0].scatter(
                    [100 * r["accuracy"]["clean"] for r in runs],
                    [100 * r["accuracy"][main_metric] for r in runs],
                    color=colors(i),
                    marker=marker,
                    facecolors=colors(i) if memory else "none",
                    label=f"{METHOD_LABELS[method]}{' + MemLoss' if memory else ''}",
                )
    axes[0].set_title("Base methods (hollow circles) and + MemLoss (filled triangles)")
    trades = [r for r in results if r["method"] == "trades" and r["memory"]]
    robust = "autoattack"
    if any(r["accuracy"]["autoattack"] is None for r in trades):
        robust = "pgd"  # ablations without AutoAttack: PGD-20 for every point of this panel
    for i, variant in enumerate(sorted({r["variant"] for r in trades})):
        runs = [r for r in trades if r["variant"] == variant]
        axes[1].scatter(
            [100 * r["accuracy"]["clean"] for r in runs],
            [100 * r["accuracy"][robust] for r in runs],
            color=colors(i),
            label=variant.replace("TRADES + MemLoss, ", "T+M, ") or variant,
        )
    axes[1].set_title("Ablations of TRADES + MemLoss (T+M)")
    for ax, metric in zip(axes, (main_metric, robust), strict=True):
        ax.set_xlabel("clean accuracy (%)")
        ax.set_ylabel(f"{ATTACK_LABELS[metric]} accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one tiny TRADES pair (for tests)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--aa-samples", type=int, default=180, help="test digits for AutoAttack")
    parser.add_argument("--aa-ablations", action="store_true", help="AutoAttack on ablations too")
    parser.add_argument(
        "--budget-minutes",
        type=float,
        default=35.0,
        help="start no AutoAttack evaluation after this many minutes (training always finishes)",
    )
    parser.add_argument("--models", default=None, help="folder for the trained weights (temp)")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in accuracy_runs.jsonl (with --models: their weights)",
    )
    parser.add_argument("--out", default=None, help="output folder (default: results/)")
    args = parser.parse_args(argv)
    if args.smoke:
        study = Study(epochs=2, steps=2, seeds=(0,), aa_samples=16, aa_fast=True, ablations=False)
        methods: tuple[str, ...] = ("trades",)
        jobs = 1
    else:
        study = Study(
            epochs=args.epochs,
            seeds=tuple(range(args.seeds)),
            aa_samples=args.aa_samples,
            aa_ablations=args.aa_ablations,
        )
        methods = METHODS
        jobs = args.jobs
    out = Path(args.out) if args.out else (None if args.smoke else RESULTS_DIR)
    meta = run_metadata([sys.executable, *sys.argv])
    print_metadata(meta)
    specs = plan(study, methods)
    print(
        f"{len(specs)} runs: {study.epochs} epochs, eps {study.eps}, {study.steps} attack steps, "
        f"seeds {list(study.seeds)}, {jobs} worker process(es); AutoAttack "
        f"{'fast (smoke only)' if study.aa_fast else 'at reference counts'} on "
        f"{study.aa_samples} test digits"
    )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    log = ResultLog(out / "accuracy_runs.jsonl" if out else None, resume=args.resume)
    start = time.perf_counter()
    budget = math.inf if args.smoke else 60 * args.budget_minutes
    with tempfile.TemporaryDirectory() as scratch:
        models_dir = Path(args.models) if args.models else Path(scratch)
        models_dir.mkdir(parents=True, exist_ok=True)
        results, skipped = run_all(
            study, specs, jobs=jobs, log=log, models_dir=models_dir, budget_seconds=budget
        )
    meta["autoattack_runs_not_started"] = skipped
    if skipped:
        print(
            f"\nThe time budget ran out: {skipped} AutoAttack evaluation(s) were not started "
            "(AutoAttack cells give the number of runs measured)."
        )
    tables = format_tables(results, study)
    print()
    print(tables)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s")
    if out is not None:
        meta["wall_seconds"] = time.perf_counter() - start
        meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        write_json(
            out / "accuracy.json",
            {"meta": meta, "study": study.__dict__, "runs": results},
        )
        (out / "accuracy.md").write_text(tables + "\n")
        if plot_tradeoff(results, out / "accuracy_tradeoff.png"):
            print(f"wrote {out / 'accuracy_tradeoff.png'}")
        print(f"wrote {out / 'accuracy.json'} and {out / 'accuracy.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
