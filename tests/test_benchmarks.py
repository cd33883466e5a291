"""The benchmark scripts' smoke modes run, and the numbers they report agree with their raw data.

Each script runs in a subprocess exactly as a user would run it (``python benchmarks/x.py
--smoke``); the tests then recompute the reported ratios and differences from the raw numbers in
the JSON output.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(name: str, *args: str, timeout: float = 300) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=BENCHMARKS.parent,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_buffer_overhead_smoke_reports_consistent_ratios(tmp_path):
    out = tmp_path / "buffer.json"
    stdout = run_script("buffer_overhead.py", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    cpu = [r for r in rows if r["placement"] == "cpu"]
    assert sorted(r["dtype"] for r in cpu) == sorted(
        ["float32", "float16", "bfloat16", "uint8", "int8 (perturbation)"]
    )
    targets = {"float32": 3.0, "float16": 3.0, "uint8": 4.0, "int8 (perturbation)": 4.0}
    for row in rows:
        assert (row["shape"], row["batch"]) == ("3x32x32", 128)
        assert row["batch_mb"] == pytest.approx(128 * 3 * 32 * 32 * 4 / 1e6)
        assert min(row["memcpy_us"], row["gather_us"], row["call_us"], row["store_us"]) > 0
        assert row["call_over_memcpy"] == pytest.approx(row["call_us"] / row["memcpy_us"])
        assert row["call_over_gather"] == pytest.approx(row["call_us"] / row["gather_us"])
        assert row["target"] == targets.get(row["dtype"])
        expected = None if row["target"] is None else row["call_over_memcpy"] <= row["target"]
        assert row["passed"] is expected
    assert "Target at 3x32x32, batch 128" in stdout
    costs = json.loads(out.read_text())["call_costs"]
    extra = {(r["shape"], r["batch"], r["dtype"]): r for r in costs["measured_for_this"]}
    fixed = extra[("1x8x8", 128, "float32")]["call_us"]
    assert costs["fixed_us"] == fixed and costs["fixed_passed"] is (fixed <= 250)
    for name, target in {"float32": 3.0, "uint8": 5.0, "int8 (perturbation)": 5.0}.items():
        small, large = extra[("3x32x32", 64, name)], extra[("3x32x32", 512, name)]
        ratio = (large["call_us"] - small["call_us"]) / (
            2 * (large["memcpy_us"] - small["memcpy_us"])
        )
        entry = costs["marginal"][name]
        assert entry["ratio"] == pytest.approx(ratio) and entry["target"] == target
        assert entry["passed"] is (ratio <= target)


def test_step_overhead_smoke_ratios_are_medians_of_the_raw_times(tmp_path):
    out = tmp_path / "step.json"
    run_script("step_overhead.py", "--json", str(out))
    result = json.loads(out.read_text())
    labels = [row["method"] for row in result["rows"]]
    assert labels == ["TRADES-2", "PGD-AT-2", "MART-2", "HAT-2", "ST-2", "single-step"]
    for row in result["rows"]:
        raw = result["cpu_seconds"][row["method"]]
        wall = result["wall_seconds"][row["method"]]
        expected_variants = {"base", "memory d1", "memory d2", "memory d4", "floor"}
        if row["method"] == "TRADES-2":  # disk, replay and memory-started: TRADES only
            expected_variants |= {"memory d1 disk", "replay 0.5"}
            expected_variants |= {f"started k{k}" for k in (1, 2, 3, 5)}
            assert row["wall_ratio_disk"] == pytest.approx(
                statistics.median(wall["memory d1 disk"]) / statistics.median(wall["base"])
            )
            replay = statistics.median(raw["replay 0.5"]) / statistics.median(raw["base"])
            assert row["replay_target"] == 1.06 and row["replay_passed"] is (replay <= 1.06)
        assert set(raw) == set(wall) == expected_variants
        assert all(len(times) == 1 and times[0] > 0 for times in raw.values())
        base = statistics.median(raw["base"])
        for variant, times in raw.items():
            assert row["ratio"][variant] == pytest.approx(statistics.median(times) / base)

    dist = result["distributed"]
    assert (dist["world_size"], dist["batch_per_rank"], dist["method"]) == (2, 8, "TRADES-2")
    variants = ("base", "sharded", "replicated")
    for rank in dist["wall_seconds"]:
        assert all(len(rank[v]) == 1 and rank[v][0] > 0 for v in variants)
    # A step lasts until its slower rank is done; medians over the steps.
    step = {
        v: 1e3 * statistics.median(map(max, *(rank[v] for rank in dist["wall_seconds"])))
        for v in variants
    }
    single_d1 = 1e3 * statistics.median(result["wall_seconds"]["TRADES-2"]["memory d1"])
    for v in variants:
        assert dist["step_ms"][v] == pytest.approx(step[v])
        assert dist["ratio_to_base"][v] == pytest.approx(step[v] / step["base"])
        assert dist["over_single_process_d1"][v] == pytest.approx(step[v] / single_d1)
    # Bytes each rank receives per call, batch 8 per rank, 2 ranks, float32 3x32x32 rows:
    # header 2 x int64 + 8 int64 indices + 8 uint8 flags = 16 + 64 + 8 = 88 bytes, plus 8 rows of
    # 12,288 bytes (sharded: the 4 rows of its batch owned by the other rank and the 4 rows of
    # the other rank's batch it owns; replicated: the other rank's 8 new rows).
    expected = 88 + 8 * 3 * 32 * 32 * 4
    assert dist["expected_comm_bytes"] == {"sharded": expected, "replicated": expected}
    for rank in dist["comm_bytes"]:
        assert rank == {"sharded": [expected], "replicated": [expected]}


def test_accuracy_smoke_table_matches_its_runs(tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("torchattacks")
    run_script("accuracy.py", "--out", str(tmp_path))
    runs = json.loads((tmp_path / "accuracy.json").read_text())["runs"]
    assert [(r["variant"], r["memory"]) for r in runs] == [
        ("TRADES", False),
        ("TRADES + MemLoss", True),
    ]
    for run in runs:
        assert all(0.0 <= run["accuracy"][k] <= 1.0 for k in ("clean", "pgd", "autoattack"))
    assert runs[0]["final_memory_term"] == 0.0 and runs[1]["final_memory_term"] > 0.0
    table = (tmp_path / "accuracy.md").read_text()
    base, memory = runs[0]["accuracy"], runs[1]["accuracy"]
    expected_diff = 100 * (memory["clean"] - base["clean"])
    assert f"| TRADES | TRADES + MemLoss | clean | 1 | {expected_diff:+.2f} | 0.00 | n/a |" in table
    assert (tmp_path / "accuracy_tradeoff.png").stat().st_size > 0


def test_footprint_smoke_net_ratio_subtracts_the_temporaries(tmp_path):
    out = tmp_path / "footprint.json"
    run_script("footprint.py", "--json", str(out))
    measured = json.loads(out.read_text())["measured"]
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1, "int8 (perturbation)": 1}
    assert [row["dtype"] for row in measured] == list(itemsize)
    for row in measured:
        # 2,000 rows of 3x32x32 plus 8 bytes of bookkeeping per sample and 5 per slot.
        assert row["nbytes"] == 2000 * 3 * 32 * 32 * itemsize[row["dtype"]] + 2000 * 13
        assert row["net_growth"] == row["peak_rss_growth"] - row["batch_temporaries"]
        assert row["net_ratio"] == pytest.approx(row["net_growth"] / row["nbytes"])


def test_accuracy_differences_and_spread_by_hand(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import accuracy

    def result(variant: str, seed: int, clean: float, pgd: float) -> dict:
        return {
            "variant": variant,
            "method": "trades",
            "memory": variant != "TRADES",
            "seed": seed,
            "overrides": {},
            "accuracy": {"clean": clean, "pgd": pgd, "autoattack": None},
        }

    results = [
        result("TRADES", 0, 0.90, 0.50),
        result("TRADES", 1, 0.92, 0.52),
        result("TRADES + MemLoss", 0, 0.95, 0.51),
        result("TRADES + MemLoss", 1, 0.93, 0.53),
    ]
    table = accuracy.format_tables(results, accuracy.Study(seeds=(0, 1)))
    # clean: means 0.91 and 0.94; both stds are sqrt(2) * 0.01; pooled std the same.
    std = math.sqrt(2) * 0.01
    assert f"| TRADES | 91.00 ± {100 * std:.2f} | 51.00 ± {100 * std:.2f} | n/a | 2 |" in table
    # Welch: t = 0.03 / sqrt(2 * std^2 / 2) = 0.03 / std; df = 2 for equal variances and n = 2.
    scipy_stats = pytest.importorskip("scipy.stats")
    p_clean = 2 * scipy_stats.t.sf(0.03 / std, df=2)
    assert (
        f"| TRADES | TRADES + MemLoss | clean | 2 | +3.00 | {100 * std:.2f} | yes | "
        f"{p_clean:.3f} |" in table
    )
    # PGD-20: a difference of 1 point against a pooled std of 1.41 does not exceed the spread.
    assert "| TRADES | TRADES + MemLoss | PGD-20 | 2 | +1.00 | 1.41 | no |" in table
    assert "AutoAttack | 2" not in table  # not measured: no comparison row


def test_buffer_overhead_free_model_costs_nothing(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import buffer_overhead

    x = torch.rand(4, 3, 8, 8)
    logits = buffer_overhead.FreeModel()(x)
    assert logits.shape == (4, buffer_overhead.NUM_CLASSES)
    assert logits.data_ptr() == x.data_ptr()  # a view: no copy, no arithmetic
    assert torch.equal(logits, x.reshape(4, -1)[:, : buffer_overhead.NUM_CLASSES])


def test_alignment_smoke_reports_paired_differences_of_its_runs(tmp_path):
    run_script("alignment.py", "--out", str(tmp_path))
    result = json.loads((tmp_path / "alignment.json").read_text())
    runs = {(r["arm"], r["seed"]): r for r in result["runs"]}
    assert sorted(arm for arm, _ in runs) == sorted(["TRADES", "+MemLoss", "+MemLoss, aligned"])
    for name, metrics in result["paired"].items():
        arm, reference = name.split(" - ")
        for metric, entry in metrics.items():
            diff = runs[(arm, 0)][metric] - runs[(reference, 0)][metric]
            assert entry["differences"] == [pytest.approx(diff)] and entry["std"] is None
    # One epoch: the memory is empty throughout, so every arm trains the same model.
    assert len({(r["clean"], r["pgd20"]) for r in result["runs"]}) == 1
    lines = (tmp_path / "alignment_runs.jsonl").read_text().splitlines()
    assert len(lines) == 3  # written as the runs finished
