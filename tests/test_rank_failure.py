"""A distributed memory never waits forever: on 2 gloo processes, a rank that raises inside the
memory forward pass makes the other raise at once, naming the step; a rank that stops taking part
without a word makes the other raise after the process group's timeout, naming the step and the
timeout; disk-backed ranks left one write apart are told so, and realign with rollback_to."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from memloss_addon import MemoryWrapper
from tests.helpers import adversarial_stand_in, mlp

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")

FEATURES, CLASSES = 4, 3
WORLD_TIMEOUT = 60  # seconds: every wait measured below must end long before this
SHORT_TIMEOUT = 3  # seconds: the timeout of the group whose rank goes silent


class Boom(RuntimeError):
    """What the failing rank's model raises (standing in for an out-of-memory error)."""


class FailingModel(nn.Module):
    """A model that raises when armed: the memory forward pass of the chosen step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()
        self.armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            raise Boom("out of memory (simulated) in the memory forward pass")
        return self.net(x)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank r's batch of a step: samples 2r and 2r + 1 (every step: so step 2 reads step 1's)."""
    idx = torch.tensor([2 * rank, 2 * rank + 1])
    x = torch.rand(2, FEATURES, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    return idx, x, idx % CLASSES


def call(memory: MemoryWrapper, model: nn.Module, rank: int, step: int) -> float:
    idx, x, y = batch(rank, step)
    logits = model(x)
    if isinstance(model, FailingModel):
        model.armed = rank == 1 and step == 2  # after the clean forward, before the memory's
    try:
        return memory(idx, x, adversarial_stand_in(x, step), logits, y).item()
    finally:
        if isinstance(model, FailingModel):
            model.armed = False


def _fails_in_forward(rank: int, layout: str) -> dict:
    model = FailingModel()
    memory = MemoryWrapper(model, 4, (FEATURES,), distributed=layout)
    call(memory, model, rank, 1)  # stores every sample
    started = time.monotonic()
    try:
        call(memory, model, rank, 2)  # rank 1 raises in the memory forward pass
        error = None
    except Exception as raised:  # noqa: BLE001 - the type and text are the result
        error = f"{type(raised).__name__}: {raised}"
    elapsed = time.monotonic() - started
    stored_after_failure = memory.stats()["rows_written"]
    call(memory, model, rank, 3)  # the group still works, and the memory with it
    return {
        "error": error,
        "elapsed": elapsed,
        "rows_written_after_failure": stored_after_failure,
        "rows_written": memory.stats()["rows_written"],
        "slot_count": memory.state_dict()["slot_count"].tolist(),
    }


def _stops_without_a_word(rank: int) -> dict:
    group = dist.new_group([0, 1], timeout=timedelta(seconds=SHORT_TIMEOUT))
    model = mlp()
    memory = MemoryWrapper(model, 4, (FEATURES,), distributed="replicated", process_group=group)
    call(memory, model, rank, 1)
    if rank == 1:
        return {}  # step 2: rank 1 fails in its own code and never calls the memory again
    started = time.monotonic()
    try:
        call(memory, model, rank, 2)
        error = None
    except Exception as raised:  # noqa: BLE001
        error = f"{type(raised).__name__}: {raised}"
    return {"error": error, "elapsed": time.monotonic() - started}


def _folders_one_write_apart(rank: int, folder: Path) -> dict:
    model = mlp()
    memory = MemoryWrapper(model, 4, (FEATURES,), distributed="sharded", storage_path=folder)
    call(memory, model, rank, 1)
    call(memory, model, rank, 2)
    if rank == 1:
        memory.rollback_to(1)  # as a rank killed mid-step 2 is found when its folder reopens
    try:
        call(memory, model, rank, 3)
        error = None
    except RuntimeError as raised:
        error = str(raised)
    memory.rollback_to(1)  # what the message says, on every rank
    term = call(memory, model, rank, 2)  # step 2 again, now on both ranks
    return {"error": error, "term": term, "step": memory.step}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=WORLD_TIMEOUT),
    )
    try:
        results = {
            "forward-sharded": _fails_in_forward(rank, "sharded"),
            "forward-replicated": _fails_in_forward(rank, "replicated"),
            "apart": _folders_one_write_apart(rank, Path(out_dir) / "disk"),
            "silent": _stops_without_a_word(rank),
        }
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
        dist.barrier()  # on the world group, whose peers are all here
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("rank-failure")
    mp.spawn(_worker, args=(str(folder / "init"), str(folder)), nprocs=2, join=True)
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("layout", ["sharded", "replicated"])
def test_a_rank_raising_in_the_memory_forward_pass_makes_the_other_raise_at_once(results, layout):
    other, failed = results[0][f"forward-{layout}"], results[1][f"forward-{layout}"]
    assert failed["error"].startswith("Boom: out of memory")  # the failing rank's own error
    assert other["error"].startswith("RuntimeError: memory step 2: rank(s) [1] raised")
    assert "none of its rows is stored" in other["error"]
    assert other["elapsed"] < WORLD_TIMEOUT / 4  # announced, not timed out
    for rank in results:  # step 1 stored 2 rows per rank, step 2 none, step 3 two again
        assert rank[f"forward-{layout}"]["rows_written_after_failure"] == 2
        assert rank[f"forward-{layout}"]["rows_written"] == 4
    assert other["slot_count"] == failed["slot_count"] == [1, 1, 1, 1]


def test_a_rank_that_stops_without_a_word_is_reported_after_the_group_timeout(results):
    silent = results[0]["silent"]
    assert silent["error"].startswith("RuntimeError: memory step 2: the gather of batch headers")
    assert f"process group's timeout ({SHORT_TIMEOUT} s)" in silent["error"]
    assert SHORT_TIMEOUT - 0.5 <= silent["elapsed"] < SHORT_TIMEOUT + 20


def test_disk_backed_ranks_one_write_apart_are_told_and_realign(results):
    for rank in results:
        apart = rank["apart"]
        assert apart["error"] is not None
        assert "rank 0 at step 2, rank 1 at step 1" in apart["error"]
        assert "memory.rollback_to(1)" in apart["error"]
        assert apart["step"] == 2
    assert results[0]["apart"]["term"] > 0 and results[1]["apart"]["term"] > 0
