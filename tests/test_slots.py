"""Slot ring semantics and duplicate indices, observed through the public state_dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper
from tests.helpers import term_by_hand


class Identity(nn.Module):
    """Logits are the input itself, so each memory example's logits are known in the test."""

    def forward(self, x):
        return x


def make_memory(depth: int, num_samples: int = 3) -> MemoryWrapper:
    return MemoryWrapper(Identity(), num_samples, (2,), depth=depth, weighting="none")


def store(memory: MemoryWrapper, indices: list[int], values: list[float]) -> torch.Tensor:
    adv = torch.tensor([[v, -v] for v in values])
    clean = torch.zeros_like(adv)
    return memory(
        torch.tensor(indices), clean, adv, clean, torch.zeros(len(values), dtype=torch.long)
    )


def memory_logits(value: float) -> torch.Tensor:
    """The logits of the memory example stored for ``value``: the example (v, -v) itself."""
    return torch.tensor([value, -value], dtype=torch.float64)


UNWEIGHTED = {"beta_prime": 2.0, "weighting": "none"}  # the memory's settings (default beta')


def slots_of(memory: MemoryWrapper, index: int) -> list[float]:
    """The stored first coordinates of a sample, newest first, read from the state_dict."""
    state = memory.state_dict()
    count, head = int(state["slot_count"][index]), int(state["ring_head"][index])
    return [float(state["slots"][index, (head - k) % memory.depth, 0]) for k in range(count)]


def test_ring_keeps_the_newest_depth_examples_newest_first():
    memory = make_memory(depth=3)
    for step, value in enumerate([0.1, 0.2, 0.3, 0.4, 0.5]):
        store(memory, [1], [value])
        expected = [0.5, 0.4, 0.3, 0.2, 0.1][4 - step :][:3]
        assert slots_of(memory, 1) == pytest.approx(expected)
    assert slots_of(memory, 0) == [] and slots_of(memory, 2) == []


def test_depth_one_keeps_only_the_previous_example():
    memory = make_memory(depth=1)
    store(memory, [0, 2], [0.1, 0.7])
    store(memory, [0], [0.3])
    assert slots_of(memory, 0) == pytest.approx([0.3])
    assert slots_of(memory, 2) == pytest.approx([0.7])


def test_term_averages_over_filled_slots():
    # Identity logits: the memory logits of value v are (v, -v); clean logits are (0, 0).
    memory = make_memory(depth=2)
    store(memory, [0], [0.5])
    store(memory, [0], [1.5])
    clean = torch.zeros(1, 2)
    term = memory(torch.tensor([0]), clean, clean, clean, torch.tensor([0]))
    # beta' = 2 times the mean over the two slots of KL((.5, .5) || softmax(v, -v)).
    expected = term_by_hand(clean, [[memory_logits(1.5), memory_logits(0.5)]], [0], **UNWEIGHTED)
    assert float(term) == pytest.approx(float(expected), rel=1e-6)


def test_duplicate_index_last_row_wins_and_reads_see_the_memory_before_the_call():
    memory = make_memory(depth=2)
    store(memory, [1], [0.9])
    clean = torch.zeros(3, 2)
    adv = torch.tensor([[0.1, -0.1], [0.2, -0.2], [0.3, -0.3]])
    term = memory(torch.tensor([1, 1, 1]), clean, adv, clean, torch.zeros(3, dtype=torch.long))
    assert slots_of(memory, 1) == pytest.approx([0.3, 0.9])  # one write, the last row
    # All three rows read the single slot stored before the call (0.9), so the term is that of 0.9.
    expected = term_by_hand(clean, [[memory_logits(0.9)]] * 3, [0, 0, 0], **UNWEIGHTED)
    assert float(term) == pytest.approx(float(expected), rel=1e-6)


def test_duplicates_are_deterministic_across_runs():
    def run():
        memory = make_memory(depth=1, num_samples=5)
        generator = torch.Generator().manual_seed(3)
        for _ in range(20):
            idx = torch.randint(0, 5, (8,), generator=generator)
            adv = torch.rand(8, 2, generator=generator)
            memory(idx, torch.zeros(8, 2), adv, torch.zeros(8, 2), torch.zeros(8, dtype=torch.long))
        return memory.state_dict()["slots"].clone()

    assert torch.equal(run(), run())
