"""Mixed precision, large logits, wrapped model outputs and devices of the returned term."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper, memory_kl_rows
from tests.conftest import requires_cuda
from tests.helpers import kl_by_hand, log_softmax_by_hand, term_by_hand


def test_large_logits_give_a_finite_term_matching_float64():
    clean = torch.tensor([[1e4, -1e4, 0.0], [30.0, 0.0, -30.0]])
    memory = torch.tensor([[-1e4, 1e4, 0.0], [0.0, 30.0, 0.0]])
    targets = torch.tensor([0, 0])
    kl, weight = memory_kl_rows(clean.half(), memory.half(), targets)
    assert torch.isfinite(kl).all() and torch.isfinite(weight).all()
    # Half-precision logits round 30 -> 30 and 1e4 -> 10000 exactly, so the fp32 rows must match
    # a float64 computation by hand on the same logits.
    clean64, memory64 = clean.double(), memory.double()
    kl64 = torch.stack([kl_by_hand(clean64[r], memory64[r]) for r in range(2)])
    torch.testing.assert_close(kl.double(), kl64, rtol=1e-5, atol=1e-3)
    weight64 = torch.stack(
        [1 - log_softmax_by_hand(memory64[r])[int(targets[r])].exp() for r in range(2)]
    )
    torch.testing.assert_close(weight.double(), weight64, rtol=1e-5, atol=1e-6)


def test_term_under_cpu_bfloat16_autocast_is_fp32_and_close_to_the_fp32_term():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5))
    x = torch.rand(32, 8)
    adv = (x + 0.05).clamp(0, 1)
    y = torch.randint(0, 5, (32,))
    mixed = MemoryWrapper(model, 32, (8,))
    mixed(torch.arange(32), x, adv, model(x), y)  # stores adv (float32) as every sample's slot
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
        assert logits.dtype == torch.bfloat16
        term = mixed(torch.arange(32), x, adv, logits, y)
    assert term.dtype == torch.float32
    term.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # The full-precision term, by hand in float64 on a float64 copy of the model (default
    # beta' = 2). bf16 logits carry about 3 significant digits; the stated tolerance is 5%.
    model64 = copy.deepcopy(model).double()
    with torch.no_grad():
        reference = term_by_hand(
            model64(x.double()), model64(adv.double()).unsqueeze(1), y, beta_prime=2.0
        )
    assert float(reference) > 0
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
    # Stored examples far from x (1 - x), so that even at large logit scales their predictions
    # differ from the clean ones and the term is far from 0 (x + 0.05 gave 1e-19 at 1e4).
    memory(torch.arange(8), x, 1 - x, model(x), y)
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
    expected = float(term_by_hand(logits, memory_logits.unsqueeze(1), y, beta_prime=2.0))
    assert expected > 1e-3 * scale  # far above the absolute tolerance: the check can fail
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
    expected = float(
        term_by_hand(logits.cpu(), memory_logits.cpu().unsqueeze(1), y.cpu(), beta_prime=2.0)
    )
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
    expected = float(term_by_hand(logits, memory_logits.unsqueeze(1), y, beta_prime=2.0))
    assert term.item() == pytest.approx(expected, rel=1e-5)
