"""bn_mode of the memory forward pass: normalization statistics and every module flag."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper


class Recorder(nn.Module):
    """Records what reaches it, i.e. the normalized memory examples, and returns 2 logits."""

    def __init__(self):
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return x[:, :2]


def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Dropout(0.0), Recorder())
    with torch.no_grad():
        model[0].running_mean.copy_(torch.tensor([0.3, -0.2, 0.1]))
        model[0].running_var.copy_(torch.tensor([2.0, 0.5, 1.5]))
    model[1].eval()  # a per-module choice the memory must not undo
    return model


def call_twice(model, bn_mode):
    """Fills the memory, then runs the pass that reads it; returns the stored examples."""
    memory = MemoryWrapper(model, 4, (3,), bn_mode=bn_mode)
    stored = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.2, 0.3], [0.4, 0.4, 0.8], [0.9, 0.1, 0.0]])
    clean = torch.zeros(4, 3)
    targets = torch.zeros(4, dtype=torch.long)
    # write=True: the model may be in eval mode here, and the test needs a filled memory.
    memory(torch.arange(4), clean, stored, torch.zeros(4, 2), targets, write=True)
    return memory, stored, clean, targets


@pytest.mark.parametrize("bn_mode", ["train", "frozen", "eval"])
@pytest.mark.parametrize("model_training", [True, False])
def test_flags_and_track_running_stats_are_left_as_found(bn_mode, model_training):
    model = build()
    model.train(model_training)
    model[1].train(not model_training)
    flags = [m.training for m in model.modules()]
    memory, stored, clean, targets = call_twice(model, bn_mode)
    memory(torch.arange(4), clean, stored, torch.zeros(4, 2), targets, write=True)
    assert memory.stats()["rows_read"] == 4  # the memory forward pass ran
    assert [m.training for m in model.modules()] == flags
    assert model[0].track_running_stats is True


def test_train_mode_uses_batch_statistics_and_updates_running_statistics():
    model = build()
    memory, stored, clean, targets = call_twice(model, "train")
    mean_before = model[0].running_mean.clone()
    var_before = model[0].running_var.clone()
    memory(torch.arange(4), clean, stored, torch.zeros(4, 2), targets)
    batch_mean = stored.mean(0)
    batch_var = stored.var(0, unbiased=False)
    expected_out = (stored - batch_mean) / torch.sqrt(batch_var + 1e-5)
    torch.testing.assert_close(model[2].seen[-1], expected_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[0].running_mean, 0.9 * mean_before + 0.1 * batch_mean)
    unbiased = stored.var(0, unbiased=True)
    torch.testing.assert_close(model[0].running_var, 0.9 * var_before + 0.1 * unbiased)
    assert int(model[0].num_batches_tracked) == 1


def test_frozen_mode_uses_batch_statistics_and_leaves_running_statistics():
    model = build()
    memory, stored, clean, targets = call_twice(model, "frozen")
    before = {k: v.clone() for k, v in model[0].state_dict().items()}
    memory(torch.arange(4), clean, stored, torch.zeros(4, 2), targets)
    batch_mean, batch_var = stored.mean(0), stored.var(0, unbiased=False)
    expected_out = (stored - batch_mean) / torch.sqrt(batch_var + 1e-5)
    torch.testing.assert_close(model[2].seen[-1], expected_out, rtol=1e-5, atol=1e-6)
    for key, value in model[0].state_dict().items():
        assert torch.equal(value, before[key]), key


def test_eval_mode_uses_running_statistics_and_leaves_them():
    model = build()
    memory, stored, clean, targets = call_twice(model, "eval")
    before = {k: v.clone() for k, v in model[0].state_dict().items()}
    memory(torch.arange(4), clean, stored, torch.zeros(4, 2), targets)
    expected_out = (stored - before["running_mean"]) / torch.sqrt(before["running_var"] + 1e-5)
    torch.testing.assert_close(model[2].seen[-1], expected_out, rtol=1e-5, atol=1e-6)
    for key, value in model[0].state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training


def test_flags_are_restored_when_the_forward_pass_raises():
    class Failing(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    model = nn.Sequential(nn.BatchNorm1d(3), Failing())
    memory = MemoryWrapper(model, 2, (3,), bn_mode="eval")
    x = torch.rand(2, 3)
    targets = torch.zeros(2, dtype=torch.long)
    memory(torch.arange(2), x, x, torch.zeros(2, 2), targets)
    before = memory.state_dict()["slots"].clone()
    with pytest.raises(RuntimeError, match="boom"):
        memory(torch.arange(2), x, x + 0.1, torch.zeros(2, 2), targets)
    assert model.training and model[0].training and model[0].track_running_stats
    assert torch.equal(memory.state_dict()["slots"], before)  # nothing stored after a failure
