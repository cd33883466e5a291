"""A training run killed with SIGKILL mid-epoch and resumed from its last checkpoint ends
bit-identical to the same run never interrupted (model, optimizer, RNG, memory, losses)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import resumable_training as run

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(run.__file__)
TOTAL_STEPS = run.EPOCHS * run.STEPS_PER_EPOCH


def start(folder: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(folder), *extra],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )


def run_to_end(folder: Path) -> list[str]:
    child = start(folder)
    output, _ = child.communicate(timeout=300)
    assert child.returncode == 0
    lines = output.split()
    assert lines[-1] == "done"
    return output.splitlines()


def kill_after_step(folder: Path, step: int) -> None:
    """Starts the run (resuming if it can) and SIGKILLs it once it reports ``step``."""
    child = start(folder, "--step-delay", "0.05")
    try:
        for line in child.stdout:
            if line.strip() == f"step {step}":
                child.send_signal(signal.SIGKILL)
                break
    finally:
        child.kill()
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run ended before it could be killed"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("uninterrupted")
    lines = run_to_end(folder)
    assert lines[:TOTAL_STEPS] == [f"step {s}" for s in range(1, TOTAL_STEPS + 1)]
    return folder


def assert_identical(a: object, b: object, where: str = "") -> None:
    """Exact equality of nested checkpoint contents: tensors bit for bit, floats by repr."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert repr(a) == repr(b), where  # repr: NaN equals NaN, 0.1 != 0.1000001


def test_killed_and_resumed_run_is_bit_identical(uninterrupted, tmp_path):
    # Killed before the first checkpoint (restarts from scratch), then twice mid-epoch.
    kill_steps = [2, 8, 13]
    for kill_step in kill_steps:
        kill_after_step(tmp_path, kill_step)
        assert not (tmp_path / "final.pt").exists()
    lines = run_to_end(tmp_path)
    # The last run resumed from a checkpoint at a multiple of CHECKPOINT_EVERY, not from scratch.
    first = int(lines[0].split()[1])
    assert (first - 1) % run.CHECKPOINT_EVERY == 0 and 1 < first <= kill_steps[-1] + 1

    final = torch.load(tmp_path / "final.pt", weights_only=True)
    reference = torch.load(uninterrupted / "final.pt", weights_only=True)
    assert len(final["history"]) == TOTAL_STEPS
    assert_identical(final, reference)
    memory_file = (tmp_path / "final-memory.bin").read_bytes()
    assert memory_file == (uninterrupted / "final-memory.bin").read_bytes()
    # Only the newest memory file is kept next to the checkpoint.
    assert len(list(tmp_path.glob("memory-*.bin"))) == 1

    # The comparison can fail: resuming the last checkpoint with another RNG state diverges.
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    checkpoint["rng"] = torch.Generator().manual_seed(12345).get_state()
    with run.atomic_write(tmp_path / "checkpoint.pt") as file:
        torch.save(checkpoint, file)
    run_to_end(tmp_path)
    diverged = torch.load(tmp_path / "final.pt", weights_only=True)
    with pytest.raises(AssertionError):
        assert_identical(diverged["model"], reference["model"])
