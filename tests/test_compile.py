"""torch.compile: a compiled model gives the memory the same terms and gradients as the eager one.

The model is what gets compiled; the memory's host-side checks and bookkeeping stay eager. A
compiled training step that calls the memory also works: it breaks the graph at those checks.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounter

from memloss_addon import MemoryWrapper

NUM_SAMPLES, FEATURES, CLASSES, BATCH = 20, 6, 3, 8


def make_model(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(FEATURES, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    return nn.Sequential(*layers, nn.ReLU(), nn.Linear(16, CLASSES))


def train(model: nn.Module, forward, *, bn_mode: str = "train") -> list[torch.Tensor]:
    """Three epochs of a tiny training run; batches of 8, 8 and 4, depth 2 (0 to 16 memory rows).

    Returns the terms and, after the run, the parameters: everything a compiled run must match.
    """
    generator = torch.Generator().manual_seed(1)
    x_all = torch.rand(NUM_SAMPLES, FEATURES, generator=generator)
    y_all = torch.randint(0, CLASSES, (NUM_SAMPLES,), generator=generator)
    memory = MemoryWrapper(forward, NUM_SAMPLES, (FEATURES,), depth=2, bn_mode=bn_mode)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    terms = []
    for epoch in range(3):
        for start in range(0, NUM_SAMPLES, BATCH):
            idx = torch.arange(start, min(start + BATCH, NUM_SAMPLES))
            x, y = x_all[idx], y_all[idx]
            adv = (x + 0.05 * torch.sin(x * 50 + epoch)).clamp(0, 1)
            logits = forward(x)
            term = memory(idx, x, adv, logits, y)
            optimizer.zero_grad()
            (F.cross_entropy(logits, y) + term).backward()
            optimizer.step()
            terms.append(term.detach())
    return terms + [p.detach().clone() for p in model.parameters()]


def assert_close_lists(actual: list[torch.Tensor], expected: list[torch.Tensor], **tolerance):
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize(("batchnorm", "bn_mode"), [(False, "train"), (True, "eval")])
def test_traced_model_matches_eager_and_compiles_once_per_mode(batchnorm, bn_mode):
    eager_model = make_model(batchnorm)
    expected = train(eager_model, eager_model, bn_mode=bn_mode)
    assert float(expected[NUM_SAMPLES // BATCH + 1]) > 0  # the memory term was active

    model = make_model(batchnorm)
    counter = CompileCounter()  # traces with dynamo and runs the captured graph eagerly
    compiled = torch.compile(model, backend=counter, dynamic=True)
    actual = train(model, compiled, bn_mode=bn_mode)
    assert_close_lists(actual, expected, rtol=0, atol=0)
    # Every batch size and memory row count (0 to 16) share one graph; bn_mode="eval" switches
    # the model's mode around the memory pass, which is one more graph.
    assert counter.frame_count == (2 if bn_mode == "eval" else 1)


def test_compiled_training_step_that_calls_the_memory_matches_eager():
    def step_of(model, memory):
        def step(idx, x, adv, y):
            logits = model(x)
            return F.cross_entropy(logits, y) + memory(idx, x, adv, logits, y)

        return step

    losses = {}
    for compiled in (False, True):
        model = make_model()
        memory = MemoryWrapper(model, NUM_SAMPLES, (FEATURES,), depth=2)
        step = step_of(model, memory)
        if compiled:
            step = torch.compile(step, backend=CompileCounter(), dynamic=True)
        x = torch.rand(NUM_SAMPLES, FEATURES, generator=torch.Generator().manual_seed(2))
        y = torch.arange(NUM_SAMPLES) % CLASSES
        losses[compiled] = []
        for epoch in range(2):
            for idx in torch.arange(NUM_SAMPLES).chunk(2):
                adv = (x[idx] + 0.03 * (epoch + 1)).clamp(0, 1)
                loss = step(idx, x[idx], adv, y[idx])
                loss.backward()
                losses[compiled].append(loss.item())
        assert memory.stats()["terms_computed"] == 2
    assert losses[True] == losses[False]


@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None,
    reason="torch.compile's CPU backend (inductor) needs a C compiler",
)
def test_inductor_compiled_model_trains_with_the_memory():
    """Real code generation: one dynamic-shape compile of the forward and backward passes."""
    eager_model = make_model()
    expected = train(eager_model, eager_model)
    model = make_model()
    actual = train(model, torch.compile(model, dynamic=True))
    # Fused kernels round differently from eager ones, within float32 noise.
    assert_close_lists(actual, expected, rtol=1e-4, atol=1e-6)
