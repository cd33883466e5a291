"""``MemoryWrapper.recall``: each sample's newest stored example, to start the step's attack from.

Expected starts are computed here coordinate by coordinate from what the test stored, never by the
library's decoding or projection.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper
from memloss_addon.store.placement import TensorStore
from tests.helpers import assert_unchanged, snapshot

N, FEATURES, CLASSES = 8, 3, 4


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(FEATURES, CLASSES)


def data(seed: int = 1) -> torch.Tensor:
    return torch.rand(N, FEATURES, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def labels() -> torch.Tensor:
    return torch.arange(N) % CLASSES


def store(memory: MemoryWrapper, idx: torch.Tensor, x: torch.Tensor, adv: torch.Tensor) -> None:
    memory(idx, x, adv, memory.model(x), labels()[idx])


def clip(value: float, low: float, high: float) -> float:
    return min(max(value, low), high)


def test_an_empty_memory_recalls_the_clean_inputs_and_changes_nothing():
    memory = MemoryWrapper(model(), N, (FEATURES,), eps=0.1)
    x, idx = data(), torch.arange(N)
    before, counters = snapshot(memory), memory.stats()
    torch.manual_seed(5)
    rng = torch.get_rng_state()
    start, found = memory.recall(idx, x)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(start, x) and start.data_ptr() != x.data_ptr()
    assert found.tolist() == [False] * N and found.dtype == torch.bool
    assert_unchanged(before, memory)
    assert repr(memory.stats()) == repr(counters)  # NaN until a term exists


def test_the_newest_example_comes_back_for_filled_samples_only():
    memory = MemoryWrapper(model(), N, (FEATURES,), depth=2)
    x = data()
    first, second = (x + 0.03).clamp(0, 1), (x - 0.02).clamp(0, 1)
    store(memory, torch.arange(N), x, first)
    store(memory, torch.tensor([1, 4]), x[[1, 4]], second[[1, 4]])
    idx = torch.tensor([4, 0, 7, 1])
    counters = memory.stats()
    start, found = memory.recall(idx, x[idx])
    assert found.tolist() == [True, True, True, True]
    expected = torch.stack([second[4], first[0], first[7], second[1]])
    assert torch.equal(start, expected)
    assert repr(memory.stats()) == repr(counters)  # NaN until a term exists

    fresh = MemoryWrapper(model(), N, (FEATURES,))
    store(fresh, torch.tensor([2]), x[[2]], first[[2]])
    start, found = fresh.recall(torch.tensor([5, 2]), x[[5, 2]])
    assert found.tolist() == [False, True]
    assert torch.equal(start[0], x[5]) and torch.equal(start[1], first[2])


def test_examples_are_projected_into_the_ball_of_the_current_clean_input():
    eps = 0.05
    memory = MemoryWrapper(model(), N, (FEATURES,), eps=eps)
    then = data(1)
    adv = (then + eps).clamp(0, 1)
    store(memory, torch.arange(N), then, adv)
    now = data(2)  # another view of each sample
    start, _ = memory.recall(torch.arange(N), now)
    for i in range(N):
        for j in range(FEATURES):
            a, c = float(adv[i, j]), float(now[i, j])
            expected = clip(clip(a, c - eps, c + eps), 0.0, 1.0)
            assert float(start[i, j]) == pytest.approx(expected, abs=1e-7)


def test_perturbations_are_replayed_on_the_current_clean_input():
    memory = MemoryWrapper(model(), N, (FEATURES,), mode="perturbation", eps=0.1)
    then = data(1)
    adv = (then + torch.tensor([0.05, -0.08, 0.02])).clamp(0, 1)
    store(memory, torch.arange(N), then, adv)
    now = data(3)
    start, found = memory.recall(torch.arange(N), now)
    assert bool(found.all())
    for i in range(N):
        for j in range(FEATURES):
            delta = float(adv[i, j]) - float(then[i, j])
            expected = clip(float(now[i, j]) + delta, 0.0, 1.0)
            assert float(start[i, j]) == pytest.approx(expected, abs=1e-6)


def test_uint8_examples_come_back_on_the_grid_then_projected():
    eps = 0.1
    memory = MemoryWrapper(model(), N, (FEATURES,), dtype=torch.uint8, eps=eps)
    x = data(1)
    adv = (x + 0.07).clamp(0, 1)
    store(memory, torch.arange(N), x, adv)
    start, _ = memory.recall(torch.arange(N), x)
    for i in range(N):
        for j in range(FEATURES):
            on_grid = round(float(adv[i, j]) * 255) / 255
            c = float(x[i, j])
            expected = clip(clip(on_grid, c - eps, c + eps), 0.0, 1.0)
            assert float(start[i, j]) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("depth", [1, 3])
def test_a_recall_then_the_call_reads_the_rows_once_and_gives_the_same_term(monkeypatch, depth):
    x, idx = data(), torch.tensor([6, 2, 3, 0])
    memories = [MemoryWrapper(model(), N, (FEATURES,), depth=depth) for _ in range(2)]
    for memory in memories:
        for epoch in range(depth):
            store(memory, torch.arange(N), x, (x + 0.01 * (epoch + 1)).clamp(0, 1))
    reads = []
    real_read = TensorStore.read

    def counting_read(self, rows, target):
        reads.append(rows.clone())
        return real_read(self, rows, target)

    monkeypatch.setattr(TensorStore, "read", counting_read)
    plain, recalled = memories
    adv = (x[idx] - 0.01).clamp(0, 1)
    expected = plain(idx, x[idx], adv, plain.model(x[idx]), labels()[idx])
    assert len(reads) == 1
    reads.clear()
    recalled.recall(idx, x[idx])
    term = recalled(idx, x[idx], adv, recalled.model(x[idx]), labels()[idx])
    assert len(reads) == 1 and reads[0].numel() == 4 * depth  # the recall's read only
    assert torch.equal(term, expected)
    assert torch.equal(recalled.state_dict()["slots"], plain.state_dict()["slots"])


def test_a_write_between_recall_and_call_is_seen_by_the_call():
    x = data()
    memory = MemoryWrapper(model(), N, (FEATURES,), beta_prime=1.0)
    store(memory, torch.arange(N), x, (x + 0.02).clamp(0, 1))
    idx = torch.tensor([1, 2])
    memory.recall(idx, x[idx])
    newer = (x[idx] - 0.04).clamp(0, 1)
    store(memory, idx, x[idx], newer)  # writes both samples after the recall
    start, _ = memory.recall(idx, x[idx])
    assert torch.equal(start, newer)


def test_recall_works_on_a_disk_backed_memory(tmp_path):
    x = data()
    memory = MemoryWrapper(model(), N, (FEATURES,), storage_path=tmp_path / "memory")
    adv = (x + 0.02).clamp(0, 1)
    store(memory, torch.arange(N), x, adv)
    reopened = MemoryWrapper(model(), N, (FEATURES,), storage_path=tmp_path / "memory")
    start, found = reopened.recall(torch.tensor([3, 5]), x[[3, 5]])
    assert bool(found.all()) and torch.equal(start, adv[[3, 5]])


BAD_RECALLS = [
    (lambda x: ([0, 1], x[:3]), ValueError, "batch has 3"),
    (lambda x: (torch.tensor([0, N]), x[:2]), IndexError, "must lie in"),
    (lambda x: (torch.tensor([0.0, 1.0]), x[:2]), TypeError, "integers"),
    (lambda x: ([0, 1], x[:2].long()), TypeError, "floating-point"),
    (lambda x: ([0, 1], x[:2, :2]), ValueError, "expected"),
]


@pytest.mark.parametrize(("make_args", "error", "match"), BAD_RECALLS)
def test_bad_recall_arguments_are_refused_and_change_nothing(make_args, error, match):
    x = data()
    memory = MemoryWrapper(model(), N, (FEATURES,))
    store(memory, torch.arange(N), x, x)
    before = snapshot(memory)
    with pytest.raises(error, match=match):
        memory.recall(*make_args(x))
    assert_unchanged(before, memory)
