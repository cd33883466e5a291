"""What every base objective promises besides its values: modes, BatchNorm, gradients, RNG."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from memloss_addon.objectives import (
    ObjectiveOutput,
    hat,
    mart,
    pgd_at,
    single_step,
    squeeze,
    trades,
)

EPS, STEP = 8 / 255, 2 / 255


def helper_model() -> nn.Module:
    torch.manual_seed(7)
    helper = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    helper.train()
    helper[1].eval()  # a submodule the owner froze on purpose
    return helper


HELPER = helper_model()

CALLS = {
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
# Forward passes that update BatchNorm running statistics in one call (train mode): the attacks
# update none; PGD-AT and single-step take their clean logits with statistics frozen; ST's pass on
# the collaborative example is frozen.
BN_UPDATES = {"pgd_at": 1, "trades": 2, "mart": 2, "hat": 3, "squeeze": 2, "single_step": 2}
# Documented random draws: (kind, count) from the global RNG of x's device.
RNG_DRAWS = {
    "pgd_at": ("uniform", 1),
    "trades": ("normal", 1),
    "mart": ("normal", 1),
    "hat": ("normal", 1),
    "squeeze": ("normal", 2),
    "single_step": ("uniform", 1),
}
NAMES = sorted(CALLS)


def bn_model(dropout: bool = True) -> nn.Module:
    torch.manual_seed(3)
    layers = [nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(0.2))
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers)


def data(batch: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    x = torch.rand(batch, 5, generator=generator)
    x[0, 0], x[1, 1] = 0.0, 1.0  # on the box edges
    return x, torch.randint(0, 3, (batch,), generator=generator)


def flags(model: nn.Module) -> list[tuple[str, bool]]:
    return [(name, module.training) for name, module in model.named_modules()]


@pytest.mark.parametrize("name", NAMES)
def test_output_contract(name):
    model = bn_model()
    x, y = data()
    out = CALLS[name](model, x, y)
    assert isinstance(out, ObjectiveOutput)
    assert out.loss.dim() == 0 and out.loss.requires_grad and math.isfinite(out.loss.item())
    assert not out.adv.requires_grad and out.adv.shape == x.shape and out.adv.dtype == x.dtype
    assert float((out.adv - x).abs().max()) <= EPS + 1e-6
    assert float(out.adv.min()) >= 0.0 and float(out.adv.max()) <= 1.0
    assert out.logits.shape == (6, 3) and out.logits.grad_fn is not None
    with pytest.raises(AttributeError):
        out.loss = torch.tensor(0.0)  # frozen


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("user_mode", ["train", "train_with_frozen_parts", "eval"])
def test_modes_restored_exactly(name, user_mode):
    model = bn_model()
    model.train(user_mode != "eval")
    if user_mode == "train_with_frozen_parts":
        model[1].eval()  # a frozen BatchNorm
        model[3].eval()  # and a frozen dropout
    helper_before = flags(HELPER)
    before = flags(model)
    x, y = data()
    CALLS[name](model, x, y)
    assert flags(model) == before
    assert flags(HELPER) == helper_before
    assert model[1].track_running_stats is True
    assert HELPER[1].track_running_stats is True


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_running_statistics_updates(name):
    model = bn_model(dropout=False).train()
    helper_stats = HELPER[1].running_mean.clone()
    x, y = data()
    CALLS[name](model, x, y)
    assert int(model[1].num_batches_tracked) == BN_UPDATES[name]
    torch.testing.assert_close(HELPER[1].running_mean, helper_stats)


@pytest.mark.parametrize("name", NAMES)
def test_logits_are_the_clean_forward_pass(name):
    model = bn_model(dropout=False).train()
    x, y = data()
    out = CALLS[name](model, x, y)
    with torch.no_grad():
        expected = model(x)  # train mode: batch statistics, as in the objective
    torch.testing.assert_close(out.logits.detach(), expected)


@pytest.mark.parametrize("name", NAMES)
def test_no_parameter_gradients_from_the_attack(name):
    model = bn_model()
    x, y = data()
    out = CALLS[name](model, x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is None for p in HELPER.parameters())
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert all(p.grad is None for p in HELPER.parameters())
    assert all(p.requires_grad for p in HELPER.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_random_draws_are_as_documented(name):
    model = bn_model(dropout=False)  # no dropout: the model itself draws nothing
    x, y = data()
    kind, count = RNG_DRAWS[name]
    torch.manual_seed(5)
    first = CALLS[name](model, x, y).adv
    after_call = torch.rand(3)
    torch.manual_seed(5)
    for _ in range(count):
        (torch.randn_like if kind == "normal" else torch.rand_like)(x)
    assert torch.equal(after_call, torch.rand(3))
    torch.manual_seed(5)
    assert torch.equal(CALLS[name](model, x, y).adv, first)


@pytest.mark.parametrize("name", NAMES)
def test_flags_restored_when_the_forward_pass_raises(name):
    class FailsInEval(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(5, 3)

        def forward(self, x):
            if not self.training:
                raise RuntimeError("eval forward")
            return self.inner(x)

    class FailsWithFrozenBatchNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.BatchNorm1d(5)
            self.inner = nn.Linear(5, 3)

        def forward(self, x):
            if not self.norm.track_running_stats:
                raise RuntimeError("frozen statistics")
            return self.inner(self.norm(x))

    x, y = data()
    raised = 0
    for model in (FailsInEval(), FailsWithFrozenBatchNorm()):
        model.train()
        model.inner.eval()
        before = flags(model)
        try:
            CALLS[name](model, x, y)
        except RuntimeError:
            raised += 1
        assert flags(model) == before
        assert all(m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert raised >= 1


@pytest.mark.parametrize("name", NAMES)
def test_mixed_precision_loss_is_fp32_and_finite(name):
    model = bn_model()
    x, y = data()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = CALLS[name](model, x, y)
    assert out.loss.dtype == torch.float32 and math.isfinite(out.loss.item())
    assert float((out.adv - x).abs().max()) <= EPS + 1e-6
    out.loss.backward()


def _call_with(name, **changes):
    settings = {"eps": EPS, "step_size": STEP, "steps": 1}
    extra = {
        "pgd_at": {},
        "trades": {"beta": 1.0},
        "mart": {"beta": 1.0},
        "hat": {"beta": 1.0, "helper": HELPER},
        "squeeze": {"beta": 1.0},
        "single_step": {"reg_weight": 0.0},
    }[name]
    settings.update(extra)
    settings.update(changes)
    x, y = settings.pop("x", None), settings.pop("y", None)
    data_x, data_y = data()
    fn = {
        "pgd_at": pgd_at,
        "trades": trades,
        "mart": mart,
        "hat": hat,
        "squeeze": squeeze,
        "single_step": single_step,
    }[name]
    return fn(bn_model(), data_x if x is None else x, data_y if y is None else y, **settings)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"eps": -0.1}, "-0.1"),
        ({"eps": float("nan")}, "nan"),
        ({"step_size": 0.0}, "step_size"),
        ({"steps": 0}, "steps"),
        ({"x": torch.full((6, 5), 1.5)}, "1.5"),
        ({"x": torch.rand(6, 5) - 0.5}, r"\[0, 1\]"),
        ({"y": torch.zeros(5, dtype=torch.long)}, r"\(5,\)"),
    ],
)
def test_bad_settings_raise_value_error(name, change, message):
    with pytest.raises(ValueError, match=message):
        _call_with(name, **change)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "change", [{"steps": 2.0}, {"steps": True}, {"eps": "8/255"}, {"step_size": None}]
)
def test_settings_of_the_wrong_type_raise_type_error(name, change):
    (value,) = change.values()
    with pytest.raises(TypeError, match=repr(value).replace("/", ".")):
        _call_with(name, **change)


@pytest.mark.parametrize("name", ["trades", "mart", "hat", "squeeze"])
@pytest.mark.parametrize("beta", [-1.0, float("inf")])
def test_bad_beta_raises(name, beta):
    with pytest.raises(ValueError, match="beta"):
        _call_with(name, beta=beta)
    with pytest.raises(TypeError, match="beta"):
        _call_with(name, beta="6")


def test_bad_method_arguments_raise():
    with pytest.raises(ValueError, match="gamma"):
        _call_with("hat", gamma=-0.5)
    with pytest.raises(ValueError, match="nan"):
        _call_with("hat", h=float("nan"))
    with pytest.raises(TypeError, match="helper"):
        _call_with("hat", helper="model.pt")
    with pytest.raises(ValueError, match="reg_weight"):
        _call_with("single_step", reg_weight=-1.0)
    with pytest.raises(ValueError, match="steps=10"):
        _call_with("single_step", steps=10)
    with pytest.raises(TypeError, match="dtype"):
        _call_with("trades", y=torch.zeros(6))
    with pytest.raises(TypeError, match="floating"):
        _call_with("trades", x=torch.zeros(6, 5, dtype=torch.long))


def test_single_step_without_regularizer_is_plain_fgsm_rs():
    """``reg_weight=0`` gives the FGSM-RS loss, CE on the adversarial example only."""
    model = bn_model(dropout=False)
    x, y = data()
    torch.manual_seed(2)
    out = single_step(model, x, y, eps=EPS, step_size=10 / 255, reg_weight=0.0)
    model.train()
    with torch.no_grad():
        expected = nn.functional.cross_entropy(model(out.adv), y)
    torch.testing.assert_close(out.loss.detach(), expected)
