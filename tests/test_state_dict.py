"""state_dict round trips that continue identically, and loads that refuse what does not fit."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper
from tests.helpers import run_epochs

N, SHAPE = 12, (1, 2, 3)
# The data run_epochs feeds: fixed inputs of seed 9, labels i % 4, batches of 5.
EPOCH_DATA = {
    "num_samples": N,
    "sample_shape": SHAPE,
    "classes": 4,
    "batch_size": 5,
    "data_seed": 9,
}


def make(**options) -> MemoryWrapper:
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4))
    return MemoryWrapper(model, N, SHAPE, depth=2, **options)


def saved_and_loaded(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_round_trip_then_continues_identically():
    original = make(dtype=torch.float16)
    run_epochs(original, range(3), **EPOCH_DATA)
    state = saved_and_loaded(original.state_dict())
    restored = make(dtype=torch.float16)
    restored.load_state_dict(state)
    assert restored.stats() == original.stats()
    assert run_epochs(restored, range(3, 6), **EPOCH_DATA) == run_epochs(
        original, range(3, 6), **EPOCH_DATA
    )
    for key in ("slots", "slot_count", "ring_head", "last_weight", "fooled_at_write"):
        assert torch.equal(restored.state_dict()[key], original.state_dict()[key])
    assert restored.stats() == original.stats()


def test_state_dict_holds_no_model_and_records_the_configuration():
    memory = make(dtype=torch.uint8, eps=0.1)
    state = memory.state_dict()
    assert set(state) == {
        "format_version",
        "config",
        "slots",
        "slot_count",
        "ring_head",
        "last_weight",
        "fooled_at_write",
        "counters",
    }
    assert state["config"] == {
        "num_samples": N,
        "sample_shape": [1, 2, 3],
        "depth": 2,
        "mode": "example",
        "dtype": "uint8",
        "eps": 0.1,
        "view_padding": None,
        "beta_prime": 2.0,
        "weighting": "difficulty",
        "detach_weight": True,
        "bn_mode": "train",
    }
    assert all(
        p.data_ptr() != t.data_ptr()
        for p in memory.model.parameters()
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )


def test_load_keeps_the_memory_where_it_is():
    memory = make()
    memory.load_state_dict(saved_and_loaded(make().state_dict()))
    assert memory.state_dict()["slots"].device == memory.device


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"dtype": torch.float16}, "dtype"),
        ({"mode": "perturbation"}, "mode"),
        ({"dtype": torch.uint8, "eps": 0.1}, "dtype"),
        ({"beta_prime": 1.0}, "beta_prime"),
        ({"weighting": "none"}, "weighting"),
    ],
)
def test_load_refuses_another_configuration_and_changes_nothing(other, message):
    memory = make()
    run_epochs(memory, range(2), **EPOCH_DATA)
    before = {k: v.clone() for k, v in memory.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=message):
        memory.load_state_dict(make(**other).state_dict())
    for key, value in before.items():
        assert torch.equal(memory.state_dict()[key], value)


def test_non_strict_load_ignores_loss_settings_only():
    memory = make(beta_prime=1.0)
    memory.load_state_dict(make(beta_prime=3.0).state_dict(), strict=False)
    assert memory.beta_prime == 1.0
    with pytest.raises(ValueError, match="depth"):
        other = MemoryWrapper(nn.Identity(), N, SHAPE, depth=1)
        memory.load_state_dict(other.state_dict(), strict=False)


def corrupt(key: str, value) -> dict:
    state = make().state_dict()
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    state[key] = value(state[key]) if callable(value) else value
    return state


@pytest.mark.parametrize(
    ("state", "error", "message"),
    [
        (lambda: corrupt("format_version", 99), ValueError, "format_version"),
        (lambda: corrupt("slots", lambda t: t[:-1]), ValueError, "'slots' has shape"),
        (lambda: corrupt("slots", lambda t: t.half()), ValueError, "float16"),
        (lambda: corrupt("slots", lambda t: t.fill_(float("nan"))), ValueError, "NaN"),
        (lambda: corrupt("slot_count", lambda t: t.fill_(3)), ValueError, "slot_count"),
        (lambda: corrupt("ring_head", lambda t: t.fill_(-1)), ValueError, "ring_head"),
        (lambda: corrupt("ring_head", [0] * N), TypeError, "must be a tensor"),
        (lambda: corrupt("counters", {"calls": -1}), ValueError, "calls"),
        (lambda: corrupt("config", None), ValueError, "config"),
        (lambda: [1, 2], TypeError, "dict"),
    ],
)
def test_load_refuses_damaged_states_and_changes_nothing(state, error, message):
    memory = make()
    run_epochs(memory, range(2), **EPOCH_DATA)
    before = {k: v.clone() for k, v in memory.state_dict().items() if isinstance(v, torch.Tensor)}
    stats_before = memory.stats()
    with pytest.raises(error, match=message):
        memory.load_state_dict(state())
    for key, value in before.items():
        assert torch.equal(memory.state_dict()[key], value)
    assert memory.stats() == stats_before
