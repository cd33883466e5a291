"""Resuming a disk-backed memory consistently: it records its step, warns on reopen how far it
is ahead of its last checkpoint mark, and ``rollback_to`` returns it bit-identically to the
checkpoint's step, so a run killed mid-epoch and resumed ends exactly as one never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from memloss_addon import MemoryWrapper
from memloss_addon.store.file_format import read_header
from memloss_addon.store.journal import MemoryAheadWarning
from tests import resumable_disk_training as run
from tests.helpers import adversarial_stand_in, epoch_batches, mlp, run_epochs, snapshot
from tests.test_kill_resume import assert_identical

ROOT = Path(__file__).resolve().parents[1]
N, FEATURES, BATCH = 12, 4, 4  # three calls an epoch
EPOCH_DATA = {
    "num_samples": N,
    "sample_shape": (FEATURES,),
    "classes": 3,
    "batch_size": BATCH,
    "data_seed": 3,
    "dtype": torch.float64,
}


def make(folder: Path | None = None, **options) -> MemoryWrapper:
    where = {} if folder is None else {"storage_path": folder}
    return MemoryWrapper(mlp(), N, (FEATURES,), depth=2, **where, **options)


def content(memory: MemoryWrapper) -> dict:
    """The memory's rows and bookkeeping (its statistics counters are not kept in its folder)."""
    return {key: value for key, value in snapshot(memory).items() if key != "counters"}


def assert_same_content(before: dict, memory: MemoryWrapper) -> None:
    after = content(memory)
    assert before.keys() == after.keys()
    for key, value in before.items():
        if torch.is_tensor(value):
            assert torch.equal(value.view(torch.uint8), after[key].view(torch.uint8)), key
        else:
            assert value == after[key], key


def quietly(build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryAheadWarning)
        return build()


# ---------------------------------------------------------------------- in one process


def test_rollback_to_a_mark_is_bit_identical_and_training_goes_on_identically(tmp_path):
    memory = make(tmp_path / "memory", replay_fraction=0.5, diagnostics=True)
    reference = make(replay_fraction=0.5, diagnostics=True)  # in RAM, never rolled back
    run_epochs(memory, range(2), **EPOCH_DATA)
    run_epochs(reference, range(2), **EPOCH_DATA)
    assert memory.mark_checkpoint() == 6 == memory.step
    at_mark = content(memory)
    run_epochs(memory, range(2, 4), **EPOCH_DATA)  # 6 more steps, rows and last weights change
    assert memory.step == 12
    memory.rollback_to(6)
    assert memory.step == 6 and memory.stats()["calls"] == 6
    assert_same_content(at_mark, memory)
    # Going on from the restored step gives exactly the terms and state of the memory that
    # never went further.
    assert run_epochs(memory, range(2, 5), **EPOCH_DATA) == run_epochs(
        reference, range(2, 5), **EPOCH_DATA
    )
    assert_same_content(content(reference), memory)


def test_a_reopened_memory_warns_how_many_steps_it_is_ahead_of_its_mark(tmp_path):
    memory = make(tmp_path / "memory")
    run_epochs(memory, range(2), **EPOCH_DATA)
    memory.mark_checkpoint()
    at_mark = content(memory)
    run_epochs(memory, range(2, 3), **EPOCH_DATA)
    memory.store.flush()
    del memory
    with pytest.warns(MemoryAheadWarning, match=r"3 step\(s\) after its last mark_checkpoint\(\)"):
        reopened = make(tmp_path / "memory")
    assert reopened.step == 9
    reopened.rollback_to(6)
    assert_same_content(at_mark, reopened)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # consistent with its mark now: no warning
        again = make(tmp_path / "memory")
    assert again.step == 6


def test_without_a_mark_only_the_last_write_can_be_undone(tmp_path):
    memory = make(tmp_path / "memory")
    run_epochs(memory, range(1), **EPOCH_DATA)  # steps 1, 2, 3
    with pytest.raises(ValueError, match="can return to steps 2 to 3 only"):
        memory.rollback_to(1)
    before_last = make()  # the same two calls, in RAM
    x = torch.rand(N, FEATURES, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for idx in epoch_batches(N, BATCH, 0)[:2]:
        before_last(
            idx, x[idx], adversarial_stand_in(x[idx], 0), before_last.model(x[idx]), idx % 3
        )
    memory.rollback_to(2)
    assert_same_content(content(before_last), memory)
    with pytest.raises(ValueError, match="forward to step 3"):
        memory.rollback_to(3)


def test_rollback_needs_a_disk_backed_memory_and_a_step():
    with pytest.raises(ValueError, match="only a disk-backed memory"):
        make().rollback_to(0)
    with pytest.raises(TypeError, match="step must be an int"):
        make().rollback_to(1.5)  # type: ignore[arg-type]


def test_the_step_is_recorded_by_save_load_and_state_dict(tmp_path):
    memory = make(tmp_path / "memory")
    run_epochs(memory, range(2), **EPOCH_DATA)
    assert memory.state_dict()["counters"]["calls"] == memory.step == 6
    memory.save(tmp_path / "memory.bin")
    assert read_header(tmp_path / "memory.bin")["counters"]["calls"] == 6
    other = make(tmp_path / "other")
    other.load(tmp_path / "memory.bin")  # the folder now records step 6 (and is flushed)
    assert other.step == 6
    del other
    reopened = quietly(lambda: make(tmp_path / "other"))
    assert reopened.step == 6
    assert_same_content(content(memory), reopened)


# ---------------------------------------------------------------------- killed and resumed


def start(folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(Path(run.__file__)), str(folder), *extra],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def finish(folder: Path, *extra: str) -> dict:
    done = start(folder, *extra)
    assert done.returncode == 0, done.stderr
    final = torch.load(folder / "final.pt", weights_only=True)
    memory = quietly(lambda: run.build(folder / "check")[2])
    memory.load(folder / "final-memory.bin")
    state = memory.state_dict()
    final["memory"] = {key: state[key] for key in ("slots", "slot_count", "ring_head")}
    final["memory"]["last_weight"] = state["last_weight"]
    return final


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    return finish(tmp_path_factory.mktemp("uninterrupted"))


KILL_AFTER = run.STEPS_PER_EPOCH * 2 + 3  # three steps into the third epoch


def test_a_run_killed_mid_epoch_resumes_bit_identically_with_rollback(uninterrupted, tmp_path):
    killed = start(tmp_path, "--kill-after", str(KILL_AFTER))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = finish(tmp_path)
    [message] = json.loads((tmp_path / "warnings.json").read_text())
    checkpoint_step = run.STEPS_PER_EPOCH * 2
    assert (
        f"last changed at step {KILL_AFTER}, {KILL_AFTER - checkpoint_step} step(s) after its "
        f"last mark_checkpoint() at step {checkpoint_step}" in message
    )
    assert f"memory.rollback_to({checkpoint_step})" in message
    assert_identical(uninterrupted, resumed)


def test_without_the_rollback_the_resumed_run_differs(uninterrupted, tmp_path):
    # What the warning is about: the memory replays examples of the steps about to be redone.
    killed = start(tmp_path, "--kill-after", str(KILL_AFTER))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = finish(tmp_path, "--no-rollback")
    assert not torch.equal(resumed["memory"]["slots"], uninterrupted["memory"]["slots"])
    assert resumed["history"] != uninterrupted["history"]
