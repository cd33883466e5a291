"""Attacks and guards: expected values come from hand computations and plain loops written here."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from torch import nn

from memloss_addon.experiments.attacks import (
    AutoAttackConfig,
    autoattack_linf,
    build_autoattack,
    cw_margin_loss,
    import_torchattacks,
    pgd_linf,
    preserve_rng_state,
    run_attack_chain,
)
from memloss_addon.model_state import frozen_parameters, preserved_training_flags
from memloss_addon.objectives.pgd import project_linf
from tests.helpers import plain_pgd


def small_net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def separated_linear_problem(seed: int = 0):
    """A 4-class linear model and samples whose exact L-inf robustness is known.

    For logits z = W x + b and label y = argmax z, the smallest L-inf perturbation that makes
    class k win is (z_y - z_k) / ||w_y - w_k||_1 (inputs stay inside [0, 1], so the box never
    binds). Samples are kept only when that distance is clearly above or below eps, so any
    reasonable attack must reach the exact answer. Three samples are given a wrong label.
    """
    gen = torch.Generator().manual_seed(seed)
    linear = nn.Linear(16, 4)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4, 16, generator=gen))
        linear.bias.zero_()
    model = nn.Sequential(nn.Flatten(), linear)
    x = 0.3 + 0.4 * torch.rand(400, 1, 4, 4, generator=gen)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(dim=1)
    w = linear.weight.detach()
    distance = torch.full((len(x),), float("inf"))
    for i in range(len(x)):
        for k in range(4):
            if k != int(y[i]):
                gap = (z[i, y[i]] - z[i, k]) / (w[y[i]] - w[k]).abs().sum()
                distance[i] = min(distance[i], gap)
    eps = float(distance.median())
    assert eps < 0.3  # x +- eps stays inside [0, 1]
    keep = ((distance > 1.5 * eps) | (distance < 0.5 * eps)).nonzero().squeeze(1)[:30]
    x, y, distance = x[keep], y[keep].clone(), distance[keep]
    y[:3] = (y[:3] + 1) % 4
    robust = distance > eps
    robust[:3] = False
    return model, x, y, eps, robust


# ------------------------------------------------------------------ losses and projection


def test_cw_margin_loss_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.5, 1.0], [0.1, 0.3, -1.0], [4.0, 4.0, 1.0]])
    labels = torch.tensor([0, 2, 1])
    # max over the other classes minus the true logit, by hand:
    expected = torch.tensor([1.0 - 2.0, 0.3 - (-1.0), 4.0 - 4.0])
    torch.testing.assert_close(cw_margin_loss(logits, labels), expected)


def test_cw_margin_loss_rejects_bad_shapes():
    with pytest.raises(ValueError, match="labels"):
        cw_margin_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="logits"):
        cw_margin_loss(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def test_project_linf_clips_to_ball_then_box():
    x = torch.tensor([0.5, 0.5, 0.02, 0.99])
    adv = torch.tensor([0.9, 0.45, -0.5, 1.5])
    expected = torch.tensor([0.6, 0.45, 0.0, 1.0])
    torch.testing.assert_close(project_linf(adv, x, 0.1), expected)


# ------------------------------------------------------------------ PGD


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_without_random_start_equals_plain_loop(loss):
    model = small_net().eval()
    x = torch.rand(10, 1, 4, 4)
    y = torch.randint(0, 4, (10,))
    ours = pgd_linf(model, x, y, eps=0.1, step_size=0.03, steps=7, loss=loss, random_start=False)
    ref = plain_pgd(model, x, y, eps=0.1, alpha=0.03, steps=7, loss=loss, start=x)
    assert torch.equal(ours, ref)
    assert not torch.equal(ours, x)  # the attack moved


def test_pgd_random_start_follows_the_generator():
    model = small_net().eval()
    x = torch.rand(6, 1, 4, 4)
    y = torch.randint(0, 4, (6,))
    ours = pgd_linf(
        model, x, y, eps=0.05, step_size=0.01, steps=5, generator=torch.Generator().manual_seed(7)
    )
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(7))
    start = (x + 0.05 * (2 * noise - 1)).clamp(0, 1)
    ref = plain_pgd(model, x, y, eps=0.05, alpha=0.01, steps=5, loss="ce", start=start)
    assert torch.equal(ours, ref)


def test_pgd_reaches_the_exact_corner_on_a_linear_two_class_model():
    # For z = W x the CW margin gradient is w_other - w_y everywhere, so PGD must end at
    # x + eps * sign(w_other - w_y), the exact worst case in the ball, once the steps can cross
    # the ball from any random start (6 * 0.04 >= 2 * 0.1).
    torch.manual_seed(3)
    linear = nn.Linear(16, 2, bias=False)
    model = nn.Sequential(nn.Flatten(), linear)
    x = 0.3 + 0.4 * torch.rand(5, 1, 4, 4)
    y = torch.tensor([0, 1, 0, 1, 1])
    direction = linear.weight[1 - y] - linear.weight[y]
    expected = x + 0.1 * direction.detach().sign().view(5, 1, 4, 4)
    adv = pgd_linf(model, x, y, eps=0.1, step_size=0.04, steps=6, loss="cw")
    torch.testing.assert_close(adv, expected)


def test_pgd_stays_in_the_ball_and_box():
    model = small_net()
    x = torch.rand(8, 1, 4, 4)
    adv = pgd_linf(model, x, torch.randint(0, 4, (8,)), eps=0.2, step_size=0.15, steps=3)
    assert float((adv - x).abs().max()) <= 0.2 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_pgd_logits_fn_reads_dict_outputs():
    net = small_net().eval()

    class DictOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return {"logits": self.net(x), "features": x}

    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
    plain = pgd_linf(net, x, y, eps=0.1, step_size=0.03, steps=3, random_start=False)
    wrapped = pgd_linf(
        DictOutput(),
        x,
        y,
        eps=0.1,
        step_size=0.03,
        steps=3,
        random_start=False,
        logits_fn=lambda out: out["logits"],
    )
    assert torch.equal(plain, wrapped)
    with pytest.raises(TypeError, match="logits_fn"):
        pgd_linf(DictOutput(), x, y, eps=0.1, step_size=0.03, steps=1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0, "step_size": 0.1, "steps": 1}, "eps"),
        ({"eps": 0.1, "step_size": -1.0, "steps": 1}, "step_size"),
        ({"eps": 0.1, "step_size": 0.1, "steps": -2}, "steps"),
        ({"eps": 0.1, "step_size": 0.1, "steps": 1, "loss": "kl"}, "loss"),
    ],
)
def test_pgd_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pgd_linf(small_net(), torch.rand(2, 1, 4, 4), torch.tensor([0, 1]), **kwargs)


# ------------------------------------------------------------------ guards


def test_preserve_rng_state_restores_every_generator_even_on_error():
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    with pytest.raises(RuntimeError), preserve_rng_state():
        torch.manual_seed(0)
        random.seed(0)
        np.random.seed(0)
        torch.rand(3), random.random(), np.random.rand()
        raise RuntimeError
    after = (torch.rand(2), random.random(), np.random.rand())
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    assert torch.equal(after[0], torch.rand(2))
    assert after[1] == random.random()
    assert after[2] == np.random.rand()


def test_preserved_training_flags_keeps_per_module_freezes():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Dropout(), nn.ReLU()))
    net.train()
    net[1].eval()  # a user-frozen BatchNorm
    net[2][0].eval()
    before = [m.training for m in net.modules()]
    with pytest.raises(RuntimeError), preserved_training_flags(net):
        net.train()
        raise RuntimeError
    assert [m.training for m in net.modules()] == before
    with preserved_training_flags(net):
        net.eval()
    assert [m.training for m in net.modules()] == before == [True, True, False, True, False, True]


def test_frozen_parameters_restores_each_flag():
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    net[1].bias.requires_grad_(False)
    with frozen_parameters(net):
        assert not any(p.requires_grad for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, False]


def test_guards_reject_non_modules():
    with pytest.raises(TypeError, match="Module"), preserved_training_flags(lambda x: x):
        pass


# ------------------------------------------------------------------ attack chain


class ScriptedAttack:
    """Pushes feature `feature` up by `push` on every sample it sees, and records what it saw."""

    def __init__(self, feature: int, push: float):
        self.feature, self.push, self.seen = feature, push, None

    def __call__(self, x, y):
        self.seen = x.clone()
        adv = x.clone()
        adv[..., self.feature] += self.push
        return adv


def test_chain_is_the_per_sample_worst_case_and_attacks_see_only_survivors():
    # The model's logits are the 4 input features. Each sample has its true class at 0.5 and one
    # rival feature below it; rival 1 and 2 sit 0.05 below (beatable with eps = 0.1), rival 3
    # sits 0.3 below (not beatable). Sample 5 is misclassified from the start.
    model = nn.Flatten()
    rows = [
        (0, 1, 0.45),
        (0, 2, 0.45),
        (1, 3, 0.2),
        (2, 1, 0.45),
        (3, 2, 0.45),
        (1, 0, 0.6),
        (2, 3, 0.2),
    ]
    x = torch.zeros(len(rows), 1, 1, 4)
    y = torch.tensor([label for label, _, _ in rows])
    for i, (label, rival, value) in enumerate(rows):
        x[i, 0, 0, label] = 0.5
        x[i, 0, 0, rival] = value
    first, second, cheat = ScriptedAttack(1, 0.1), ScriptedAttack(2, 0.1), ScriptedAttack(3, 0.5)
    result = run_attack_chain(model, x, y, [first, second, cheat], eps=0.1)

    # By hand: clean-correct = all but sample 5; `first` fools samples 0 and 3 (rival 1);
    # `second` fools samples 1 and 4 (rival 2); `cheat` would fool 2 and 6 only from outside
    # the ball, so after projection they stay robust.
    assert result.robust.tolist() == [False, False, True, False, False, False, True]
    assert result.remaining == [6, 4, 2, 2]
    assert len(first.seen) == 6 and len(second.seen) == 4 and len(cheat.seen) == 2
    assert torch.equal(second.seen, x[[1, 2, 4, 6]])
    fooled = ~result.robust
    fooled[5] = False
    assert (model(result.adv[fooled]).argmax(1) != y[fooled]).all()
    assert float((result.adv - x).abs().max()) <= 0.1 + 1e-6
    assert torch.equal(result.adv[result.robust], x[result.robust])


def test_autoattack_finds_the_exact_answer_on_a_linear_model():
    model, x, y, eps, robust = separated_linear_problem()
    assert 0 < int(robust.sum()) < len(y)  # both outcomes occur
    config = AutoAttackConfig(apgd_steps=5, apgdt_steps=5, fab_steps=5, square_queries=20)
    result = autoattack_linf(model, x, y, eps=eps, config=config)
    assert torch.equal(result.robust, robust)
    assert result.remaining[0] == len(y) - 3


def test_autoattack_on_a_parameterless_model_with_a_known_answer():
    # The logits are the 16 pixels: the best attack lowers the top pixel and raises the runner-up
    # by eps each, so a sample is robust exactly when top - second > 2 eps.
    x = 0.3 + 0.4 * torch.rand(200, 1, 4, 4)
    top2 = x.flatten(1).topk(2, dim=1).values
    gap = top2[:, 0] - top2[:, 1]
    eps = float(gap.median()) / 2
    keep = ((gap > 3 * eps) | (gap < eps)).nonzero().squeeze(1)[:20]
    x, gap = x[keep], gap[keep]
    y = x.flatten(1).argmax(dim=1)
    result = autoattack_linf(nn.Flatten(), x, y, eps=eps, config=AutoAttackConfig.fast())
    assert torch.equal(result.robust, gap > 2 * eps)
    assert 0 < int(result.robust.sum()) < len(y)


def test_autoattack_restores_modes_rng_and_gradients():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 4))
    model.train()
    model[2].eval()
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    model[3].bias.requires_grad_(False)
    flags = [m.training for m in model.modules()]
    x = torch.rand(6, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)  # correct on all samples, and a tiny eps: every attack runs
    y[0] = (y[0] + 1) % 4

    torch.manual_seed(5)
    result = autoattack_linf(model, x, y, eps=1e-4, config=AutoAttackConfig.fast(), seed=123)
    assert result.remaining == [5, 5, 5, 5, 5]
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after, torch.rand(3))
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == [True] * 5 + [False]
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())


def test_reference_counts_reach_torchattacks():
    chain = dict(build_autoattack(small_net(), eps=8 / 255, n_classes=10))
    assert list(chain) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert chain["apgd-ce"].steps == 100 and chain["apgd-ce"].loss == "ce"
    assert chain["apgd-t"].steps == 100 and chain["apgd-t"].n_target_classes == 9
    assert chain["fab-t"].steps == 100 and chain["fab-t"].n_target_classes == 9
    assert chain["fab-t"].multi_targeted
    assert chain["square"].n_queries == 5000 and chain["square"].p_init == 0.8
    assert all(a.n_restarts == 1 and a.eps == 8 / 255 for a in chain.values())
    fast = dict(
        build_autoattack(small_net(), eps=0.1, n_classes=10, config=AutoAttackConfig.fast())
    )
    assert fast["apgd-t"].n_target_classes == 3 and fast["square"].n_queries == 100


def test_autoattack_config_and_inputs_are_checked():
    with pytest.raises(ValueError, match="apgd_steps"):
        AutoAttackConfig(apgd_steps=0)
    with pytest.raises(ValueError, match="n_target_classes"):
        AutoAttackConfig(n_target_classes=5).targets(4)
    with pytest.raises(ValueError, match="n_classes=3"):
        build_autoattack(small_net(), eps=0.1, n_classes=3)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        autoattack_linf(small_net(), torch.rand(2, 16), torch.tensor([0, 1]), eps=0.1)


def test_missing_torchattacks_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(ImportError, match=r"memloss-addon\[attacks\]"):
        import_torchattacks()
