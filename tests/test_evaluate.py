"""evaluate(): accuracies checked against plain loops written here, and state isolation."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memloss_addon.experiments.attacks import AutoAttackConfig
from memloss_addon.experiments.evaluate import evaluate
from tests.helpers import plain_pgd

TINY_AUTOATTACK = AutoAttackConfig(
    apgd_steps=3, apgdt_steps=3, fab_steps=3, square_queries=10, n_target_classes=3
)


def bn_dropout_net() -> nn.Module:
    """A model whose output depends on train/eval mode (BatchNorm batch statistics, dropout)."""
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(16, 12),
        nn.BatchNorm1d(12),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(12, 4),
    )


def batches(n_batches: int = 3, size: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(size, 1, 4, 4, generator=gen), torch.randint(0, 4, (size,), generator=gen))
        for _ in range(n_batches)
    ]


def plain_pgd_accuracy(model, data, *, eps, alpha, steps, loss, seed=None):
    """Eval-mode PGD written out: optional uniform start from a seeded generator, sign steps on
    the summed loss, clip to the ball then to [0, 1]; accuracy of the last iterate."""
    model.eval()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    correct = total = 0
    for x, y in data:
        if gen is None:
            adv = x.clone()
        else:
            adv = (x + eps * (2 * torch.rand(x.shape, generator=gen) - 1)).clamp(0, 1)
        adv = plain_pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, loss=loss, start=adv)
        with torch.no_grad():
            correct += int((model(adv).argmax(1) == y).sum())
        total += len(y)
    return correct / total


def clean_accuracy(model, data):
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in data)
    return hits / sum(len(y) for _, y in data)


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_and_cw_accuracies_equal_plain_loops(random_start):
    model = bn_dropout_net()
    data = batches()
    # Give BatchNorm non-trivial running statistics, then leave the model in train mode: the
    # evaluation must still use eval mode.
    with torch.no_grad():
        for x, _ in data:
            model(x)
    model.train()
    eps, alpha = 0.3, 0.05
    got = evaluate(
        model,
        data,
        eps=eps,
        pgd_steps=6,
        pgd_step_size=alpha,
        random_start=random_start,
        seed=4,
        progress=False,
    )
    reference = bn_dropout_net()
    reference.load_state_dict(model.state_dict())
    ce_seed, cw_seed = (4, 5) if random_start else (None, None)
    expected = {
        "clean": clean_accuracy(reference, data),
        "pgd": plain_pgd_accuracy(
            reference, data, eps=eps, alpha=alpha, steps=6, loss="ce", seed=ce_seed
        ),
        "cw": plain_pgd_accuracy(
            reference, data, eps=eps, alpha=alpha, steps=6, loss="cw", seed=cw_seed
        ),
    }
    assert got == expected
    assert expected["pgd"] < expected["clean"]  # the attack does something at this eps


def test_default_step_size_is_two_and_a_half_eps_over_steps():
    model = bn_dropout_net().eval()
    data = batches(n_batches=1)
    got = evaluate(model, data, eps=0.2, attacks=["pgd"], pgd_steps=5, seed=0, progress=False)
    expected = plain_pgd_accuracy(
        model, data, eps=0.2, alpha=2.5 * 0.2 / 5, steps=5, loss="ce", seed=0
    )
    assert got == {"pgd": expected}


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def test_evaluate_leaves_the_callers_rng_stream_untouched():
    model = bn_dropout_net().eval()
    data = batches(n_batches=2)
    seed_everything(21)
    evaluate(
        model,
        data,
        eps=0.1,
        attacks=("clean", "pgd", "cw", "autoattack"),
        pgd_steps=2,
        autoattack=TINY_AUTOATTACK,
        progress=False,
    )
    after = (torch.rand(4), random.random(), np.random.rand())
    seed_everything(21)
    assert torch.equal(after[0], torch.rand(4))
    assert after[1] == random.random()
    assert after[2] == np.random.rand()


def test_shuffling_loader_does_not_advance_the_callers_stream():
    data = TensorDataset(torch.rand(12, 1, 4, 4), torch.randint(0, 4, (12,)))
    loader = DataLoader(data, batch_size=5, shuffle=True)
    model = bn_dropout_net()
    torch.manual_seed(2)
    evaluate(model, loader, eps=0.1, attacks=["clean"], progress=False)
    after = torch.rand(2)
    torch.manual_seed(2)
    assert torch.equal(after, torch.rand(2))


def test_modes_parameter_flags_grads_and_bn_statistics_are_restored():
    model = bn_dropout_net()
    model.train()
    model[2].eval()  # user-frozen BatchNorm
    model[5].weight.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.5)
    flags = [m.training for m in model.modules()]
    requires = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate(
        model,
        batches(n_batches=2),
        eps=0.2,
        attacks=("clean", "pgd", "cw", "autoattack"),
        pgd_steps=2,
        autoattack=TINY_AUTOATTACK,
        progress=False,
    )
    assert [m.training for m in model.modules()] == flags
    assert [p.requires_grad for p in model.parameters()] == requires
    assert all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in model.parameters())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_autoattack_is_the_exact_worst_case_on_a_linear_model():
    # Linear 4-class model: a sample with label y = argmax z is robust at radius eps exactly when
    # (z_y - z_k) > eps * ||w_y - w_k||_1 for every k != y (inputs stay inside [0, 1]).
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(16, 4)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(4, 16, generator=gen))
        linear.bias.zero_()
    model = nn.Sequential(nn.Flatten(), linear)
    x = 0.3 + 0.4 * torch.rand(300, 1, 4, 4, generator=gen)
    with torch.no_grad():
        z = model(x)
    y = z.argmax(1)
    w = linear.weight.detach()
    gaps = torch.tensor(
        [
            min(
                float((z[i, y[i]] - z[i, k]) / (w[y[i]] - w[k]).abs().sum())
                for k in range(4)
                if k != int(y[i])
            )
            for i in range(len(x))
        ]
    )
    eps = float(gaps.median())
    keep = ((gaps > 1.5 * eps) | (gaps < 0.5 * eps)).nonzero().squeeze(1)[:24]
    x, y, gaps = x[keep], y[keep], gaps[keep]
    expected = int((gaps > eps).sum()) / len(gaps)
    assert 0 < expected < 1
    data = [(x[:12], y[:12]), (x[12:], y[12:])]
    got = evaluate(
        model,
        data,
        eps=eps,
        attacks=["clean", "autoattack"],
        autoattack=TINY_AUTOATTACK,
        progress=False,
    )
    assert got == {"clean": 1.0, "autoattack": expected}


# A bias-free linear 4-class model on 1x2x2 inputs with hand-set weights (rows: classes).
HAND_WEIGHTS = [
    [2.0, -1.0, 0.0, 0.5],
    [0.0, 2.0, -1.0, 0.0],
    [0.5, 0.0, 2.0, -1.0],
    [-1.0, 0.5, 0.0, 2.0],
]


def worst_case_margin(x: list[float], label: int, eps: float) -> float:
    """min over k != label and x' in the eps-ball around x inside [0, 1] of z_label - z_k.

    The margin is linear in x', so each coordinate sits at the end of its interval that lowers
    (w_label - w_k) . x'; with eps = 0 it is the clean margin (> 0: classified correctly).
    """
    worst = float("inf")
    for k in range(len(HAND_WEIGHTS)):
        if k == label:
            continue
        total = 0.0
        for j, value in enumerate(x):
            low, high = max(value - eps, 0.0), min(value + eps, 1.0)
            slope = HAND_WEIGHTS[label][j] - HAND_WEIGHTS[k][j]
            total += slope * (low if slope > 0 else high)
        worst = min(worst, total)
    return worst


def test_autoattack_counts_exactly_the_provably_robust_samples():
    # Three kinds of samples, each known by construction: misclassified on the clean input
    # (never robust, whatever the attacks do), correct and provably robust (the worst case over
    # the whole ball is still correct: no attack can break them), and correct but breakable (a
    # corner of the ball is misclassified by a clear margin, easily found on a linear model).
    # A chain that skipped its attacks, credited a misclassified sample, or left the eps-ball
    # would report another robust set; the per-kind runs pin the set down exactly.
    eps, clear = 0.1, 0.05
    linear = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor(HAND_WEIGHTS))
    model = nn.Sequential(nn.Flatten(), linear)
    gen = torch.Generator().manual_seed(0)
    x_all = torch.rand(200, 1, 2, 2, generator=gen)
    y_all = torch.randint(0, 4, (200,), generator=gen)
    kinds: dict[str, list[int]] = {"misclassified": [], "robust": [], "breakable": []}
    for i in range(len(y_all)):
        row, label = x_all[i].flatten().tolist(), int(y_all[i])
        clean, worst = worst_case_margin(row, label, 0.0), worst_case_margin(row, label, eps)
        if clean < -clear:
            kinds["misclassified"].append(i)
        elif worst > clear:
            kinds["robust"].append(i)
        elif clean > clear and worst < -clear:
            kinds["breakable"].append(i)
    picked = {kind: indices[:8] for kind, indices in kinds.items()}
    assert all(len(indices) == 8 for indices in picked.values())

    def run(indices: list[int]) -> dict[str, float]:
        order = torch.tensor(sorted(indices))  # the kinds interleave in the dataset's order
        x, y = x_all[order], y_all[order]
        half = (len(order) + 1) // 2
        data = [(x[:half], y[:half]), (x[half:], y[half:])]
        config = AutoAttackConfig.fast()
        return evaluate(
            model, data, eps=eps, attacks=["autoattack", "clean"], autoattack=config, progress=False
        )

    everything = run([i for indices in picked.values() for i in indices])
    assert list(everything) == ["autoattack", "clean"]
    assert everything == {"autoattack": 8 / 24, "clean": 16 / 24}
    assert run(picked["robust"]) == {"autoattack": 1.0, "clean": 1.0}
    assert run(picked["breakable"]) == {"autoattack": 0.0, "clean": 1.0}
    assert run(picked["misclassified"]) == {"autoattack": 0.0, "clean": 0.0}


def test_logits_fn_and_indexed_batches():
    net = bn_dropout_net().eval()

    class TupleOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return x.flatten(1), self.net(x)

    data = batches()
    with_index = [(x, y, torch.arange(len(y))) for x, y in data]
    kwargs = {
        "eps": 0.2,
        "attacks": ("clean", "pgd", "cw", "autoattack"),
        "pgd_steps": 3,
        "autoattack": TINY_AUTOATTACK,
        "progress": False,
    }
    plain = evaluate(net, data, **kwargs)
    wrapped = evaluate(TupleOutput(), with_index, logits_fn=lambda out: out[1], **kwargs)
    assert plain == wrapped
    assert all(0.0 <= v <= 1.0 for v in plain.values())


def test_progress_bar_with_and_without_tqdm(monkeypatch):
    model = bn_dropout_net().eval()
    loader = DataLoader(
        TensorDataset(torch.rand(6, 1, 4, 4), torch.randint(0, 4, (6,))), batch_size=3
    )
    with_bar = evaluate(model, loader, eps=0.1, pgd_steps=2, progress=True)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    without = evaluate(model, loader, eps=0.1, pgd_steps=2, progress=True)
    assert with_bar == without


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"attacks": ["fgsm"]}, ValueError, "fgsm"),
        ({"attacks": "pgd"}, TypeError, "'pgd'"),
        ({"attacks": []}, ValueError, "at least one"),
        ({"attacks": ["pgd", "pgd"]}, ValueError, "repeated"),
        ({"eps": -0.1}, ValueError, "-0.1"),
        ({"pgd_steps": 0}, ValueError, "pgd_steps"),
        ({"pgd_step_size": 0.0}, ValueError, "pgd_step_size"),
    ],
)
def test_bad_settings_are_rejected(kwargs, error, match):
    settings = {"eps": 0.1, "progress": False, **kwargs}
    with pytest.raises(error, match=match):
        evaluate(bn_dropout_net(), batches(n_batches=1), **settings)


def test_bad_loaders_are_rejected():
    model = bn_dropout_net()
    with pytest.raises(ValueError, match="no samples"):
        evaluate(model, [], eps=0.1, progress=False)
    with pytest.raises(TypeError, match="tuple"):
        evaluate(model, [{"x": torch.rand(2, 1, 4, 4)}], eps=0.1, progress=False)
    with pytest.raises(ValueError, match="labels"):
        evaluate(
            model,
            [(torch.rand(2, 1, 4, 4), torch.zeros(3, dtype=torch.long))],
            eps=0.1,
            progress=False,
        )


def test_missing_torchattacks_fails_before_any_work(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchattacks", None)
    with pytest.raises(ImportError, match=r"memloss-addon\[attacks\]"):
        evaluate(
            bn_dropout_net(), batches(), eps=0.1, attacks=["clean", "autoattack"], progress=False
        )
