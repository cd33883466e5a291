"""With beta'=0, or while the memory is empty, training is bit-identical to training without it."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memloss_addon import IndexedDataset, MemoryWrapper


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 3)
    )


def train(*, epochs: int, memory_options: dict | None) -> tuple[list[float], dict, list]:
    torch.manual_seed(0)
    data = TensorDataset(torch.rand(40, 6), torch.randint(0, 3, (40,)))
    loader = DataLoader(IndexedDataset(data), batch_size=8, shuffle=True)
    model = small_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    memory = None
    if memory_options is not None:
        memory = MemoryWrapper(model, num_samples=len(data), sample_shape=(6,), **memory_options)
    losses = []
    for _ in range(epochs):
        for x, y, idx in loader:
            # A stand-in attack that draws random numbers, as real attacks do.
            x_adv = (x + 0.05 * torch.randn_like(x).sign()).clamp(0, 1)
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y) + nn.functional.cross_entropy(
                model(x_adv), y
            )
            if memory is not None:
                loss = loss + memory(idx, x, x_adv, logits, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, model.state_dict(), [torch.get_rng_state()]


def assert_identical(a, b):
    losses_a, state_a, rng_a = a
    losses_b, state_b, rng_b = b
    assert losses_a == losses_b
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert torch.equal(rng_a[0], rng_b[0])


def test_beta_prime_zero_is_bit_identical_to_no_memory():
    baseline = train(epochs=3, memory_options=None)
    with_memory = train(epochs=3, memory_options={"beta_prime": 0.0})
    assert_identical(baseline, with_memory)


def test_empty_memory_first_epoch_is_bit_identical_to_no_memory():
    baseline = train(epochs=1, memory_options=None)
    with_memory = train(epochs=1, memory_options={"beta_prime": 2.0})
    assert_identical(baseline, with_memory)


def test_active_memory_changes_training():
    baseline = train(epochs=2, memory_options=None)
    with_memory = train(epochs=2, memory_options={"beta_prime": 2.0})
    assert baseline[0][:5] == with_memory[0][:5]  # epoch 1: identical
    assert baseline[0][5:] != with_memory[0][5:]  # epoch 2: the term is active


def test_beta_prime_zero_with_a_filled_memory_runs_nothing_and_draws_nothing():
    model = small_net()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    memory = MemoryWrapper(model, num_samples=8, sample_shape=(6,), beta_prime=2.0)
    x, y, idx = torch.rand(8, 6), torch.randint(0, 3, (8,)), torch.arange(8)
    memory(idx, x, x, torch.zeros(8, 3), y)
    memory.beta_prime = 0.0
    bn_state = {k: v.clone() for k, v in model[1].state_dict().items()}
    rng = torch.get_rng_state()
    term = memory(idx, x, (x + 0.1).clamp(0, 1), torch.zeros(8, 3), y)
    assert float(term) == 0.0 and calls == []
    assert torch.equal(torch.get_rng_state(), rng)
    for key, value in model[1].state_dict().items():
        assert torch.equal(value, bn_state[key])
    assert torch.equal(memory.state_dict()["slots"][:, 0], (x + 0.1).clamp(0, 1))  # still stored
