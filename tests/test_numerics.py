"""Mixed precision, large logits, wrapped model outputs and devices of the returned term."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper, memory_kl_rows
from tests.conftest import requires_cuda
from tests.helpers import kl_by_hand, log_softmax_by_hand


def test_large_logits_give_a_finite_term_matching_float64():
    clean = torch.tensor([[1e4, -1e4, 0.0], [30.0, 0.0, -30.0]])
    memory = torch.tensor([[-1e4, 1e4, 0.0], [0.0, 30.0, 0.0]])
    targets = torch.tensor([0, 0])
    kl, weight = memory_kl_rows(clean.half(), memory.half(), targets)
    assert torch.isfinite(kl).all() and torch.isfinite(weight).all()
    kl64, _ = memory_kl_rows(clean.double(), memory.double(), targets)
    # Half-precision logits round 30 -> 30 and 1e4 -> 10000 exactly, so fp32 must match fp64.
    torch.testing.assert_close(kl.double(), kl64, rtol=1e-5, atol=1e-3)


def test_term_under_cpu_bfloat16_autocast_is_fp32_and_close_to_the_fp32_term():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.rand(32, 8)
    adv = (x + 0.05).clamp(0, 1)
    y = torch.randint(0, 5, (32,))
    plain = MemoryWrapper(model, 32, (8,))
    mixed = MemoryWrapper(model, 32, (8,))
    for memory in (plain, mixed):
        memory(torch.arange(32), x, adv, model(x), y)
    reference = plain(torch.arange(32), x, adv, model(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        term = mixed(torch.arange(32), x, adv, logits, y)
    assert term.dtype == torch.float32
    term.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # bf16 logits carry about 3 significant digits; the stated tolerance is 5% of the term.
    assert term.item() == pytest.approx(reference.item(), rel=0.05)


def test_logits_fn_reads_models_that_return_dicts():
    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            return {"logits": self.linear(x), "features": x}

    model = DictModel()
    memory = MemoryWrapper(model, 4, (4,), logits_fn=lambda out: out["logits"])
    x = torch.rand(4, 4)
    y = torch.tensor([0, 1, 2, 0])
    memory(torch.arange(4), x, (x + 0.1).clamp(0, 1), model(x)["logits"], y)
    term = memory(torch.arange(4), x, x, model(x)["logits"], y)
    assert term.dim() == 0 and torch.isfinite(term) and float(term) > 0


def test_zero_term_can_be_backpropagated_alone_and_added():
    model = nn.Linear(2, 2)
    memory = MemoryWrapper(model, 2, (2,))
    x = torch.rand(2, 2)
    term = memory(torch.arange(2), x, x, model(x), torch.tensor([0, 1]))
    assert term.dim() == 0 and float(term) == 0.0
    term.backward()  # alone
    loss = model(x).sum() + memory(torch.arange(2), x, x, model(x), torch.tensor([0, 1])) * 0
    loss.backward()


def test_stats_report_means_over_computed_terms():
    model = nn.Linear(3, 2)
    memory = MemoryWrapper(model, 4, (3,), weighting="none")
    x = torch.rand(4, 3)
    y = torch.zeros(4, dtype=torch.long)
    memory(torch.arange(4), x, x, model(x), y)
    first = memory(torch.tensor([0, 1]), x[:2], x[:2], model(x[:2]), y[:2])
    second = memory(torch.tensor([2, 3]), x[2:], x[2:], model(x[2:]), y[2:])
    stats = memory.stats()
    assert stats["calls"] == 3 and stats["terms_computed"] == 2
    assert stats["rows_read"] == 4 and stats["rows_written"] == 8 and stats["rejected_rows"] == 0
    assert stats["filled_fraction"] == 1.0
    assert stats["mean_term"] == pytest.approx((first.item() + second.item()) / 2, rel=1e-6)
    assert stats["mean_weight"] == 1.0
    assert stats["last_term"] == pytest.approx(second.item(), rel=1e-6)


def term_by_hand(clean_logits, memory_logits, targets, *, beta_prime: float) -> float:
    """One filled slot per sample: beta' * mean_b (1 - q_y) * KL(p || q), in float64 by hand."""
    total = 0.0
    for b in range(len(targets)):
        q_true = torch.exp(log_softmax_by_hand(memory_logits[b].double())[int(targets[b])])
        kl = kl_by_hand(clean_logits[b].double(), memory_logits[b].double())
        total += float((1 - q_true) * kl)
    return beta_prime * total / len(targets)


def scaled_model(scale: float) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        model[2].weight.mul_(scale)
        model[2].bias.mul_(scale)
    return model


def autocast_term(model, device: str, dtype: torch.dtype):
    """Fills a memory, then computes a term under autocast; returns the term, both logits, y."""
    seen = []

    def record(output):
        seen.append(output)
        return output

    memory = MemoryWrapper(model, 8, (8,), logits_fn=record)
    x = torch.rand(8, 8, device=device)
    y = torch.randint(0, 5, (8,), device=device)
    memory(torch.arange(8), x, (x + 0.05).clamp(0, 1), model(x), y)
    with torch.autocast(device, dtype=dtype):
        logits = model(x)
        term = memory(torch.arange(8), x, x, logits, y)
    return term, logits, seen[-1], y


@pytest.mark.parametrize("scale", [1.0, 1e2, 1e4])
def test_cpu_bf16_autocast_term_is_fp32_arithmetic_on_the_bf16_logits(scale):
    model = scaled_model(scale)
    term, logits, memory_logits, y = autocast_term(model, "cpu", torch.bfloat16)
    assert logits.dtype == memory_logits.dtype == torch.bfloat16
    assert term.dtype == torch.float32 and bool(torch.isfinite(term))
    term.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    # All the error of mixed precision is in the bf16 logits themselves: from them on the term
    # is fp32 arithmetic, within float32 rounding of an fp64 computation on the same logits.
    expected = term_by_hand(logits, memory_logits, y, beta_prime=2.0)
    assert term.item() == pytest.approx(expected, rel=1e-5, abs=1e-6 * scale)


@requires_cuda
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_cuda_fp16_autocast_term_is_fp32_arithmetic_on_the_fp16_logits(scale):
    model = scaled_model(scale).to("cuda")
    term, logits, memory_logits, y = autocast_term(model, "cuda", torch.float16)
    assert logits.dtype == memory_logits.dtype == torch.float16
    assert term.dtype == torch.float32 and bool(torch.isfinite(term))
    term.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    expected = term_by_hand(logits.cpu(), memory_logits.cpu(), y.cpu(), beta_prime=2.0)
    assert term.item() == pytest.approx(expected, rel=1e-5, abs=1e-6 * scale)


@pytest.mark.parametrize("value", [3e4, 6e4, 65504.0])
def test_fp16_logits_near_the_fp16_limit_give_a_finite_term_and_gradients(value):
    class HalfLogits(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(4, 3)

        def forward(self, x):
            # Saturating logits: +-value in half precision (the largest float16 is 65504).
            return (torch.tanh(self.linear(x) * 10) * value).half()

    half_logits = HalfLogits()
    linear = half_logits.linear
    memory = MemoryWrapper(half_logits, 6, (4,))
    x = torch.rand(6, 4)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    memory(torch.arange(6), x, (1 - x), half_logits(x), y)
    logits = half_logits(x)
    assert logits.dtype == torch.float16 and float(logits.abs().max()) > value / 2
    term = memory(torch.arange(6), x, x, logits, y)
    assert bool(torch.isfinite(term)) and term.item() > 0
    term.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in linear.parameters())
    memory_logits = half_logits(1 - x)
    expected = term_by_hand(logits, memory_logits, y, beta_prime=2.0)
    assert term.item() == pytest.approx(expected, rel=1e-5)
