"""Robust accuracy per unit of training cost on digits: memory-started attacks and MemLoss.

Usage:
    python benchmarks/efficiency.py [--smoke] [--jobs N] [--seeds N] [--aa-samples N]
                                    [--out DIR] [--fresh]

Issue 11, section 4. For TRADES and PGD-AT, every arm trains the default digits model (an MLP
with BatchNorm) with ``memloss_addon.experiments.training.TrainingRun`` for ``--epochs`` epochs
at eps 0.1, attack step eps/4, on each seed:

- ``M-10``: the base method with 10 attack steps from its usual start (the reference);
- ``M-10 + MemLoss`` and ``M-10 + MemLoss, replay 0.5``: with the MemLoss term (beta' 2,
  depth 1), replaying every filled memory row or the hardest half (``replay_fraction``);
- ``M-s, memory start`` for s = 1, 2, 3, 5: ``attack_init="memory"``, each attack starts from the
  sample's previous adversarial example (ATTA-style accumulation, no reset), without the term;
- ``M-s, memory start + MemLoss`` and ``..., replay 0.5``: the same with the term.

Per run: clean and PGD-20 accuracy (step 2.5 eps/20, random start) on all 360 test digits,
AutoAttack at the reference counts (APGD-CE 100, APGD-T 100 x 9, FAB-T 100 x 9, Square 5000) on
the first ``--aa-samples`` test digits (the same digits for every run), and the training CPU
seconds per epoch of the worker process (``time.process_time``, the mean over the run's epochs
from its per-epoch records; the epoch's own test evaluations are not in it). Every pair of arms
shares its seeds (initialisation, data order, attack starts), so differences and cost ratios are
paired by seed.

Outputs in ``--out`` (default ``benchmarks/results``): ``efficiency_runs.jsonl`` (one line per
finished run, written as it finishes; a restarted study skips the runs already there unless
``--fresh``), ``efficiency.json`` (every run and the summary), ``efficiency.md`` (the tables)
and ``efficiency.png`` (AutoAttack accuracy against training CPU seconds per epoch, one point per
arm, error bars one seed-to-seed standard deviation).

``--smoke`` trains TRADES with 2 steps (and memory-started 1 step) for 2 epochs on 2 seeds with a
shortened AutoAttack on 16 digits: for tests, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _common import RESULTS_DIR, print_metadata, run_metadata, write_json
from _study import (
    ResultLog,
    make_executor,
    mean_std,
    paired,
    paired_ratio,
    run_tasks,
    yes_no,
)

METHOD_LABELS = {"trades": "TRADES", "pgd_at": "PGD-AT"}
METRICS = ("clean", "pgd", "autoattack")
METRIC_LABELS = {"clean": "clean", "pgd": "PGD-20", "autoattack": "AutoAttack"}
COST_TARGET = 0.6  # training cost of the goal, as a fraction of base TRADES-10's


@dataclass(frozen=True)
class Study:
    """Settings shared by every run."""

    methods: tuple[str, ...] = ("trades", "pgd_at")
    epochs: int = 15
    eps: float = 0.1
    base_steps: int = 10
    memory_steps: tuple[int, ...] = (1, 2, 3, 5)
    replay_fractions: tuple[float, ...] = (1.0, 0.5)
    beta_prime: float = 2.0
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    aa_samples: int = 180
    aa_fast: bool = False

    def signature(self) -> str:
        """A short hash of the settings that change a run's numbers (part of each run's key)."""
        values = {k: v for k, v in asdict(self).items() if k != "seeds"}
        return hashlib.sha1(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class RunSpec:
    """One training run: an arm of a method on a seed."""

    arm: str
    method: str
    steps: int
    attack_init: str  # "random" (the method's usual start) or "memory"
    memory: bool  # MemLoss term on
    replay_fraction: float
    seed: int

    @property
    def kind(self) -> str:
        """``base``, ``base + MemLoss``, ``memory start`` or ``memory start + MemLoss``."""
        start = "memory start" if self.attack_init == "memory" else "base"
        return f"{start} + MemLoss" if self.memory else start


def base_arm(method: str, study: Study) -> str:
    return f"{METHOD_LABELS[method]}-{study.base_steps}"


def arms(study: Study) -> list[dict[str, Any]]:
    """Every arm, as the keyword arguments of a :class:`RunSpec` without the seed."""
    found = []

    def memloss_arms(name: str, **kw: Any) -> None:
        for fraction in study.replay_fractions:
            suffix = "" if fraction == 1.0 else f", replay {fraction:g}"
            found.append({"arm": f"{name} + MemLoss{suffix}", "memory": True,
                          "replay_fraction": fraction, **kw})  # fmt: skip

    for method in study.methods:
        base = base_arm(method, study)
        common = {"method": method, "steps": study.base_steps, "attack_init": "random"}
        found.append({"arm": base, "memory": False, "replay_fraction": 1.0, **common})
        memloss_arms(base, **common)
        for steps in study.memory_steps:
            name = f"{METHOD_LABELS[method]}-{steps}, memory start"
            common = {"method": method, "steps": steps, "attack_init": "memory"}
            found.append({"arm": name, "memory": False, "replay_fraction": 1.0, **common})
            memloss_arms(name, **common)
    return found


def plan(study: Study) -> list[RunSpec]:
    """Every run, seeds outermost so that a partial study covers the arms evenly."""
    return [RunSpec(seed=seed, **arm) for seed in study.seeds for arm in arms(study)]


def run_key(spec: RunSpec, study: Study) -> str:
    name = "".join(c if c.isalnum() else "_" for c in spec.arm)
    return f"{name}-seed{spec.seed}-{study.signature()}"


# -- one run (in a worker process) -----------------------------------------------------------


def train_and_evaluate(study: Study, spec: RunSpec) -> dict[str, Any]:
    """Trains one run, then measures its accuracy (a worker)."""
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
        epochs=study.epochs,
        eps=study.eps,
        steps=spec.steps,
        memory=spec.memory,
        beta_prime=study.beta_prime,
        attack_init=spec.attack_init,
        replay_fraction=spec.replay_fraction,
        seed=spec.seed,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    run = TrainingRun(config, splits)
    epochs = [asdict(stats) for stats in run.fit()]
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    test = DataLoader(splits.test, batch_size=512)
    start = time.process_time()
    accuracy = evaluate(
        run.model, test, eps=study.eps, attacks=("clean", "pgd"), seed=spec.seed, progress=False
    )
    subset = Subset(splits.test, range(min(study.aa_samples, len(splits.test))))
    accuracy.update(
        evaluate(
            run.model,
            DataLoader(subset, batch_size=512),
            eps=study.eps,
            attacks=("autoattack",),
            autoattack=AutoAttackConfig.fast() if study.aa_fast else AutoAttackConfig(),
            seed=spec.seed,
            progress=False,
        )
    )
    return {
        **asdict(spec),
        "kind": spec.kind,
        "accuracy": accuracy,
        "cpu_per_epoch": cpu_per_epoch(epochs),
        "train_cpu_seconds": train_cpu,
        "train_wall_seconds": train_wall,
        "eval_cpu_seconds": time.process_time() - start,
        "epochs": epochs,
    }


def cpu_per_epoch(epochs: list[dict[str, Any]]) -> float:
    """Mean training CPU seconds per epoch of the per-epoch records."""
    return sum(e["cpu_seconds"] for e in epochs) / len(epochs)


# -- the summary -----------------------------------------------------------------------------


def by_arm(runs: list[dict]) -> dict[str, dict[str, dict[int, float]]]:
    """``{arm: {quantity: {seed: value}}}`` for the metrics, ``cost`` and ``gap`` (PGD-20 minus
    AutoAttack accuracy), in the order the arms first appear."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    for run in sorted(runs, key=lambda r: r["seed"]):
        row = table.setdefault(run["arm"], {q: {} for q in (*METRICS, "cost", "gap")})
        for metric in METRICS:
            row[metric][run["seed"]] = run["accuracy"][metric]
        row["cost"][run["seed"]] = run["cpu_per_epoch"]
        row["gap"][run["seed"]] = run["accuracy"]["pgd"] - run["accuracy"]["autoattack"]
    return table


def summarize(runs: list[dict], study: Study) -> dict[str, Any]:
    """Per-arm means and spreads; paired-by-seed comparisons; the goal; the Pareto front."""
    table = by_arm(runs)
    info = {r["arm"]: r for r in runs}
    reference = base_arm("trades", study) if "trades" in study.methods else None
    summary: dict[str, Any] = {"reference": reference, "cost_target": COST_TARGET, "arms": {}}

    def compare(a: str, b: str) -> dict[str, Any]:
        found = {q: paired(table[a][q], table[b][q]) for q in (*METRICS, "gap")}
        out: dict[str, Any] = {"reference": a, "arm": b}
        out.update({q: (p.to_dict() if p else None) for q, p in found.items()})
        ratio = paired_ratio(table[a]["cost"], table[b]["cost"])
        out["cost_ratio"] = (
            None if ratio is None else dict(zip(("mean", "std", "n"), ratio, strict=True))
        )
        out["pgd_autoattack_agree"] = agree(found["pgd"], found["autoattack"])
        return out

    for arm, row in table.items():
        entry: dict[str, Any] = {
            "method": info[arm]["method"],
            "kind": info[arm]["kind"],
            "steps": info[arm]["steps"],
            "replay_fraction": info[arm]["replay_fraction"],
            "seeds": sorted(row["clean"]),
        }
        for q in (*METRICS, "cost", "gap"):
            entry[q] = dict(zip(("mean", "std"), mean_std(row[q].values()), strict=True))
        if reference in table:
            entry["vs_reference"] = compare(reference, arm)
        own = base_arm(info[arm]["method"], study)
        if own in table:
            entry["vs_own_base"] = compare(own, arm)
        if info[arm]["memory"] and info[arm]["attack_init"] == "memory":
            plain = f"{METHOD_LABELS[info[arm]['method']]}-{info[arm]['steps']}, memory start"
            if plain in table:
                entry["term_on_memory_start"] = compare(plain, arm)
        summary["arms"][arm] = entry
    summary["goal"] = goal(summary)
    summary["pareto"] = pareto_front(summary)
    return summary


def agree(pgd: Any, aa: Any) -> bool | None:
    """Whether PGD-20 and AutoAttack give the same verdict on a paired difference: the same
    direction whenever either one's confidence interval excludes 0 (``None`` with one seed)."""
    if pgd is None or aa is None or pgd.ci_excludes_zero is None:
        return None
    if not (pgd.ci_excludes_zero or aa.ci_excludes_zero):
        return True  # neither is beyond noise
    return pgd.ci_excludes_zero == aa.ci_excludes_zero and (pgd.diff > 0) == (aa.diff > 0)


def goal(summary: dict[str, Any]) -> dict[str, Any]:
    """Which memory-using arms meet the goal (training cost at most ``COST_TARGET`` x base
    TRADES-10, AutoAttack accuracy not below it by more than the pooled seed spread), and which
    comes closest: the met arm with the best AutoAttack accuracy; else, among the arms within the
    cost, the smallest AutoAttack shortfall; else the cheapest arm."""
    rows = []
    for arm, entry in summary["arms"].items():
        comparison = entry.get("vs_reference")
        if entry["kind"] == "base" or comparison is None or comparison["autoattack"] is None:
            continue
        aa, ratio = comparison["autoattack"], comparison["cost_ratio"]["mean"]
        shortfall = max(0.0, -(aa["diff"] + aa["pooled_std"]))
        rows.append(
            {
                "arm": arm,
                "cost_ratio": ratio,
                "aa_diff": aa["diff"],
                "pooled_std": aa["pooled_std"],
                "within_cost": ratio <= COST_TARGET,
                "within_spread": shortfall == 0.0,
                "aa_shortfall": shortfall,
                "met": ratio <= COST_TARGET and shortfall == 0.0,
                "aa_mean": entry["autoattack"]["mean"],
            }
        )
    met = [r for r in rows if r["met"]]
    cheap = [r for r in rows if r["within_cost"]]
    if met:
        closest = max(met, key=lambda r: r["aa_mean"])
    elif cheap:
        closest = min(cheap, key=lambda r: (r["aa_shortfall"], r["cost_ratio"]))
    else:
        closest = min(rows, key=lambda r: r["cost_ratio"]) if rows else None
    return {"rows": rows, "met": [r["arm"] for r in met], "closest": closest}


def pareto_front(summary: dict[str, Any]) -> list[str]:
    """Arms no other arm beats on both mean cost (lower) and mean AutoAttack accuracy (higher)."""
    points = {a: (e["cost"]["mean"], e["autoattack"]["mean"]) for a, e in summary["arms"].items()}
    return [
        arm
        for arm, (cost, aa) in points.items()
        if not any(
            c <= cost and v >= aa and (c, v) != (cost, aa)
            for other, (c, v) in points.items()
            if other != arm
        )
    ]


# -- tables and plot -------------------------------------------------------------------------


def pp(p: dict[str, Any] | None, *, ci: bool = True) -> str:
    """A paired difference in percentage points: ``diff ± std [CI]``."""
    if p is None:
        return "n/a"
    text = f"{100 * p['diff']:+.2f} ± {100 * p['diff_std']:.2f}"
    if ci and len(p["seeds"]) > 1:
        text += f" [{100 * p['ci_low']:+.2f}, {100 * p['ci_high']:+.2f}]"
    return text


def format_tables(summary: dict[str, Any], study: Study) -> str:
    n = len(study.seeds)
    ref = summary["reference"]
    arms_ = summary["arms"]
    lines = [
        f"Digits, {study.epochs} epochs, eps {study.eps}, attack step eps/4; mean ± std over "
        f"{n} seeds. Clean and PGD-20 on all 360 test digits, AutoAttack (reference counts"
        f"{', FAST: smoke only' if study.aa_fast else ''}) on the first {study.aa_samples}. "
        f"Cost: training CPU seconds per epoch (one process, one thread); ratio: paired by seed "
        f"to {ref}. Δ: paired-by-seed difference to {ref} in percentage points, ± the std of the "
        "per-seed differences, [95% t interval]. Pareto: no other arm is both cheaper and more "
        "robust under AutoAttack (means).",
        "",
        f"| arm | CPU s/epoch | ratio to {ref} | clean | PGD-20 | AutoAttack | Δ clean | "
        "Δ PGD-20 | Δ AutoAttack | pooled AA std | PGD − AA gap | Pareto |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in arms_.items():
        vs = e.get("vs_reference") or {}
        ratio = vs.get("cost_ratio")
        ratio_text = f"{ratio['mean']:.3f} ± {ratio['std']:.3f}" if ratio else "n/a"
        aa = vs.get("autoattack")
        if arm == ref:
            deltas = "reference | | | |"
        elif aa is None:
            deltas = "n/a | n/a | n/a | n/a |"
        else:
            deltas = (
                f"{pp(vs.get('clean'), ci=False)} | {pp(vs.get('pgd'), ci=False)} | {pp(aa)} | "
                f"{100 * aa['pooled_std']:.2f} |"
            )
        lines.append(
            f"| {arm} | {e['cost']['mean']:.3f} ± {e['cost']['std']:.3f} | {ratio_text} | "
            f"{fmt(e['clean'])} | {fmt(e['pgd'])} | {fmt(e['autoattack'])} | {deltas} "
            f"{fmt(e['gap'])} | {'yes' if arm in summary['pareto'] else ''} |"
        )
    g = summary["goal"]
    lines += [
        "",
        f"Goal: training cost ≤ {COST_TARGET} x {ref} and AutoAttack accuracy not below it by "
        "more than the pooled seed spread (Δ AutoAttack ≥ − pooled std).",
        "",
        "| arm | cost ratio | Δ AutoAttack | pooled std | within cost | within spread | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in g["rows"]:
        lines.append(
            f"| {r['arm']} | {r['cost_ratio']:.3f} | {100 * r['aa_diff']:+.2f} | "
            f"{100 * r['pooled_std']:.2f} | {yes_no(r['within_cost'])} | "
            f"{yes_no(r['within_spread'])} | {yes_no(r['met'])} |"
        )
    closest = g["closest"]
    if closest is not None:
        lines += ["", f"Met by: {', '.join(g['met']) or 'none'}. Closest: {closest['arm']}."]
    lines += [
        "",
        "Against each method's own 10-step base (paired Δ in points ± std [95% CI]); "
        "'agree': PGD-20 and AutoAttack give the same verdict (same sign wherever either "
        "interval excludes 0).",
        "",
        "| arm | base | cost ratio | Δ clean | Δ PGD-20 | Δ AutoAttack | Δ (PGD − AA gap) | "
        "agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in arms_.items():
        vs = e.get("vs_own_base")
        if vs is None or vs["reference"] == arm:
            continue
        lines.append(comparison_row(arm, vs))
    lines += [
        "",
        "What the MemLoss term adds on top of memory-started attacks (arm minus the same "
        "memory-started arm without the term):",
        "",
        "| arm | without the term | cost ratio | Δ clean | Δ PGD-20 | Δ AutoAttack | "
        "Δ (PGD − AA gap) | agree |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm, e in arms_.items():
        if "term_on_memory_start" in e:
            lines.append(comparison_row(arm, e["term_on_memory_start"]))
    return "\n".join(lines)


def comparison_row(arm: str, vs: dict[str, Any]) -> str:
    ratio = vs["cost_ratio"]
    return (
        f"| {arm} | {vs['reference']} | {ratio['mean']:.3f} ± {ratio['std']:.3f} | "
        f"{pp(vs['clean'])} | {pp(vs['pgd'])} | {pp(vs['autoattack'])} | {pp(vs['gap'])} | "
        f"{yes_no(vs['pgd_autoattack_agree'])} |"
    )


def fmt(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def short_label(arm: str) -> str:
    return (
        arm.replace(", memory start", " ms")
        .replace(" + MemLoss", "+M")
        .replace(", replay 0.5", " r.5")
        .replace("TRADES", "T")
        .replace("PGD-AT", "P")
    )


def plot(summary: dict[str, Any], path: Path) -> bool:
    """AutoAttack accuracy against training CPU s/epoch, one point per arm; False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = sorted({e["method"] for e in summary["arms"].values()}, reverse=True)
    fig, axes = plt.subplots(1, len(methods), figsize=(7 * len(methods), 6), squeeze=False)
    markers = {"base": "s", "base + MemLoss": "D", "memory start": "o",
               "memory start + MemLoss": "^"}  # fmt: skip
    colors = {"base": "black", "base + MemLoss": "tab:purple", "memory start": "tab:blue",
              "memory start + MemLoss": "tab:orange"}  # fmt: skip
    reference = summary["arms"].get(summary["reference"] or "")
    for ax, method in zip(axes[0], methods, strict=True):
        seen = set()
        for arm, e in summary["arms"].items():
            if e["method"] != method:
                continue
            kind = e["kind"]
            hollow = e["replay_fraction"] < 1
            ax.errorbar(
                e["cost"]["mean"],
                100 * e["autoattack"]["mean"],
                xerr=e["cost"]["std"],
                yerr=100 * e["autoattack"]["std"],
                fmt=markers[kind],
                color=colors[kind],
                mfc="white" if hollow else colors[kind],
                capsize=3,
                label=None if kind in seen else kind,
            )
            seen.add(kind)
            ax.annotate(
                short_label(arm),
                (e["cost"]["mean"], 100 * e["autoattack"]["mean"]),
                textcoords="offset points",
                xytext=(4, -10) if hollow else (4, 4),  # keep replay 0.5 labels apart
                fontsize=7,
            )
        if reference is not None:
            ref_cost, ref_aa = reference["cost"]["mean"], 100 * reference["autoattack"]["mean"]
            ax.axvline(COST_TARGET * ref_cost, color="grey", ls="--", lw=0.8,
                       label=f"{COST_TARGET} x {summary['reference']} cost")  # fmt: skip
            ax.axhline(ref_aa, color="grey", ls=":", lw=0.8,
                       label=f"{summary['reference']} AutoAttack")  # fmt: skip
        ax.set_title(f"{METHOD_LABELS.get(method, method)} (hollow: replay 0.5)")
        ax.set_xlabel("training CPU seconds per epoch")
        ax.set_ylabel("AutoAttack accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny study (for tests)")
    parser.add_argument("--jobs", type=int, default=2, help="worker processes (1 thread each)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--aa-samples", type=int, default=180, help="test digits for AutoAttack")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results)")
    parser.add_argument("--fresh", action="store_true", help="ignore runs already in the log")
    args = parser.parse_args(argv)
    if args.smoke:
        study = Study(
            methods=("trades",),
            epochs=2,
            base_steps=2,
            memory_steps=(1,),
            seeds=(0, 1),
            aa_samples=16,
            aa_fast=True,
        )
    else:
        study = Study(
            epochs=args.epochs, seeds=tuple(range(args.seeds)), aa_samples=args.aa_samples
        )
    out = Path(args.out) if args.out else (None if args.smoke else RESULTS_DIR)
    meta = run_metadata([sys.executable, *sys.argv])
    print_metadata(meta)
    specs = plan(study)
    log = ResultLog(out / "efficiency_runs.jsonl" if out else None, resume=not args.fresh)
    keys = {run_key(spec, study): spec for spec in specs}
    results, todo = log.split(keys)
    meta["runs_taken_from_log"] = len(results)  # the rest were run by this invocation
    print(
        f"{len(specs)} runs ({len(arms(study))} arms x {len(study.seeds)} seeds), "
        f"{len(results)} already done; {study.epochs} epochs, eps {study.eps}; "
        f"{args.jobs} worker process(es); AutoAttack "
        f"{'fast (smoke only)' if study.aa_fast else 'at reference counts'} on "
        f"{study.aa_samples} test digits",
        flush=True,
    )
    start = time.perf_counter()

    def finished(task: tuple[Any, ...], result: dict) -> None:
        key = run_key(task[2], study)
        results[key] = {"key": key, **result}
        log.append(results[key])
        acc = result["accuracy"]
        print(
            f"[{len(results):3d}/{len(specs)} {time.perf_counter() - start:6.0f}s] "
            f"{result['arm']:38s} seed {result['seed']}: clean {acc['clean']:.3f} "
            f"PGD-20 {acc['pgd']:.3f} AA {acc['autoattack']:.3f} "
            f"({result['cpu_per_epoch']:.3f} CPU s/epoch, eval {result['eval_cpu_seconds']:.0f}s)",
            flush=True,
        )

    with make_executor(args.jobs) as executor:
        tasks = [(train_and_evaluate, study, spec) for spec in todo]
        run_tasks(executor, tasks, jobs=args.jobs, on_done=finished)
    runs = [results[k] for k in keys if k in results]
    summary = summarize(runs, study)
    tables = format_tables(summary, study)
    print()
    print(tables)
    print(f"\nwall time of this invocation {time.perf_counter() - start:.0f} s")
    if out is not None:
        meta["wall_seconds_this_invocation"] = time.perf_counter() - start
        meta["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
        write_json(
            out / "efficiency.json",
            {"meta": meta, "study": asdict(study), "summary": summary, "runs": runs},
        )
        (out / "efficiency.md").write_text(tables + "\n")
        if plot(summary, out / "efficiency.png"):
            print(f"wrote {out / 'efficiency.png'}")
        print(f"wrote {out / 'efficiency.json'} and {out / 'efficiency.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
