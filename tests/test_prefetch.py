"""``memory.prefetch``: used when the next call asks for the same indices, never stale, ignored
otherwise."""

from __future__ import annotations

import pytest
import torch

from memloss_addon import MemoryWrapper
from memloss_addon.store import placement
from tests.conftest import requires_cuda
from tests.helpers import ReferenceMemory, adversarial_stand_in, epoch_batches, mlp

N, FEATURES = 10, 4
DATA = torch.rand(N, FEATURES, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
LABELS = torch.arange(N) % 3


class ReadCounter:
    """Counts the store's synchronous reads (a used prefetch replaces one)."""

    def __init__(self, memory: MemoryWrapper) -> None:
        self.calls = 0
        rows = memory.store.rows
        original = rows.read

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        rows.read = counted


def call(memory, idx, epoch, device="cpu"):
    idx = torch.as_tensor(idx)
    x = DATA[idx].to(device)
    logits = memory.model(x)
    term = memory(idx, x, adversarial_stand_in(x, epoch), logits, LABELS[idx].to(device))
    return term.item()


def test_prefetching_every_next_batch_gives_the_reference_terms(tmp_path):
    for options in ({}, {"storage_path": tmp_path / "disk"}):
        model = mlp()
        memory = MemoryWrapper(model, N, (FEATURES,), depth=2, **options)
        reference = ReferenceMemory(model, depth=2, beta_prime=2.0)
        counter = ReadCounter(memory)
        batches = [(epoch, b) for epoch in range(3) for b in epoch_batches(N, 4, epoch)]
        got, want = [], []
        for step, (epoch, idx) in enumerate(batches):
            got.append(call(memory, idx, epoch))
            want.append(call(reference, idx, epoch))
            if step + 1 < len(batches):
                memory.prefetch(batches[step + 1][1])
        assert got == pytest.approx(want, rel=1e-6, abs=1e-12)
        assert counter.calls == 0  # every read after the first epoch came from a prefetch
        assert any(t > 0 for t in got)


def test_a_write_between_prefetch_and_read_is_seen():
    model = mlp()
    memory = MemoryWrapper(model, N, (FEATURES,), depth=1)
    reference = ReferenceMemory(model, depth=1, beta_prime=2.0)
    for target in (memory, reference):
        call(target, [0, 1, 2], epoch=0)
    memory.prefetch([0, 1])  # reads the epoch-0 rows of samples 0 and 1
    for target in (memory, reference):
        call(target, [1, 5], epoch=1)  # overwrites sample 1
    counter = ReadCounter(memory)
    got = call(memory, [0, 1], epoch=2)
    assert got == pytest.approx(call(reference, [0, 1], epoch=2), rel=1e-6)
    assert counter.calls == 1  # the prefetch was discarded and the rows read again


def test_a_write_to_other_samples_keeps_the_prefetch():
    model = mlp()
    memory = MemoryWrapper(model, N, (FEATURES,), depth=1)
    reference = ReferenceMemory(model, depth=1, beta_prime=2.0)
    for target in (memory, reference):
        call(target, [0, 1, 2], epoch=0)
    memory.prefetch([0, 1])
    for target in (memory, reference):
        call(target, [2, 5], epoch=1)
    counter = ReadCounter(memory)
    assert call(memory, [0, 1], epoch=2) == pytest.approx(
        call(reference, [0, 1], epoch=2), rel=1e-6
    )
    assert counter.calls == 0


def test_a_prefetch_of_other_indices_is_ignored():
    model = mlp()
    memory = MemoryWrapper(model, N, (FEATURES,), depth=1)
    reference = ReferenceMemory(model, depth=1, beta_prime=2.0)
    for target in (memory, reference):
        call(target, [0, 1, 2, 3], epoch=0)
    memory.prefetch([2, 3])
    counter = ReadCounter(memory)
    for target in (memory, reference):
        call(target, [0, 1], epoch=1)
    assert counter.calls == 1
    for target in (memory, reference):
        call(target, [3, 2], epoch=2)  # the unused prefetch is gone, and this order differs
    assert counter.calls == 2
    # The prefetch of [2, 3] is still pending, but the call above wrote both samples.
    assert call(memory, [2, 3], epoch=3) == pytest.approx(
        call(reference, [2, 3], epoch=3), rel=1e-6
    )
    assert counter.calls == 3


def test_a_prefetch_issued_before_the_current_call_serves_the_next_one():
    model = mlp()
    memory = MemoryWrapper(model, N, (FEATURES,), depth=1)
    reference = ReferenceMemory(model, depth=1, beta_prime=2.0)
    for target in (memory, reference):
        call(target, [0, 1, 2, 3], epoch=0)
    memory.prefetch([2, 3])  # a look-ahead of one batch
    counter = ReadCounter(memory)
    for target in (memory, reference):
        call(target, [0, 1], epoch=1)
    assert call(memory, [2, 3], epoch=2) == pytest.approx(
        call(reference, [2, 3], epoch=2), rel=1e-6
    )
    assert counter.calls == 1  # only the call with [0, 1] read synchronously


def test_prefetch_before_the_first_call_and_bad_indices():
    memory = MemoryWrapper(mlp(), N, (FEATURES,))
    memory.prefetch([0, 1])  # no batch device known yet: nothing to do
    with pytest.raises(IndexError, match="indices must lie in"):
        memory.prefetch([0, N])
    with pytest.raises(TypeError, match="integers"):
        memory.prefetch(torch.tensor([0.5]))
    with pytest.raises(ValueError, match="1-D"):
        memory.prefetch(torch.tensor(1))
    with pytest.raises(ValueError, match="device must be"):
        memory.prefetch([0], device="tpu")


@requires_cuda
@pytest.mark.parametrize("storage", ["cpu", "cuda", "disk"])
def test_prefetch_to_cuda_is_used_and_equals_a_plain_read(storage, tmp_path, monkeypatch):
    waits = []
    original_wait = placement.PendingRead.wait

    def counted_wait(self):
        waits.append(1)
        return original_wait(self)

    monkeypatch.setattr(placement.PendingRead, "wait", counted_wait)
    model = mlp().cuda()
    where = {"storage_path": tmp_path / "disk"} if storage == "disk" else {"device": storage}
    memory = MemoryWrapper(model, N, (FEATURES,), depth=2, **where)
    plain = MemoryWrapper(
        model, N, (FEATURES,), depth=2, device="cpu" if storage == "disk" else storage
    )
    counter = ReadCounter(memory)
    device = torch.device("cuda", torch.cuda.current_device())
    batches = [(epoch, b) for epoch in range(3) for b in epoch_batches(N, 4, epoch)]
    written: set[int] = set()
    with_rows = 0  # calls whose batch has a stored sample: each must use its prefetch
    for step, (epoch, idx) in enumerate(batches):
        with_rows += bool(written & set(idx.tolist()))
        got = call(memory, idx, epoch, device="cuda")
        assert got == pytest.approx(call(plain, idx, epoch, device="cuda"), rel=1e-6, abs=1e-12)
        written |= set(idx.tolist())
        if step + 1 < len(batches):
            side = (memory.store.rows._side_streams or {}).get(device)
            if side is not None:  # the prefetch's copy runs late: a missing wait would show
                with torch.cuda.stream(side):
                    torch.cuda._sleep(20_000_000)
            memory.prefetch(batches[step + 1][1], device="cuda")
    assert counter.calls == 0  # no synchronous read: every call with rows used its prefetch
    assert len(waits) == with_rows > 0
    if storage != "cuda":
        assert memory.store.rows._prefetch_buffer.is_pinned()
