"""The two multi-seed studies (``efficiency.py``, ``regime.py``): smoke runs and their arithmetic.

Each script runs in a subprocess as a user would run it (``python benchmarks/x.py --smoke``);
the tests then recompute the reported means, paired differences, spreads, confidence intervals
and cost ratios from the raw per-run records in the JSON output, and check that an interrupted
study resumes without repeating finished runs.
"""

from __future__ import annotations

import json
import math
import statistics

import pytest

from tests.test_benchmarks import BENCHMARKS, run_script

T975_DF1 = 12.706204736  # two-sided 95% quantile of Student's t, 1 degree of freedom (2 seeds)

pytest.importorskip("sklearn")
pytest.importorskip("torchattacks")


def expected_paired(a: dict[int, float], b: dict[int, float]) -> dict[str, float]:
    """Paired-by-seed statistics of b - a, computed here from scratch with plain loops."""
    seeds = sorted(set(a) & set(b))
    diffs = [b[s] - a[s] for s in seeds]
    mean = sum(diffs) / len(diffs)
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    half = T975_DF1 * std / math.sqrt(len(diffs))
    var_a = statistics.variance([a[s] for s in seeds])
    var_b = statistics.variance([b[s] for s in seeds])
    return {
        "diff": mean,
        "diff_std": std,
        "ci_low": mean - half,
        "ci_high": mean + half,
        "pooled_std": math.sqrt((var_a + var_b) / 2),
    }


def check_paired(reported: dict, a: dict[int, float], b: dict[int, float]) -> None:
    expected = expected_paired(a, b)
    assert reported["seeds"] == sorted(set(a) & set(b))
    for key, value in expected.items():
        assert reported[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key
    assert reported["ci_excludes_zero"] == (expected["ci_low"] > 0 or expected["ci_high"] < 0)
    assert reported["exceeds_spread"] == (abs(expected["diff"]) > expected["pooled_std"])


# -- efficiency ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def efficiency_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("efficiency")
    stdout = run_script("efficiency.py", "--jobs", "1", "--out", str(out))
    return out, stdout


def test_efficiency_smoke_runs_every_arm_on_every_seed(efficiency_out):
    out, _ = efficiency_out
    result = json.loads((out / "efficiency.json").read_text())
    runs = result["runs"]
    arms = [
        "TRADES-2",
        "TRADES-2 + MemLoss",
        "TRADES-2 + MemLoss, replay 0.5",
        "TRADES-1, memory start",
        "TRADES-1, memory start + MemLoss",
        "TRADES-1, memory start + MemLoss, replay 0.5",
    ]
    assert sorted((r["arm"], r["seed"]) for r in runs) == sorted(
        (arm, seed) for arm in arms for seed in (0, 1)
    )
    for run in runs:
        assert all(0.0 <= run["accuracy"][k] <= 1.0 for k in ("clean", "pgd", "autoattack"))
        epochs = run["epochs"]
        assert len(epochs) == 2
        # The cost is the mean of the per-epoch training CPU seconds.
        assert run["cpu_per_epoch"] == pytest.approx(
            sum(e["cpu_seconds"] for e in epochs) / len(epochs)
        )
        assert run["cpu_per_epoch"] > 0
        # The arm's settings reached the training run.
        assert epochs[1]["attack_from_memory"] == (run["attack_init"] == "memory")
        assert not epochs[0]["attack_from_memory"]  # epoch 1: the memory is empty
        assert (epochs[1]["memory_term"] > 0) == run["memory"]
        if run["memory"] and run["replay_fraction"] < 1:
            assert epochs[1]["rows_skipped"] > 0
        elif run["memory"]:
            assert epochs[1]["rows_skipped"] == 0
    assert (out / "efficiency.png").stat().st_size > 0


def test_efficiency_summary_is_recomputed_from_the_runs(efficiency_out):
    out, _ = efficiency_out
    result = json.loads((out / "efficiency.json").read_text())
    runs, summary = result["runs"], result["summary"]

    def values(arm: str, quantity: str) -> dict[int, float]:
        found = {}
        for r in runs:
            if r["arm"] == arm:
                if quantity == "cost":
                    found[r["seed"]] = r["cpu_per_epoch"]
                elif quantity == "gap":
                    found[r["seed"]] = r["accuracy"]["pgd"] - r["accuracy"]["autoattack"]
                else:
                    found[r["seed"]] = r["accuracy"][quantity]
        return found

    reference = summary["reference"]
    assert reference == "TRADES-2"
    for arm, entry in summary["arms"].items():
        for quantity in ("clean", "pgd", "autoattack", "cost", "gap"):
            v = list(values(arm, quantity).values())
            assert entry[quantity]["mean"] == pytest.approx(statistics.fmean(v))
            assert entry[quantity]["std"] == pytest.approx(statistics.stdev(v))
        vs = entry["vs_reference"]
        for quantity in ("clean", "pgd", "autoattack", "gap"):
            check_paired(vs[quantity], values(reference, quantity), values(arm, quantity))
        ratios = [values(arm, "cost")[s] / values(reference, "cost")[s] for s in (0, 1)]
        assert vs["cost_ratio"]["mean"] == pytest.approx(sum(ratios) / 2)
        assert vs["cost_ratio"]["std"] == pytest.approx(abs(ratios[0] - ratios[1]) / math.sqrt(2))
        if arm.endswith(("memory start + MemLoss", "memory start + MemLoss, replay 0.5")):
            term = entry["term_on_memory_start"]
            assert term["reference"] == "TRADES-1, memory start"
            check_paired(
                term["autoattack"],
                values(term["reference"], "autoattack"),
                values(arm, "autoattack"),
            )
        else:
            assert "term_on_memory_start" not in entry

    # The goal: cost ratio <= 0.6 and the AutoAttack difference >= - pooled std.
    rows = {r["arm"]: r for r in summary["goal"]["rows"]}
    assert set(rows) == set(summary["arms"]) - {reference}
    for arm, row in rows.items():
        aa = summary["arms"][arm]["vs_reference"]["autoattack"]
        ratio = summary["arms"][arm]["vs_reference"]["cost_ratio"]["mean"]
        assert row["within_cost"] == (ratio <= 0.6)
        assert row["within_spread"] == (aa["diff"] >= -aa["pooled_std"])
        assert row["met"] == (row["within_cost"] and row["within_spread"])
    # The Pareto front: no other arm at most as costly and at least as robust (one strictly).
    points = {a: (e["cost"]["mean"], e["autoattack"]["mean"]) for a, e in summary["arms"].items()}
    front = [
        a
        for a, (c, v) in points.items()
        if not any(c2 <= c and v2 >= v and (c2, v2) != (c, v) for c2, v2 in points.values())
    ]
    assert summary["pareto"] == front

    # The markdown table shows the same numbers.
    table = (out / "efficiency.md").read_text()
    arm = "TRADES-1, memory start"
    vs = summary["arms"][arm]["vs_reference"]
    expected = expected_paired(values(reference, "autoattack"), values(arm, "autoattack"))
    text = (
        f"{100 * expected['diff']:+.2f} ± {100 * expected['diff_std']:.2f} "
        f"[{100 * expected['ci_low']:+.2f}, {100 * expected['ci_high']:+.2f}]"
    )
    assert text in table
    assert f"| {arm} | {vs['cost_ratio']['mean']:.3f} | {100 * expected['diff']:+.2f} |" in table


def test_efficiency_resumes_after_an_interruption(efficiency_out, tmp_path):
    out, _ = efficiency_out
    log = (out / "efficiency_runs.jsonl").read_text().splitlines()
    assert len(log) == 12
    # A study killed after 5 runs, in the middle of writing the 6th line.
    (tmp_path / "efficiency_runs.jsonl").write_text("\n".join(log[:5]) + "\n" + log[5][:40])
    stdout = run_script("efficiency.py", "--jobs", "1", "--out", str(tmp_path))
    assert "5 already done" in stdout
    resumed = json.loads((tmp_path / "efficiency.json").read_text())["runs"]
    assert len(resumed) == 12
    first = {json.loads(line)["key"]: json.loads(line) for line in log[:5]}
    for run in resumed:
        if run["key"] in first:  # taken from the log, not trained again
            assert run == first[run["key"]]
    # Nothing left to do: a rerun trains nothing and reports the same summary.
    stdout = run_script("efficiency.py", "--jobs", "1", "--out", str(tmp_path))
    assert "12 already done" in stdout


# -- regime ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def regime_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("regime")
    stdout = run_script("regime.py", "--jobs", "2", "--out", str(out))
    return out, stdout


def test_regime_smoke_runs_and_records_the_diagnostics(regime_out):
    out, _ = regime_out
    result = json.loads((out / "regime.json").read_text())
    runs = result["runs"]
    found = sorted((r["method"], r["memory"], len(r["epochs"]), r["seed"]) for r in runs)
    assert found == sorted(
        (method, memory, epochs, seed)
        for method in ("trades", "hat")
        for memory in (False, True)
        for epochs in (2, 3)
        for seed in (0, 1)
    )
    for run in runs:
        epochs = run["epochs"]
        # Diagnostics on in both arms; the term only with MemLoss.
        assert epochs[0]["rows_classified"] == 0
        assert all(e["rows_classified"] > 0 for e in epochs[1:])
        assert all(0.0 <= e["memory_accuracy"] <= 1.0 for e in epochs[1:])
        assert (epochs[-1]["memory_term"] > 0) == run["memory"]
        assert all(e["curve_pgd_accuracy"] is not None for e in epochs)
        # The best epoch is the first with the highest hold-out PGD-20 accuracy.
        holdout = [e["holdout_pgd_accuracy"] for e in epochs]
        assert run["best_epoch"] == holdout.index(max(holdout)) + 1
        if run["best_epoch"] == len(epochs):
            assert run["best"] == run["last"]
    for name in ("regime_forgetting.png", "regime_robustness.png"):
        assert (out / name).stat().st_size > 0


def test_regime_summary_is_recomputed_from_the_runs(regime_out):
    out, _ = regime_out
    result = json.loads((out / "regime.json").read_text())
    runs, cells = result["runs"], result["summary"]["cells"]
    assert list(cells) == [
        "TRADES, eps 0.1, 2 epochs",
        "TRADES, eps 0.1, 3 epochs",
        "HAT, eps 0.1, 2 epochs",
        "HAT, eps 0.1, 3 epochs",
    ]

    def quantities(run: dict) -> dict[str, float]:
        epochs = run["epochs"]
        forgotten = sum(e["rows_forgotten"] for e in epochs)
        classified = sum(e["rows_classified"] for e in epochs)
        curve = [e["curve_pgd_accuracy"] for e in epochs]
        return {
            "last_autoattack": run["last"]["autoattack"],
            "best_autoattack": run["best"]["autoattack"],
            "last_pgd": run["last"]["pgd"],
            "forgetting_rate": forgotten / classified,
            "final_memory_accuracy": epochs[-1]["memory_accuracy"],
            "overfit_pgd": run["best"]["pgd"] - run["last"]["pgd"],
            "overfit_autoattack": run["best"]["autoattack"] - run["last"]["autoattack"],
            "curve_drop_pgd": max(curve) - curve[-1],
        }

    for name, entry in cells.items():
        for key in (
            "last_autoattack",
            "best_autoattack",
            "last_pgd",
            "forgetting_rate",
            "final_memory_accuracy",
            "overfit_pgd",
            "overfit_autoattack",
            "curve_drop_pgd",
        ):
            base = {
                r["seed"]: quantities(r)[key] for r in runs if r["cell"] == name and not r["memory"]
            }
            memloss = {
                r["seed"]: quantities(r)[key] for r in runs if r["cell"] == name and r["memory"]
            }
            assert entry[key]["base"] == pytest.approx([base[0], base[1]])
            assert entry[key]["memloss"] == pytest.approx([memloss[0], memloss[1]])
            check_paired(entry[key]["paired"], base, memloss)

    # Across cells: the Pearson correlation of the paired mean differences.
    xs = [e["forgetting_rate"]["paired"]["diff"] for e in cells.values()]
    ys = [e["overfit_pgd"]["paired"]["diff"] for e in cells.values()]
    reported = result["summary"]["together"]["forgetting vs overfit (PGD-20 best − last)"]
    assert reported["n"] == 4
    if statistics.pstdev(xs) > 0 and statistics.pstdev(ys) > 0:
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        r = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(
            sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys)
        )
        assert reported["r"] == pytest.approx(r)
    else:
        assert math.isnan(reported["r"])

    # The markdown shows the recomputed forgetting difference of the first cell.
    table = (out / "regime.md").read_text()
    p = cells["TRADES, eps 0.1, 3 epochs"]["forgetting_rate"]["paired"]
    assert (
        f"{100 * p['diff']:+.2f} ± {100 * p['diff_std']:.2f} "
        f"[{100 * p['ci_low']:+.2f}, {100 * p['ci_high']:+.2f}]" in table
    )


def test_regime_resume_skips_finished_runs(regime_out, tmp_path):
    out, _ = regime_out
    log = (out / "regime_runs.jsonl").read_text().splitlines()
    assert len(log) == 16
    (tmp_path / "regime_runs.jsonl").write_text("\n".join(log) + "\n")
    stdout = run_script("regime.py", "--jobs", "1", "--out", str(tmp_path))
    assert "16 already done" in stdout and "0 epochs to train" in stdout
    # The same runs give the same tables (NaN correlations make the JSON unsuited to ==).
    assert (tmp_path / "regime.md").read_text() == (out / "regime.md").read_text()


def test_study_statistics_by_hand(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import _study

    a = {0: 0.80, 1: 0.82, 2: 0.84}
    b = {0: 0.83, 1: 0.83, 2: 0.88, 7: 0.5}  # seed 7 has no partner: left out
    p = _study.paired(a, b)
    diffs = [0.03, 0.01, 0.04]
    mean = sum(diffs) / 3
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 2)
    half = 4.302653 * std / math.sqrt(3)  # t(0.975, df=2)
    assert p.seeds == (0, 1, 2)
    assert p.diff == pytest.approx(mean) and p.diff_std == pytest.approx(std)
    assert p.ci_low == pytest.approx(mean - half, rel=1e-5)
    assert p.ci_high == pytest.approx(mean + half, rel=1e-5)
    assert p.ci_excludes_zero is (mean - half > 0)
    assert _study.paired({0: 1.0}, {1: 1.0}) is None
    single = _study.paired({0: 0.5}, {0: 0.7})
    assert single.exceeds_spread is None and single.ci_excludes_zero is None
    ratio = _study.paired_ratio({0: 2.0, 1: 4.0}, {0: 1.0, 1: 3.0})
    assert ratio == pytest.approx((0.625, math.sqrt(2) * 0.125, 2))
    assert _study.t_quantile(1) == pytest.approx(12.706, abs=1e-3)
