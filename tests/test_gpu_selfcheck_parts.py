"""The parts of benchmarks/gpu_selfcheck.sh that can run without a GPU: step_overhead.py's focused
mode and the preset timing, at toy sizes on the CPU, and the script's answer without CUDA."""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys

import pytest
import torch

from memloss_addon.experiments import preset_timing
from tests.test_benchmarks import BENCHMARKS, run_script


def test_step_overhead_focused_mode_reports_medians_and_ratios_of_its_raw_times(tmp_path):
    out = tmp_path / "focused.json"
    stdout = run_script(
        "step_overhead.py",
        "--model",
        "resnet18",
        "--methods",
        "trades",
        "--mem-configs",
        "cpu-fp16",
        "cpu-fp32",
        "--json",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["settings"]["mode"] == "focused" and result["settings"]["model"] == "resnet18"
    (row,) = result["rows"]
    assert row["method"] == "TRADES-2"
    raw = result["wall_seconds"]["TRADES-2"]
    assert list(raw) == ["base", "memory cpu-fp16", "memory cpu-fp32"]
    for variant, times in raw.items():
        median_ms = 1e3 * statistics.median(times)
        assert row["median_ms"][variant] == pytest.approx(median_ms)
        assert row["ratio"][variant] == pytest.approx(median_ms / row["median_ms"]["base"])
    assert "pinned_fp16_over_gpu_fp32" not in row  # neither was timed
    assert "memory cpu-fp16" in stdout


def test_step_overhead_focused_mode_refuses_a_gpu_placement_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_overhead.py"), "--mem-configs", "gpu-fp32"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "needs --device cuda" in done.stderr
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_overhead.py"), "--mem-configs", "ram-fp32"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "PLACEMENT-DTYPE" in done.stderr


def test_preset_timing_runs_both_arms_and_compares_them(tmp_path, capsys):
    out = tmp_path / "timing.json"
    argv = ["--preset", "trades-resnet18-cifar10", "--steps", "3", "--warmup", "1"]
    argv += ["--batch-size", "4", "--set", "base_width=2", "steps=1", "--json", str(out)]
    assert preset_timing.main(argv) == 0
    document = json.loads(out.read_text())
    base, memloss = document["arms"]["base"], document["arms"]["memloss"]
    assert base["memory"] is False and memloss["memory"] is True
    assert base["steps"] == 3 and base["batch_size"] == 4 and base["attack_steps"] == 1
    assert memloss["memory_bytes"] > 0 and memloss["memory_term"] == 0.0  # one epoch: empty
    assert document["memloss_over_base"] == pytest.approx(
        memloss["steady_ms_per_step"] / base["steady_ms_per_step"]
    )
    assert base["estimated_cifar10_epoch_seconds"] == pytest.approx(
        12500 * base["steady_ms_per_step"] / 1e3
    )
    assert "CIFAR-10 epoch" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_selfcheck_says_so_in_one_line_and_exits_77_without_cuda(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here: the self-check would run")
    done = subprocess.run(
        ["bash", str(BENCHMARKS / "gpu_selfcheck.sh")],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": sys.executable},
    )
    assert done.returncode == 77
    assert done.stdout.strip().splitlines() == [
        "gpu_selfcheck: CUDA is not available here; nothing to check (exit 77)"
    ]
