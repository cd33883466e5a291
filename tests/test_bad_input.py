"""Every bad call raises a clear error naming the bad value and leaves the memory unchanged."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from memloss_addon import MemoryWrapper
from tests.helpers import assert_unchanged, snapshot

N, SHAPE = 6, (1, 2, 2)


def filled_memory(**options) -> MemoryWrapper:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    memory = MemoryWrapper(model, N, SHAPE, **options)
    x = torch.rand(N, *SHAPE)
    memory(
        torch.arange(N),
        x,
        (x + 0.01).clamp(0, 1),
        torch.zeros(N, 3),
        torch.zeros(N, dtype=torch.long),
    )
    return memory


def good_batch(batch: int = 3):
    x = torch.rand(batch, *SHAPE)
    return {
        "indices": torch.arange(batch),
        "clean": x,
        "adv": x.clone(),
        "logits": torch.zeros(batch, 3),
        "targets": torch.zeros(batch, dtype=torch.long),
    }


BAD_CALLS = [
    ("float indices", {"indices": torch.tensor([0.0, 1.0, 2.0])}, TypeError, "float32"),
    ("bool indices", {"indices": torch.tensor([True, False, True])}, TypeError, "torch.bool"),
    ("uint8 indices", {"indices": torch.tensor([0, 1, 2], dtype=torch.uint8)}, TypeError, "uint8"),
    ("string indices", {"indices": "012"}, TypeError, "str"),
    ("list of floats", {"indices": [0, 1.5, 2]}, TypeError, "1.5"),
    ("numpy floats", {"indices": np.array([0.0, 1.0, 2.0])}, TypeError, "float64"),
    ("2-D indices", {"indices": torch.tensor([[0, 1, 2]])}, ValueError, "(1, 3)"),
    ("short indices", {"indices": torch.tensor([0, 1])}, ValueError, "2 entries"),
    ("negative index", {"indices": torch.tensor([0, -1, 2])}, IndexError, "[-1]"),
    ("index == N", {"indices": torch.tensor([0, N, 2])}, IndexError, f"[{N}]"),
    ("index > N", {"indices": torch.tensor([0, 1, N + 5])}, IndexError, f"[{N + 5}]"),
    ("clean batch size", {"clean": torch.rand(2, *SHAPE)}, ValueError, "shape"),
    ("logits batch size", {"logits": torch.zeros(2, 3)}, ValueError, "batch sizes differ"),
    (
        "targets batch size",
        {"targets": torch.zeros(4, dtype=torch.long)},
        ValueError,
        "batch sizes",
    ),
    ("adv sample shape", {"adv": torch.rand(3, 1, 2, 3)}, ValueError, "(3, 1, 2, 3)"),
    ("clean sample shape", {"clean": torch.rand(3, 4)}, ValueError, "(3, 4)"),
    ("1-D logits", {"logits": torch.zeros(3)}, ValueError, "2-D"),
    ("3-D logits", {"logits": torch.zeros(3, 3, 1)}, ValueError, "2-D"),
    ("float targets", {"targets": torch.zeros(3)}, TypeError, "float32"),
    ("2-D targets", {"targets": torch.zeros(3, 1, dtype=torch.long)}, ValueError, "1-D"),
    ("target out of range", {"targets": torch.tensor([0, 3, 1])}, ValueError, "from 0 to 3"),
    ("integer adv", {"adv": torch.zeros(3, *SHAPE, dtype=torch.long)}, TypeError, "int64"),
    ("adv not a tensor", {"adv": np.zeros((3, *SHAPE))}, TypeError, "ndarray"),
]


@pytest.mark.parametrize(
    ("case", "override", "error", "message"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS]
)
def test_bad_call_raises_and_leaves_memory_unchanged(case, override, error, message):
    memory = filled_memory()
    before = snapshot(memory)
    calls_before = memory.stats()
    with pytest.raises(error) as raised:
        memory(**{**good_batch(), **override})
    assert message in str(raised.value)
    assert_unchanged(before, memory)
    assert memory.stats()["rows_written"] == calls_before["rows_written"]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"dtype": torch.int8, "mode": "perturbation"}, ValueError, "needs eps"),
        ({"dtype": torch.int8}, ValueError, "mode='perturbation'"),
        ({"dtype": torch.uint8, "mode": "perturbation"}, ValueError, "mode='example'"),
        ({"dtype": torch.float64}, ValueError, "float64"),
        ({"dtype": "float16"}, TypeError, "'float16'"),
        ({"mode": "delta"}, ValueError, "'delta'"),
        ({"weighting": "hard"}, ValueError, "'hard'"),
        ({"bn_mode": "freeze"}, ValueError, "'freeze'"),
        ({"depth": 0}, ValueError, "depth"),
        ({"depth": 1.5}, TypeError, "1.5"),
        ({"beta_prime": -1.0}, ValueError, "-1.0"),
        ({"beta_prime": float("nan")}, ValueError, "nan"),
        ({"eps": -0.1, "dtype": torch.uint8}, ValueError, "-0.1"),
        ({"device": "tpu"}, ValueError, "'tpu'"),
    ],
)
def test_bad_configuration_raises(options, error, message):
    with pytest.raises(error) as raised:
        MemoryWrapper(nn.Linear(4, 3), N, (4,), **options)
    assert message in str(raised.value)


@pytest.mark.parametrize(
    ("num_samples", "sample_shape", "error"),
    [(0, (4,), ValueError), (2.0, (4,), TypeError), (4, (), TypeError), (4, (3, 0), ValueError)],
)
def test_bad_sizes_raise(num_samples, sample_shape, error):
    with pytest.raises(error):
        MemoryWrapper(nn.Linear(4, 3), num_samples, sample_shape)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_device_without_cuda_raises():
    with pytest.raises(ValueError, match="CUDA is not available"):
        MemoryWrapper(nn.Linear(4, 3), N, (4,), device="cuda")


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_rows_are_not_stored_and_are_counted(bad_value):
    memory = filled_memory()
    before = snapshot(memory)
    batch = good_batch()
    batch["adv"][1, 0, 0, 1] = bad_value
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        memory(**batch)
    after = snapshot(memory)
    assert torch.equal(after["slots"][1], before["slots"][1])  # the old slot stays
    assert torch.equal(after["slots"][0, 0], batch["adv"][0])  # the finite rows are stored
    assert torch.equal(after["slots"][2, 0], batch["adv"][2])
    assert memory.stats()["rejected_rows"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: the next rejection is only counted
        memory(**batch)
    assert memory.stats()["rejected_rows"] == 2


def test_float16_overflow_is_rejected_not_stored_as_inf():
    memory = filled_memory(dtype=torch.float16)
    batch = good_batch()
    batch["adv"][0] = 7e4  # finite in float32, inf in float16
    with pytest.warns(RuntimeWarning):
        memory(**batch)
    assert torch.isfinite(memory.state_dict()["slots"].float()).all()


def test_non_finite_duplicate_does_not_win_over_a_finite_one():
    memory = filled_memory()
    batch = good_batch()
    batch["indices"] = torch.tensor([4, 4, 5])
    batch["adv"][1] = float("nan")
    with pytest.warns(RuntimeWarning):
        memory(**batch)
    assert torch.equal(memory.state_dict()["slots"][4, 0], batch["adv"][0])


def test_empty_batch_returns_zero_and_stores_nothing():
    memory = filled_memory()
    before = snapshot(memory)
    term = memory(
        torch.zeros(0, dtype=torch.long),
        torch.zeros(0, *SHAPE),
        torch.zeros(0, *SHAPE),
        torch.zeros(0, 3),
        torch.zeros(0, dtype=torch.long),
    )
    assert term.dim() == 0 and float(term) == 0.0
    after = snapshot(memory)
    for key in ("slots", "slot_count", "ring_head"):
        assert torch.equal(before[key], after[key])


def test_indices_as_list_and_numpy_are_accepted():
    memory = filled_memory()
    batch = good_batch()
    for indices in ([0, 1, 2], np.array([0, 1, 2]), torch.tensor([0, 1, 2], dtype=torch.int32)):
        term = memory(**{**batch, "indices": indices})
        assert torch.isfinite(term)
