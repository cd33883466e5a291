"""Objectives started from given points (``init``): the start, the steps, and no random numbers.

Expected adversarial examples come from plain loops written here (and ``tests.helpers.plain_pgd``),
on fp64 linear models, never from the library.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memloss_addon.objectives import hat, mart, pgd_at, single_step, squeeze, trades
from tests.helpers import kl_by_hand, plain_pgd

EPS, STEP = 0.1, 0.03


def linear_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Linear(5, 4).double()


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.rand(6, 5, generator=generator, dtype=torch.float64) * 0.8 + 0.1
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    # Far outside the eps-ball on some coordinates, inside on others.
    init = x + torch.tensor([0.5, -0.5, 0.05, -0.02, 0.0], dtype=torch.float64)
    return x, y, init


def projected(point: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Clip to [x - eps, x + eps], then to [0, 1], coordinate by coordinate."""
    out = point.clone()
    for i in range(point.shape[0]):
        for j in range(point.shape[1]):
            value = min(max(float(point[i, j]), float(x[i, j]) - EPS), float(x[i, j]) + EPS)
            out[i, j] = min(max(value, 0.0), 1.0)
    return out


def kl_steps_by_hand(model, x, start, steps):
    """TRADES' attack: sign steps ascending sum_i KL(p(x_i) || p(x'_i)), p(x) fixed."""
    with torch.no_grad():
        clean_logits = model(x)
    adv = start.clone()
    for _ in range(steps):
        adv.requires_grad_(True)
        rows = model(adv)
        total = sum(kl_by_hand(clean_logits[i], rows[i]) for i in range(len(x)))
        (grad,) = torch.autograd.grad(total, adv)
        adv = projected(adv.detach() + STEP * grad.sign(), x)
    return adv.detach()


HELPER = linear_model()  # built here: building it reseeds the global generator

CALLS = {
    "pgd_at": lambda m, x, y, **kw: pgd_at(m, x, y, eps=EPS, step_size=STEP, **kw),
    "trades": lambda m, x, y, **kw: trades(m, x, y, eps=EPS, step_size=STEP, beta=6.0, **kw),
    "mart": lambda m, x, y, **kw: mart(m, x, y, eps=EPS, step_size=STEP, beta=5.0, **kw),
    "hat": lambda m, x, y, **kw: hat(
        m, x, y, eps=EPS, step_size=STEP, beta=1.0, helper=HELPER, **kw
    ),
    "squeeze": lambda m, x, y, **kw: squeeze(m, x, y, eps=EPS, step_size=STEP, beta=6.0, **kw),
    "single_step": lambda m, x, y, **kw: single_step(
        m, x, y, eps=EPS, step_size=STEP, reg_weight=1.0, **kw
    ),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_an_init_start_draws_no_random_numbers(name):
    model, (x, y, init) = linear_model(), batch()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    out = CALLS[name](model, x, y, steps=1, init=init)
    assert torch.equal(torch.get_rng_state(), before)
    assert float((out.adv - x).abs().max()) <= EPS + 1e-12
    assert float(out.adv.min()) >= 0.0 and float(out.adv.max()) <= 1.0
    assert out.adv_logits.shape == (6, 4)
    torch.testing.assert_close(out.adv_logits, model(out.adv), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_without_init_the_usual_start_draws_random_numbers(name):
    model, (x, y, _) = linear_model(), batch()
    torch.manual_seed(11)
    before = torch.get_rng_state()
    CALLS[name](model, x, y, steps=1)
    assert not torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", ["pgd_at", "mart"])
def test_cross_entropy_attacks_step_from_the_projected_init(name, steps):
    model, (x, y, init) = linear_model(), batch()
    out = CALLS[name](model, x, y, steps=steps, init=init)
    start = projected(init, x)
    expected = plain_pgd(model, x, y, eps=EPS, alpha=STEP, steps=steps, loss="ce", start=start)
    torch.testing.assert_close(out.adv, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("name", ["trades", "hat"])
def test_kl_attacks_step_from_the_projected_init(name, steps):
    model, (x, y, init) = linear_model(), batch()
    out = CALLS[name](model, x, y, steps=steps, init=init)
    expected = kl_steps_by_hand(model, x, projected(init, x), steps)
    torch.testing.assert_close(out.adv, expected, rtol=0, atol=1e-12)


def test_single_step_takes_its_one_step_from_the_projected_init():
    model, (x, y, init) = linear_model(), batch()
    out = CALLS["single_step"](model, x, y, steps=1, init=init)
    start = projected(init, x)
    start.requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(start), y, reduction="sum"), start)
    expected = projected(start.detach() + STEP * grad.sign(), x)
    torch.testing.assert_close(out.adv, expected, rtol=0, atol=1e-12)


def test_an_init_inside_the_ball_is_used_unchanged():
    model, (x, y, _) = linear_model(), batch()
    inside = (x + 0.04).clamp(0, 1)
    out = CALLS["pgd_at"](model, x, y, steps=1, init=inside)
    expected = plain_pgd(model, x, y, eps=EPS, alpha=STEP, steps=1, loss="ce", start=inside)
    torch.testing.assert_close(out.adv, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_bad_init_is_refused_by_name(name):
    model, (x, y, init) = linear_model(), batch()
    with pytest.raises(ValueError, match="init must have the shape"):
        CALLS[name](model, x, y, steps=1, init=init[:3])
    with pytest.raises(TypeError, match="init must be a floating-point tensor"):
        CALLS[name](model, x, y, steps=1, init=init.long())
