"""The GPU path on a GPU: hidden host waits, races widened with ``torch.cuda._sleep``, pinned bytes,
and the distributed equivalence on two GPUs over NCCL.

Everything here skips without CUDA (the NCCL run without two GPUs); ``benchmarks/gpu_selfcheck.sh``
runs it first on a CUDA machine. The CPU stand-ins of the same logic are in
``tests/test_gpu_path_cpu.py``.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from memloss_addon import MemoryWrapper
from memloss_addon.store import transfer
from memloss_addon.store.placement import TensorStore
from tests.conftest import requires_cuda
from tests.helpers import mlp
from tests.test_distributed import (
    DEPTH,
    EPOCHS,
    FEATURES,
    SIZES,
    adversarial,
    dataset,
    rank_batches,
    reference_run,
)

pytestmark = requires_cuda

SHAPE, N, BATCH, CLASSES = (3, 8, 8), 64, 16, 10
SLEEP_CYCLES = 20_000_000  # about 10 ms of a GPU's time: a copy queued behind it runs late
PLACEMENTS = ["cpu", "cuda", "disk"]


@contextlib.contextmanager
def sync_debug(mode: str):
    """``torch.cuda.set_sync_debug_mode`` for the block; back to off afterwards."""
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def count_syncs(action) -> int:
    """How many synchronizing CUDA calls ``action()`` makes (one warning each in "warn" mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_debug("warn"):
            action()
    return sum("synchroniz" in str(w.message) for w in caught)


def filled_memory(placement: str, tmp_path: Path, **options) -> MemoryWrapper:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, CLASSES)).cuda()
    where = {"storage_path": tmp_path / "disk"} if placement == "disk" else {"device": placement}
    memory = MemoryWrapper(model, N, SHAPE, depth=2, **where, **options)
    for epoch in range(2):
        for start in range(0, N, BATCH):
            call(memory, torch.arange(start, start + BATCH), epoch)
    return memory


def batch(indices: torch.Tensor, epoch: int):
    generator = torch.Generator().manual_seed(int(indices[0]) + 1000 * epoch)
    clean = torch.rand(len(indices), *SHAPE, generator=generator).cuda()
    adv = (clean + 0.03 * (epoch + 1)).clamp(0, 1)
    targets = (indices % CLASSES).cuda()
    return clean, adv, targets


def call(memory: MemoryWrapper, indices: torch.Tensor, epoch: int) -> torch.Tensor:
    clean, adv, targets = batch(indices, epoch)
    return memory(indices, clean, adv, memory.model(clean), targets)


def prepared_call(memory: MemoryWrapper, indices: torch.Tensor, epoch: int):
    """A memory call whose batch is already on the GPU (copying it there is a wait of its own)."""
    clean, adv, targets = batch(indices, epoch)
    logits = memory.model(clean)
    torch.cuda.synchronize()
    return lambda: memory(indices, clean, adv, logits, targets)


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_a_read_and_a_prefetched_read_make_no_host_wait(placement, tmp_path):
    memory = filled_memory(placement, tmp_path)
    indices = torch.randperm(N, generator=torch.Generator().manual_seed(0))[:BATCH]
    clean, _, _ = batch(indices, 2)
    with sync_debug("error"):
        plain = memory.store.read(indices, clean).examples
    memory.store.prefetch(indices, clean.device)
    with sync_debug("error"):
        prefetched = memory.store.read(indices, clean).examples
    assert torch.equal(plain, prefetched)


@pytest.mark.parametrize(("placement", "waits"), [("cuda", 1), ("cpu", 2), ("disk", 2)])
def test_a_call_waits_for_the_device_only_where_documented(placement, waits, tmp_path):
    # One wait for the acceptance mask of the write; a memory in host RAM then copies the
    # accepted rows to the host (that copy waits only for itself).
    memory = filled_memory(placement, tmp_path)
    indices = torch.randperm(N, generator=torch.Generator().manual_seed(1))[:BATCH]
    assert count_syncs(prepared_call(memory, indices, 3)) == waits


def numbered(num_rows: int, device="cpu") -> torch.Tensor:
    return torch.arange(num_rows * 12, dtype=torch.float32, device=device).view(num_rows, 3, 4)


def test_a_staging_buffer_is_never_refilled_under_a_slow_copy():
    store = TensorStore(40, (3, 4), dtype=torch.float32, device="cpu", pin_memory=True)
    store.write(torch.arange(40), numbered(40))
    batches = [torch.randperm(40, generator=torch.Generator().manual_seed(k))[:8] for k in range(8)]
    device = torch.device("cuda", torch.cuda.current_device())
    results = []
    for rows in batches:
        torch.cuda._sleep(SLEEP_CYCLES)  # the copy below runs only after this
        results.append(store.read(rows, device))
    torch.cuda.synchronize()
    expected = numbered(40)
    for rows, got in zip(batches, results, strict=True):
        assert torch.equal(got.cpu(), expected[rows])


def test_a_prefetch_under_a_slow_side_stream_gives_its_rows():
    store = TensorStore(40, (3, 4), dtype=torch.float32, device="cpu", pin_memory=True)
    store.write(torch.arange(40), numbered(40))
    device = torch.device("cuda", torch.cuda.current_device())
    store.start_read(torch.arange(2), device).wait()  # creates the side stream
    side = store._side_streams[device]
    expected = numbered(40)
    for k in range(6):
        rows = torch.randperm(40, generator=torch.Generator().manual_seed(k))[:8]
        with torch.cuda.stream(side):
            torch.cuda._sleep(SLEEP_CYCLES)  # the prefetch copy runs only after this
        got = store.start_read(rows, device).wait().clone()  # used at once on this stream
        assert torch.equal(got.cpu(), expected[rows])


def test_a_prefetch_from_a_gpu_memory_sees_the_write_queued_before_it():
    store = TensorStore(40, (3, 4), dtype=torch.float32, device="cuda")
    rows = torch.tensor([5, 9, 2])
    fresh = torch.full((3, 3, 4), 7.0, device="cuda")
    torch.cuda._sleep(SLEEP_CYCLES)  # the write below runs late on the current stream
    store.write(rows, fresh)
    got = store.start_read(rows, torch.device("cuda", torch.cuda.current_device())).wait()
    assert torch.equal(got.cpu(), fresh.cpu())


def test_to_device_copies_without_a_wait_and_from_its_own_buffer():
    for source in (torch.arange(1000), torch.arange(1000).pin_memory()):
        torch.cuda._sleep(SLEEP_CYCLES)  # the copy runs late...
        with sync_debug("error"):
            copied = transfer.to_device(source, "cuda")
        source.fill_(-1)  # ...after the caller has changed its tensor
        assert torch.equal(copied.cpu(), torch.arange(1000))


def test_nbytes_is_what_the_pinned_allocator_holds(tmp_path):
    def pinned_in_use() -> int:
        torch.cuda.synchronize()
        del_me = torch.empty(1, pin_memory=True)  # lets the allocator retire finished copies
        del del_me
        return torch.cuda.host_memory_stats()["active_bytes.current"]

    before = pinned_in_use()
    memory = MemoryWrapper(nn.Flatten().cuda(), 2000, SHAPE, dtype=torch.float32)
    assert pinned_in_use() == before  # the rows themselves are not pinned
    rows = memory.store.rows
    clean = torch.rand(100, *SHAPE, device="cuda")
    memory.store.write(torch.arange(100), clean, clean)
    memory.store.read(torch.arange(100), clean)
    memory.store.read(torch.arange(50), clean[:50])
    memory.store.prefetch(torch.arange(30), clean.device)
    # 100 rows of 768 bytes lock 131072; 50 rows lock 65536 (then hold 85); the prefetch buffer
    # for 30 rows locks 32768.
    assert rows.nbytes - rows.data.nbytes == 131072 + 65536 + 32768
    assert pinned_in_use() - before == rows.nbytes - rows.data.nbytes


# ---------------------------------------------------------------------- NCCL on two GPUs


def _nccl_worker(rank: int, world_size: int, backend: str, init_file: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group(
        backend,
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=120),
    )
    device = torch.device("cuda", rank)
    results: dict = {}
    try:
        for layout in ("sharded", "replicated"):
            for store_device in ("cpu", "cuda"):
                for num_samples in SIZES[world_size]:
                    data, labels = dataset(num_samples)
                    memory = MemoryWrapper(
                        mlp().to(device),
                        num_samples,
                        (FEATURES,),
                        depth=DEPTH,
                        distributed=layout,
                        device=store_device,
                    )
                    terms, comm = [], []
                    for epoch in range(EPOCHS):
                        for idx in rank_batches(num_samples, world_size, rank, epoch):
                            x = data[idx].to(device)
                            adv = adversarial(data[idx], epoch, rank).to(device)
                            term = memory(idx, x, adv, memory.model(x), labels[idx].to(device))
                            terms.append(term.item())
                            comm.append(memory.stats()["comm_bytes_last_step"])
                    results[f"{layout}-{store_device}-{num_samples}"] = {
                        "terms": terms,
                        "comm": comm,
                    }
        if "cpu" in dist.get_backend_config():
            # Rank 1 builds its memory while cuda:0 is current (before set_device, as it were).
            torch.cuda.set_device(0)
            memory = MemoryWrapper(
                mlp().to(device), 8, (FEATURES,), distributed="sharded", device="cuda"
            )
            torch.cuda.set_device(rank)
            x = torch.rand(2, FEATURES, dtype=torch.float64, device=device)
            try:
                memory(torch.tensor([0, 1]), x, x, memory.model(x), torch.tensor([0, 1]).cuda())
                results["wrong_gpu"] = None
            except (ValueError, RuntimeError) as error:
                results["wrong_gpu"] = [type(error).__name__, str(error)]
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", ["nccl", "cpu:gloo,cuda:nccl"])
def test_two_gpus_over_nccl_give_the_single_process_terms(backend, tmp_path):
    mp.spawn(
        _nccl_worker,
        args=(2, backend, str(tmp_path / "init"), str(tmp_path)),
        nprocs=2,
        join=True,
    )
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for layout in ("sharded", "replicated"):
        for num_samples in SIZES[2]:
            terms, comm, _ = reference_run(layout, num_samples, 2, range(EPOCHS))
            for store_device in ("cpu", "cuda"):
                for rank in range(2):
                    got = results[rank][f"{layout}-{store_device}-{num_samples}"]
                    assert got["terms"] == pytest.approx(terms[rank], rel=1e-6, abs=1e-12)
                    assert got["comm"] == comm[rank]
    if backend != "nccl":  # the small gathers on gloo let the failing rank tell the other
        assert results[0]["wrong_gpu"][0] == "RuntimeError"
        kind, message = results[1]["wrong_gpu"]
        assert kind == "ValueError" and "cuda:0" in message and "cuda:1" in message
