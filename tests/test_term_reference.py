"""The term and its gradients against a per-sample loop reference, over several epochs."""

from __future__ import annotations

import math

import pytest
import torch

from memloss_addon import MemoryWrapper
from tests.helpers import (
    ReferenceMemory,
    adversarial_stand_in,
    epoch_batches,
    kl_by_hand,
    mlp,
)

NUM_SAMPLES, BATCH, FEATURES = 10, 4, 4


def test_kl_by_hand_matches_the_textbook_value():
    p = [math.exp(1) / (math.exp(1) + 1), 1 / (math.exp(1) + 1)]
    expected = sum(pc * math.log(pc / 0.5) for pc in p)
    got = float(kl_by_hand(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])))
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize(
    ("weighting", "detach_weight"), [("difficulty", True), ("difficulty", False), ("none", True)]
)
def test_term_and_gradients_match_the_loop_reference(depth, weighting, detach_weight):
    model = mlp(FEATURES)
    data = torch.rand(NUM_SAMPLES, FEATURES, dtype=torch.float64)
    labels = torch.arange(NUM_SAMPLES) % 3
    memory = MemoryWrapper(
        model,
        NUM_SAMPLES,
        (FEATURES,),
        beta_prime=1.5,
        depth=depth,
        weighting=weighting,
        detach_weight=detach_weight,
    )
    reference = ReferenceMemory(
        model, depth=depth, beta_prime=1.5, weighting=weighting, detach_weight=detach_weight
    )
    params = list(model.parameters())
    nonzero_terms = 0
    for epoch in range(4):
        for indices in epoch_batches(NUM_SAMPLES, BATCH, epoch):
            x, y = data[indices], labels[indices]
            adv = adversarial_stand_in(x, epoch)
            expected = reference(indices, x, adv, model(x), y)
            got = memory(indices, x, adv, model(x), y)
            assert got.dim() == 0
            assert float(got.detach()) == pytest.approx(
                float(expected.detach()), rel=1e-9, abs=1e-12
            )
            if epoch == 0:
                assert float(got) == 0.0
                continue
            nonzero_terms += 1
            grads_got = torch.autograd.grad(got, params)
            grads_expected = torch.autograd.grad(expected, params)
            for g, e in zip(grads_got, grads_expected, strict=True):
                torch.testing.assert_close(g, e, rtol=1e-8, atol=1e-12)
    assert nonzero_terms == 9  # epochs 1-3, three batches each


def test_gradient_flows_through_clean_and_memory_logits():
    model = mlp(FEATURES)
    memory = MemoryWrapper(model, NUM_SAMPLES, (FEATURES,))
    x = torch.rand(3, FEATURES, dtype=torch.float64)
    idx, y = torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2])
    memory(idx, x, adversarial_stand_in(x, 0), model(x), y)
    clean_logits = model(x).detach().requires_grad_(True)
    term = memory(idx, x, adversarial_stand_in(x, 1), clean_logits, y)
    (clean_grad,) = torch.autograd.grad(term, clean_logits, retain_graph=True)
    assert clean_grad.abs().sum() > 0
    # With the clean logits detached, the only path to the parameters is the memory forward.
    param_grads = torch.autograd.grad(term, list(model.parameters()))
    assert sum(float(g.abs().sum()) for g in param_grads) > 0


def test_partially_filled_batch_runs_the_model_on_filled_samples_only():
    model = mlp(FEATURES)
    seen_batch_sizes = []
    model.register_forward_hook(lambda _m, inputs, _o: seen_batch_sizes.append(inputs[0].shape[0]))
    memory = MemoryWrapper(model, NUM_SAMPLES, (FEATURES,))
    x = torch.rand(4, FEATURES, dtype=torch.float64)
    y = torch.zeros(4, dtype=torch.long)
    memory(torch.tensor([0, 1, 2, 3]), x, x, x[:, :3] * 0, y)
    assert seen_batch_sizes == []  # nothing stored yet: no forward pass at all
    memory(torch.tensor([2, 5, 6, 7]), x, x, x[:, :3] * 0, y)
    assert seen_batch_sizes == [1]  # only sample 2 has a slot
