"""Every base objective composes with the memory in one added line, over two epochs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memloss_addon import IndexedDataset, MemoryWrapper
from memloss_addon.objectives import hat, mart, pgd_at, single_step, squeeze, trades
from tests.helpers import term_by_hand

EPS, STEP, BETA_PRIME = 8 / 255, 2 / 255, 2.0
NUM_SAMPLES, FEATURES, CLASSES = 12, 5, 3


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, CLASSES)
    ).train()


HELPER = make_model(99).eval()

OBJECTIVES = {
    "pgd_at": lambda m, x, y: pgd_at(m, x, y, eps=EPS, step_size=STEP, steps=2),
    "trades": lambda m, x, y: trades(m, x, y, eps=EPS, step_size=STEP, steps=2, beta=6.0),
    "mart": lambda m, x, y: mart(m, x, y, eps=EPS, step_size=STEP, steps=2, beta=6.0),
    "hat": lambda m, x, y: hat(
        m, x, y, eps=EPS, step_size=STEP, steps=2, beta=2.5, helper=HELPER, gamma=0.5
    ),
    "squeeze": lambda m, x, y: squeeze(m, x, y, eps=EPS, step_size=STEP, steps=2, beta=6.0),
    "single_step": lambda m, x, y: single_step(
        m, x, y, eps=EPS, step_size=10 / 255, reg_weight=0.5
    ),
}


def expected_term(model, x, y, stored, logits):
    """beta' * mean_i (1 - p_y(m_i)) KL(p(x_i) || p(m_i)), by the loop of tests.helpers."""
    with torch.no_grad():
        memory_logits = copy.deepcopy(model)(stored)  # train mode, as bn_mode="train"
    one_slot_each = memory_logits.unsqueeze(1)
    return float(term_by_hand(logits.detach(), one_slot_each, y, beta_prime=BETA_PRIME))


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_two_epochs_with_the_memory(name):
    generator = torch.Generator().manual_seed(4)
    inputs = torch.rand(NUM_SAMPLES, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (NUM_SAMPLES,), generator=generator)
    loader = DataLoader(
        IndexedDataset(TensorDataset(inputs, labels)),
        batch_size=4,
        shuffle=True,
        generator=generator,
    )
    model = make_model(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    memory = MemoryWrapper(
        model, num_samples=NUM_SAMPLES, sample_shape=(FEATURES,), beta_prime=BETA_PRIME
    )
    stored: dict[int, torch.Tensor] = {}
    for epoch in (1, 2):
        for x, y, idx in loader:
            optimizer.zero_grad()
            out = OBJECTIVES[name](model, x, y)
            if epoch == 2:
                previous = torch.stack([stored[i] for i in idx.tolist()])
                expected = expected_term(model, x, y, previous, out.logits)

            term = memory(idx, x, out.adv, out.logits, y)
            loss = out.loss + term  # the one added line, with the term kept for the checks

            assert term.dim() == 0 and term.dtype == torch.float32
            value = term.item()
            if epoch == 1:
                assert value == 0.0
            else:
                assert math.isfinite(value) and value > 0
                assert value == pytest.approx(expected, rel=1e-4, abs=1e-7)
            loss.backward()
            optimizer.step()
            stored.update(zip(idx.tolist(), out.adv, strict=True))
    assert model.training
    assert all(torch.isfinite(p).all() for p in model.parameters())
