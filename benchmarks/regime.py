"""The long-training regime on digits: does MemLoss change forgetting, robust overfitting, both?

Usage:
    python benchmarks/regime.py [--smoke] [--jobs N] [--seeds N] [--aa-samples N]
                                [--budget-minutes M] [--out DIR] [--fresh]

Issue 12, section 3. TRADES, PGD-AT and HAT, each without and with MemLoss (beta' 2, depth 1),
both arms with the memory's forgetting diagnostics on (without MemLoss the memory has weight 0:
it only classifies its rows, and training is the base method's); eps 0.1 and 0.2; epoch budgets
15, 40 and 100, the learning rate dropping x0.1 at 75% and 90% of each budget (every method,
HAT's one-cycle replaced by the same piecewise schedule); 10 attack steps of eps/4; seeds 0 to
N-1. The default digits model (an MLP with BatchNorm). ``--holdout`` training digits (stratified,
the same for every run) are held out of training to pick the best epoch by PGD-20 accuracy.

Per run: the per-epoch records (loss, term, mean weight, memory accuracy, rows forgotten,
recovered and classified, clean and PGD-20 accuracy on the first ``--curve-samples`` test
digits, hold-out PGD-20, learning rate, seconds); at the end clean and PGD-20 (all 360 test
digits) and AutoAttack at the reference counts (first ``--aa-samples`` test digits) of the last
epoch's model and of the best epoch's (by hold-out PGD-20; evaluated once when it is the last).

Quantities compared, MemLoss minus base, paired by seed (mean ± std of the per-seed differences,
95% t interval): robust accuracy of the last and the best checkpoint; forgetting, as the fraction
of classified memory rows forgotten (did not fool the model when made, fool it when read an
epoch later) over the run, and the final epoch's memory accuracy; robust overfitting, as best
minus last test accuracy (PGD-20 and AutoAttack) and, from the curve, the peak minus the final
PGD-20 accuracy.

Outputs in ``--out`` (default ``benchmarks/results``): ``regime_runs.jsonl`` (one line per
finished run, written as it finishes; a restarted study skips the runs already there unless
``--fresh``), ``regime.json`` (every run with its curves, and the summary), ``regime.md`` (the
tables), ``regime_forgetting.png`` and ``regime_robustness.png`` (per-epoch forgetting and test
PGD-20 accuracy, base against + MemLoss, mean over seeds). No run starts after
``--budget-minutes``; the tables then say how many seeds each cell has, and a rerun continues.

``--smoke``: TRADES and HAT at eps 0.1, budgets 2 and 3 epochs, 2 attack steps, 2 seeds, a
shortened AutoAttack on 16 digits: for tests, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, print_metadata, run_metadata, write_json
from _study import ResultLog, cell, make_executor, paired, run_tasks, yes_no

METHOD_LABELS = {"trades": "TRADES", "pgd_at": "PGD-AT", "hat": "HAT"}
ATTACKS = ("clean", "pgd", "autoattack")
ARMS = ("base", "+ MemLoss")

# Per-run quantities compared between the arms: (key, label, in percent?).
QUANTITIES: tuple[tuple[str, str, bool], ...] = (
    ("last_autoattack", "AutoAttack, last", True),
    ("best_autoattack", "AutoAttack, best", True),
    ("last_pgd", "PGD-20, last", True),
    ("best_pgd", "PGD-20, best", True),
    ("last_clean", "clean, last", True),
    ("best_clean", "clean, best", True),
    ("forgetting_rate", "forgotten / classified rows", True),
    ("final_memory_accuracy", "memory accuracy, last epoch", True),
    ("overfit_autoattack", "best − last, AutoAttack", True),
    ("overfit_pgd", "best − last, PGD-20", True),
    ("curve_drop_pgd", "curve peak − final, PGD-20", True),
)
ROBUST = ("last_autoattack", "best_autoattack", "last_pgd", "best_pgd")


@dataclass(frozen=True)
class Study:
    """Settings shared by every run."""

    methods: tuple[str, ...] = ("trades", "pgd_at", "hat")
    eps_values: tuple[float, ...] = (0.1, 0.2)
    budgets: tuple[int, ...] = (15, 40, 100)
    milestones: tuple[float, ...] = (0.75, 0.9)
    steps: int = 10
    beta_prime: float = 2.0
    depth: int = 1
    holdout: int = 200
    curve_samples: int = 180
    aa_samples: int = 120
    aa_fast: bool = False
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)

    def signature(self) -> str:
        """A short hash of the settings that change a run's numbers (part of each run's key)."""
        values = {
            k: v
            for k, v in asdict(self).items()
            if k not in ("seeds", "methods", "eps_values", "budgets")
        }
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunSpec:
    method: str
    memory: bool
    eps: float
    epochs: int
    seed: int

    @property
    def arm(self) -> str:
        return ARMS[self.memory]

    @property
    def cell(self) -> str:
        return cell_name(self.method, self.eps, self.epochs)


def cell_name(method: str, eps: float, epochs: int) -> str:
    return f"{METHOD_LABELS[method]}, eps {eps:g}, {epochs} epochs"


def plan(study: Study) -> list[RunSpec]:
    """Every run: seeds outermost (a partial study covers every cell evenly), the longest runs of
    a seed first (so that two workers finish together)."""
    return [
        RunSpec(method, memory, eps, epochs, seed)
        for seed in study.seeds
        for epochs in sorted(study.budgets, reverse=True)
        for method in study.methods
        for eps in study.eps_values
        for memory in (False, True)
    ]


def run_key(spec: RunSpec, study: Study) -> str:
    return (
        f"{spec.method}-{'memloss' if spec.memory else 'base'}-eps{spec.eps:g}-"
        f"{spec.epochs}ep-seed{spec.seed}-{study.signature()}"
    )


# -- one run (in a worker process) -----------------------------------------------------------


def train_and_evaluate(study: Study, spec: RunSpec) -> dict[str, Any]:
    """Trains one run with diagnostics, then evaluates its last and best checkpoints."""
    from torch.utils.data import DataLoader, Subset

    from memloss_addon.experiments.attacks import AutoAttackConfig
    from memloss_addon.experiments.datasets import load_digits
    from memloss_addon.experiments.evaluate import evaluate
    from memloss_addon.experiments.train_config import TrainConfig
    from memloss_addon.experiments.training import TrainingRun

    torch.set_num_threads(1)
    splits = load_digits()
    config = TrainConfig(
        method=spec.method,
        epochs=spec.epochs,
        eps=spec.eps,
        steps=study.steps,
        memory=spec.memory,
        beta_prime=study.beta_prime,
        depth=study.depth,
        diagnostics=True,
        milestones=study.milestones,
        holdout=study.holdout,
        curve_samples=study.curve_samples,
        seed=spec.seed,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    run = TrainingRun(config, splits)
    epochs = [asdict(stats) for stats in run.fit()]
    train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall
    start = time.process_time()
    test = DataLoader(splits.test, batch_size=512)
    aa_subset = DataLoader(
        Subset(splits.test, range(min(study.aa_samples, len(splits.test)))), batch_size=512
    )

    def measure(model: torch.nn.Module) -> dict[str, float]:
        accuracy = evaluate(
            model, test, eps=spec.eps, attacks=("clean", "pgd"), seed=spec.seed, progress=False
        )
        accuracy.update(
            evaluate(
                model,
                aa_subset,
                eps=spec.eps,
                attacks=("autoattack",),
                autoattack=AutoAttackConfig.fast() if study.aa_fast else AutoAttackConfig(),
                seed=spec.seed,
                progress=False,
            )
        )
        return accuracy

    last = measure(run.model_with("last"))
    best_epoch = int(run.best["epoch"])
    best = dict(last) if best_epoch == len(epochs) else measure(run.model_with("best"))
    return {
        **asdict(spec),
        "arm": spec.arm,
        "cell": spec.cell,
        "best_epoch": best_epoch,
        "last": last,
        "best": best,
        "train_cpu_seconds": train_cpu,
        "train_wall_seconds": train_wall,
        "eval_cpu_seconds": time.process_time() - start,
        "epochs": epochs,
    }


# -- per-run quantities and the summary ------------------------------------------------------


def run_quantities(run: dict[str, Any]) -> dict[str, float]:
    """The compared quantities of one run (fractions, not percent)."""
    epochs = run["epochs"]
    classified = sum(e["rows_classified"] for e in epochs)
    forgotten = sum(e["rows_forgotten"] for e in epochs)
    curve = [e["curve_pgd_accuracy"] for e in epochs if e.get("curve_pgd_accuracy") is not None]
    memory_accuracy = [e["memory_accuracy"] for e in epochs if e.get("memory_accuracy") is not None]
    q = {f"{ckpt}_{a}": run[ckpt][a] for ckpt in ("last", "best") for a in ATTACKS}
    q["forgetting_rate"] = forgotten / classified if classified else math.nan
    q["final_memory_accuracy"] = memory_accuracy[-1] if memory_accuracy else math.nan
    q["overfit_autoattack"] = run["best"]["autoattack"] - run["last"]["autoattack"]
    q["overfit_pgd"] = run["best"]["pgd"] - run["last"]["pgd"]
    q["curve_drop_pgd"] = (max(curve) - curve[-1]) if curve else math.nan
    return q


def by_cell(runs: list[dict]) -> dict[str, dict[str, dict[str, dict[int, float]]]]:
    """``{cell: {arm: {quantity: {seed: value}}}}``."""
    table: dict[str, dict[str, dict[str, dict[int, float]]]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        row = table.setdefault(run["cell"], {arm: {} for arm in ARMS})
        for name, value in run_quantities(run).items():
            row[run["arm"]].setdefault(name, {})[run["seed"]] = value
    return table


def cell_order(study: Study) -> list[str]:
    return [
        cell_name(m, e, b) for m in study.methods for e in study.eps_values for b in study.budgets
    ]


def summarize(runs: list[dict], study: Study) -> dict[str, Any]:
    """Per cell and quantity: each arm's mean and std, and the paired difference."""
    table = by_cell(runs)
    cells: dict[str, Any] = {}
    for name in cell_order(study):
        if name not in table:
            continue
        base, memory = table[name]["base"], table[name]["+ MemLoss"]
        entry: dict[str, Any] = {}
        for key, _, _ in QUANTITIES:
            a, b = base.get(key, {}), memory.get(key, {})
            p = paired(a, b)
            entry[key] = {
                "base": list(a.values()),
                "memloss": list(b.values()),
                "paired": p.to_dict() if p else None,
            }
        cells[name] = entry
    return {"cells": cells, "together": together(cells)}


def together(cells: dict[str, Any]) -> dict[str, Any]:
    """Across cells, do the paired changes in forgetting and in overfitting (and in robust
    accuracy) go together? Pearson correlations of the cells' mean differences."""
    pairs = {
        "forgetting vs overfit (PGD-20 best − last)": ("forgetting_rate", "overfit_pgd"),
        "forgetting vs overfit (curve peak − final)": ("forgetting_rate", "curve_drop_pgd"),
        "forgetting vs AutoAttack (last)": ("forgetting_rate", "last_autoattack"),
        "forgetting vs AutoAttack (best)": ("forgetting_rate", "best_autoattack"),
    }
    found = {}
    for label, (x_key, y_key) in pairs.items():
        xs, ys = [], []
        for entry in cells.values():
            px, py = entry[x_key]["paired"], entry[y_key]["paired"]
            if px and py and math.isfinite(px["diff"]) and math.isfinite(py["diff"]):
                xs.append(px["diff"])
                ys.append(py["diff"])
        found[label] = {"n": len(xs), "r": pearson(xs, ys)}
    return found


def pearson(xs: list[float], ys: list[float]) -> float:
    if len(xs) < 3 or statistics.pstdev(xs) == 0 or statistics.pstdev(ys) == 0:
        return math.nan
    return statistics.correlation(xs, ys)


# -- tables and plots ------------------------------------------------------------------------


def pp(p: dict[str, Any] | None) -> str:
    if p is None:
        return "n/a"
    text = f"{100 * p['diff']:+.2f} ± {100 * p['diff_std']:.2f}"
    if len(p["seeds"]) > 1:
        text += f" [{100 * p['ci_low']:+.2f}, {100 * p['ci_high']:+.2f}]"
    return text


def format_tables(summary: dict[str, Any], study: Study) -> str:
    n = len(study.seeds)
    cells = summary["cells"]
    lines = [
        f"Digits; {study.steps} attack steps of eps/4; LR x0.1 at "
        f"{', '.join(f'{100 * m:g}%' for m in study.milestones)} of each budget; hold-out "
        f"{study.holdout} training digits for the best epoch; clean and PGD-20 on all 360 test "
        f"digits, AutoAttack (reference counts{', FAST: smoke only' if study.aa_fast else ''}) "
        f"on the first {study.aa_samples}; per-epoch curve on the first {study.curve_samples}. "
        f"Accuracy in %, mean ± std over {n} seeds (n when fewer). Δ: + MemLoss minus base, "
        "paired by seed, ± std of the per-seed differences, [95% t interval]; 'beyond noise': "
        "the interval excludes 0.",
        "",
        "### Robust accuracy",
        "",
        "| cell | AutoAttack last, base | + MemLoss | Δ | beyond noise | AutoAttack best, base | "
        "+ MemLoss | Δ | beyond noise | Δ PGD-20 last | Δ PGD-20 best |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in cells.items():
        la, ba = e["last_autoattack"], e["best_autoattack"]
        lines.append(
            f"| {name} | {cell(la['base'], n)} | {cell(la['memloss'], n)} | {pp(la['paired'])} | "
            f"{verdict(la)} | {cell(ba['base'], n)} | {cell(ba['memloss'], n)} | "
            f"{pp(ba['paired'])} | {verdict(ba)} | {pp(e['last_pgd']['paired'])} | "
            f"{pp(e['best_pgd']['paired'])} |"
        )
    lines += [
        "",
        "### Clean accuracy",
        "",
        "| cell | clean last, base | + MemLoss | Δ | beyond noise | Δ clean best |",
        "|---|---|---|---|---|---|",
    ]
    for name, e in cells.items():
        c = e["last_clean"]
        lines.append(
            f"| {name} | {cell(c['base'], n)} | {cell(c['memloss'], n)} | {pp(c['paired'])} | "
            f"{verdict(c)} | {pp(e['best_clean']['paired'])} |"
        )
    lines += [
        "",
        "### Forgetting and robust overfitting",
        "",
        "Forgetting: memory rows that did not fool the model when made and fool it when read "
        "an epoch later, as a % of the rows classified over the run. Overfitting: best (by "
        "hold-out PGD-20) minus last checkpoint's test accuracy, and the test curve's peak "
        "minus its final PGD-20 accuracy.",
        "",
        "| cell | forgotten %, base | + MemLoss | Δ | beyond noise | memory acc. last, Δ | "
        "best − last PGD-20, base | + MemLoss | Δ | beyond noise | Δ best − last AA | "
        "Δ curve peak − final |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in cells.items():
        f, o = e["forgetting_rate"], e["overfit_pgd"]
        lines.append(
            f"| {name} | {cell(f['base'], n)} | {cell(f['memloss'], n)} | {pp(f['paired'])} | "
            f"{verdict(f)} | {pp(e['final_memory_accuracy']['paired'])} | "
            f"{cell(o['base'], n)} | {cell(o['memloss'], n)} | {pp(o['paired'])} | "
            f"{verdict(o)} | {pp(e['overfit_autoattack']['paired'])} | "
            f"{pp(e['curve_drop_pgd']['paired'])} |"
        )
    lines += [
        "",
        "### Do they go together?",
        "",
        "Pearson correlation, across cells, of the paired mean differences (+ MemLoss minus base).",
        "",
        "| pair | cells | r |",
        "|---|---|---|",
    ]
    for label, t in summary["together"].items():
        lines.append(f"| {label} | {t['n']} | {t['r']:.2f} |")
    counts = {
        key: sum(
            1 for e in cells.values() if e[key]["paired"] and e[key]["paired"]["ci_excludes_zero"]
        )
        for key, _, _ in QUANTITIES
    }
    lines += [
        "",
        f"Cells where the 95% interval excludes 0 (of {len(cells)}; about 5% expected by "
        "chance alone): "
        + "; ".join(f"{label}: {counts[key]}" for key, label, _ in QUANTITIES)
        + ".",
    ]
    return "\n".join(lines)


def verdict(entry: dict[str, Any]) -> str:
    p = entry["paired"]
    return "n/a" if p is None else yes_no(p["ci_excludes_zero"])


def mean_curves(runs: list[dict], key: str) -> dict[tuple[str, str], list[float]]:
    """``{(cell, arm): per-epoch mean over seeds}`` of a per-epoch quantity (``key`` may be
    ``"forgetting"``: rows forgotten / rows classified in the epoch)."""
    grouped: dict[tuple[str, str], list[list[float]]] = {}
    for run in runs:
        values = []
        for e in run["epochs"]:
            if key == "forgetting":
                values.append(
                    e["rows_forgotten"] / e["rows_classified"] if e["rows_classified"] else math.nan
                )
            else:
                values.append(math.nan if e.get(key) is None else e[key])
        grouped.setdefault((run["cell"], run["arm"]), []).append(values)
    return {
        k: [statistics.fmean(col) for col in zip(*curves, strict=True)]
        for k, curves in grouped.items()
    }


def plot_curves(runs: list[dict], study: Study, key: str, ylabel: str, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    curves = mean_curves(runs, key)
    rows = [(m, e) for m in study.methods for e in study.eps_values]
    fig, axes = plt.subplots(
        len(rows),
        len(study.budgets),
        figsize=(4.2 * len(study.budgets), 2.6 * len(rows)),
        squeeze=False,
    )
    for i, (method, eps) in enumerate(rows):
        for j, budget in enumerate(study.budgets):
            ax = axes[i][j]
            name = cell_name(method, eps, budget)
            for arm, color in zip(ARMS, ("black", "tab:orange"), strict=True):
                values = curves.get((name, arm))
                if values:
                    ax.plot(range(1, len(values) + 1), [100 * v for v in values], color=color,
                            label=arm, lw=1.2)  # fmt: skip
            for m in study.milestones:
                ax.axvline(m * budget, color="grey", ls=":", lw=0.7)
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("epoch", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny study (for tests)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--aa-samples", type=int, default=120, help="test digits for AutoAttack")
    parser.add_argument("--curve-samples", type=int, default=180, help="test digits per epoch")
    parser.add_argument("--holdout", type=int, default=200, help="held-out training digits")
    parser.add_argument(
        "--budget-minutes", type=float, default=85.0, help="start no run after this many minutes"
    )
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    parser.add_argument("--fresh", action="store_true", help="ignore runs already in the log")
    args = parser.parse_args(argv)
    if args.smoke:
        study = Study(
            methods=("trades", "hat"),
            eps_values=(0.1,),
            budgets=(2, 3),
            steps=2,
            holdout=50,
            curve_samples=32,
            aa_samples=16,
            aa_fast=True,
            seeds=(0, 1),
        )
    else:
        study = Study(
            seeds=tuple(range(args.seeds)),
            aa_samples=args.aa_samples,
            curve_samples=args.curve_samples,
            holdout=args.holdout,
        )
    out = Path(args.out) if args.out else (None if args.smoke else RESULTS_DIR)
    meta = run_metadata([sys.executable, *sys.argv])
    print_metadata(meta)
    specs = plan(study)
    log = ResultLog(out / "regime_runs.jsonl" if out else None, resume=not args.fresh)
    keys = {run_key(spec, study): spec for spec in specs}
    results, todo = log.split(keys)
    meta["runs_taken_from_log"] = len(results)  # the rest were run by this invocation
    print(
        f"{len(specs)} runs, {len(results)} already done; {sum(s.epochs for s in todo)} epochs "
        f"to train; {args.jobs} worker process(es); AutoAttack "
        f"{'fast (smoke only)' if study.aa_fast else 'at reference counts'} on "
        f"{study.aa_samples} test digits",
        flush=True,
    )
    start = time.perf_counter()

    def finished(task: tuple[Any, ...], result: dict) -> None:
        key = run_key(task[2], study)
        results[key] = {"key": key, **result}
        log.append(results[key])
        last, best = result["last"], result["best"]
        print(
            f"[{len(results):3d}/{len(specs)} {time.perf_counter() - start:6.0f}s] "
            f"{result['cell']:32s} {result['arm']:9s} seed {result['seed']}: AA last "
            f"{last['autoattack']:.3f} best {best['autoattack']:.3f} (epoch "
            f"{result['best_epoch']}); train {result['train_cpu_seconds']:.0f} CPU s, eval "
            f"{result['eval_cpu_seconds']:.0f}",
            flush=True,
        )

    deadline = math.inf if args.smoke else start + 60 * args.budget_minutes
    with make_executor(args.jobs) as executor:
        tasks = [(train_and_evaluate, study, spec) for spec in todo]
        not_started = run_tasks(
            executor, tasks, jobs=args.jobs, deadline=deadline, on_done=finished
        )
    if not_started:
        print(f"\nthe time budget ran out: {not_started} run(s) not started (rerun to continue)")
    runs = [results[k] for k in keys if k in results]
    summary = summarize(runs, study)
    tables = format_tables(summary, study)
    print()
    print(tables)
    print(f"\nwall time of this invocation {time.perf_counter() - start:.0f} s")
    if out is not None:
        meta["wall_seconds_this_invocation"] = time.perf_counter() - start
        meta["runs_not_started"] = not_started
        meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        write_json(
            out / "regime.json",
            {"meta": meta, "study": asdict(study), "summary": summary, "runs": runs},
        )
        (out / "regime.md").write_text(tables + "\n")
        for key, label, name in (
            ("forgetting", "forgotten / classified (%)", "regime_forgetting.png"),
            ("curve_pgd_accuracy", "test PGD-20 (%)", "regime_robustness.png"),
        ):
            if plot_curves(runs, study, key, label, out / name):
                print(f"wrote {out / name}")
        print(f"wrote {out / 'regime.json'} and {out / 'regime.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
