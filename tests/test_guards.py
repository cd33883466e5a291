"""Misuses a newcomer makes, caught early and clearly; a correct loop is unchanged by the guards."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from memloss_addon import IndexedDataset, MemoryWrapper
from tests.helpers import assert_unchanged, snapshot

N, FEATURES, CLASSES = 20, 3, 4


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, 6), nn.ReLU(), nn.Linear(6, CLASSES))


def batch(size: int = 5, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(size, FEATURES, generator=generator)
    return torch.arange(size), x, (x + 0.05).clamp(0, 1), torch.arange(size) % CLASSES


def test_a_call_in_eval_mode_stores_nothing_and_warns_once():
    net = model()
    memory = MemoryWrapper(net, N, (FEATURES,))
    idx, x, adv, y = batch()
    net.eval()
    before = snapshot(memory)
    with pytest.warns(RuntimeWarning, match="eval mode.*write=True"):
        memory(idx, x, adv, net(x), y)
    counters = memory.state_dict()["counters"]
    assert counters["calls"] == 1 and counters["rows_written"] == 0  # counted, nothing stored
    before["counters"] = counters
    assert_unchanged(before, memory)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory(idx, x, adv, net(x), y)  # the second time: no warning
    assert memory.stats()["rows_written"] == 0
    memory(idx, x, adv, net(x), y, write=True)
    assert memory.stats()["rows_written"] == 5


def test_a_call_under_no_grad_stores_nothing():
    net = model()
    memory = MemoryWrapper(net, N, (FEATURES,))
    idx, x, adv, y = batch()
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="no_grad"):
        memory(idx, x, adv, net(x), y)
    assert memory.stats()["rows_written"] == 0 and memory.stats()["filled_fraction"] == 0.0


def test_frozen_stores_nothing_silently_and_write_false_too():
    net = model()
    memory = MemoryWrapper(net, N, (FEATURES,))
    idx, x, adv, y = batch()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with memory.frozen():
            memory(idx, x, adv, net(x), y)
        memory(idx, x, adv, net(x), y, write=False)
    assert memory.stats()["rows_written"] == 0
    memory(idx, x, adv, net(x), y)  # outside frozen(): stores again
    assert memory.stats()["rows_written"] == 5
    with pytest.raises(TypeError, match="write"):
        memory(idx, x, adv, net(x), y, write="yes")


def test_indices_equal_to_the_labels_warn_once():
    net = model()
    memory = MemoryWrapper(net, N, (FEATURES,))
    _, x, adv, _ = batch(8)
    labels = torch.tensor([0, 1, 2, 3, 3, 2, 1, 0])
    with pytest.warns(RuntimeWarning, match="equal the labels"):
        memory(labels, x, adv, net(x), labels)


def test_a_loader_that_drops_samples_is_reported_after_two_epochs():
    net = model()
    data = IndexedDataset(TensorDataset(torch.rand(N, FEATURES), torch.arange(N) % CLASSES))
    loader = DataLoader(data, batch_size=6, shuffle=False, drop_last=True)  # 18 of 20 samples
    memory = MemoryWrapper(net, N, (FEATURES,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for x, y, idx in loader:
                memory(idx, x, x, net(x), y)
    messages = [str(w.message) for w in caught if "have no memory" in str(w.message)]
    assert len(messages) == 1 and messages[0].startswith("2 of 20 samples")


def test_a_correct_loop_is_not_warned_and_unchanged_by_the_guards():
    net = model()
    data = IndexedDataset(TensorDataset(torch.rand(N, FEATURES), torch.arange(N) % CLASSES))
    loader = DataLoader(data, batch_size=5, shuffle=True, generator=torch.Generator())
    memory = MemoryWrapper(net, N, (FEATURES,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            for x, y, idx in loader:
                memory(idx, x, (x + 0.01).clamp(0, 1), net(x), y)
    assert memory.stats()["rows_written"] == 3 * N


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = model()

    def forward(self, x):
        return self.net(x), "features"


def test_a_tuple_output_is_named_at_the_first_read_and_by_check_model():
    net = TupleModel()
    memory = MemoryWrapper(net, N, (FEATURES,))
    idx, x, adv, y = batch()
    with pytest.raises(TypeError, match="logits_fn"):
        memory.check_model(x, num_classes=CLASSES)
    memory(idx, x, adv, net(x)[0], y)  # nothing stored yet: no forward pass, no error
    with pytest.raises(TypeError, match="returned a tuple.*logits_fn"):
        memory(idx, x, adv, net(x)[0], y)
    fixed = MemoryWrapper(net, N, (FEATURES,), logits_fn=lambda out: out[0])
    fixed.check_model(x, num_classes=CLASSES)
    with pytest.raises(TypeError, match=r"shape \(batch, 7\)"):
        fixed.check_model(x, num_classes=7)


def test_check_model_changes_no_state_and_draws_no_random_numbers():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, 6), nn.BatchNorm1d(6), nn.Dropout(0.5))
    memory = MemoryWrapper(net, N, (FEATURES,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    inputs = torch.rand(4, FEATURES)
    rng = torch.get_rng_state()
    memory.check_model(inputs)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(module.training for module in net.modules())


def test_epoch_stats_are_per_window_and_none_where_nothing_was_computed():
    net = model()
    memory = MemoryWrapper(net, N, (FEATURES,))
    idx, x, adv, y = batch()
    memory(idx, x, adv, net(x), y)
    first = memory.epoch_stats()
    assert first["calls"] == 1 and first["rows_written"] == 5
    assert first["mean_term"] is None and first["mean_weight"] is None
    assert first["memory_accuracy"] is None and first["last_term"] == 0.0
    terms = [memory(idx, x, adv, net(x), y) for _ in range(2)]
    second = memory.epoch_stats()
    assert second["calls"] == 2 and second["terms_computed"] == 2
    assert second["mean_term"] == pytest.approx(sum(float(t) for t in terms) / 2, rel=1e-6)
    assert memory.stats()["calls"] == 3  # cumulative
    assert memory.stats()["mean_term"] == pytest.approx(second["mean_term"], rel=1e-6)
    empty = memory.epoch_stats()
    assert empty["calls"] == 0 and empty["mean_term"] is None and empty["last_term"] is None
