"""Property tests: random shapes, dtypes, devices, indices and hostile values.

Every call either returns a finite term equal to an independent float64 computation, or raises
a clear ``ValueError``/``TypeError``/``IndexError`` and leaves the memory byte-for-byte unchanged
(slots, fill counts, ring heads and counters).

Bad-input classes tried (see ``CORRUPTIONS`` and the index test): negative indices, indices equal
to or above ``num_samples``, float/bool/uint8/complex index dtypes, floats or bools inside an index
list, NumPy float and bool index arrays, 2-D and wrong-length indices, duplicate indices, empty
batches, targets out of range (negative and ``>= classes``), float targets, 2-D targets, wrong
batch sizes of clean/adv/logits/targets, wrong sample shapes of clean and adv, 1-D and 3-D logits,
integer clean and adv, adv given as a NumPy array, tensors on different devices (with CUDA); and
as values that must be handled rather than refused: NaN, +Inf and -Inf rows in adv, adv values
outside [0, 1] (-0.5, 1.5, 1e3, +-7e4, 3.5e38) including values that overflow the storage dtype,
tiny values, half-precision logits up to +-6e4, and NaN/Inf in the clean input.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from memloss_addon import MemoryWrapper
from tests.helpers import assert_unchanged, snapshot, term_by_hand

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
STORAGES = [
    ("example", torch.float32, None),
    ("example", torch.float16, None),
    ("example", torch.bfloat16, None),
    ("example", torch.uint8, None),
    ("example", torch.uint8, 8 / 255),
    ("perturbation", torch.float32, None),
    ("perturbation", torch.float16, 0.1),
    ("perturbation", torch.bfloat16, None),
    ("perturbation", torch.int8, 8 / 255),
    ("perturbation", torch.int8, 0.1),
]
SPECIAL_VALUES = [
    float("nan"),
    float("inf"),
    -float("inf"),
    -0.5,
    1.5,
    1e3,
    7e4,
    -7e4,
    3.5e38,
    1e-30,
    0.0,
    1.0,
]
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class RecordingModel(nn.Module):
    """Affine logits computed in float64; records every input it sees."""

    def __init__(self, features: int, classes: int, logit_scale: float, dtype: torch.dtype):
        super().__init__()
        generator = torch.Generator().manual_seed(features * 31 + classes)
        weight = torch.randn(features, classes, generator=generator, dtype=torch.float64)
        bias = torch.randn(classes, generator=generator, dtype=torch.float64) * logit_scale
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.out_dtype = dtype
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.detach().clone())
        z = x.double().flatten(1) @ self.weight.to(x.device) + self.bias.to(x.device)
        # Clamped so that half-precision logits stay finite: the model is not under test.
        return z.clamp(-6e4, 6e4).to(self.out_dtype)


class Reference:
    """What the memory must hold and return, written from the documented rules in float64."""

    def __init__(self, *, num_samples, depth, mode, dtype, eps, beta_prime, weighting):
        self.depth, self.mode, self.dtype, self.eps = depth, mode, dtype, eps
        self.beta_prime, self.weighting = beta_prime, weighting
        self.slots: dict[int, list[torch.Tensor]] = {i: [] for i in range(num_samples)}
        self.counters = dict(calls=0, terms_computed=0, rows_read=0, rows_written=0)
        self.counters["rejected_rows"] = 0

    def delta(self, adv_row, clean_row) -> torch.Tensor:
        return (adv_row - clean_row).double()  # as the caller's dtype computes it

    def accepts(self, adv_row, clean_row) -> bool:
        if self.mode == "example":
            values = adv_row.double()
            if not bool(torch.isfinite(values).all()):
                return False
            if self.dtype.is_floating_point:
                return float(values.abs().max()) <= torch.finfo(self.dtype).max
            return True
        delta = self.delta(adv_row, clean_row)
        if not bool(torch.isfinite(delta).all()):
            return False
        if self.dtype == torch.int8 or self.eps is not None:
            return True  # clamped to the eps-ball, which fits every storage dtype
        return float(delta.abs().max()) <= torch.finfo(self.dtype).max

    def encode(self, adv_row, clean_row) -> torch.Tensor:
        """The stored value (float64); for uint8 and int8 the exact value before rounding."""
        if self.mode == "example":
            if self.dtype == torch.uint8:
                return adv_row.double().clamp(0, 1) * 255
            return adv_row.to(self.dtype).double()
        delta = self.delta(adv_row, clean_row)
        if self.dtype == torch.int8:
            return (delta / (self.eps / 127)).clamp(-127, 127)
        if self.eps is not None:
            delta = delta.clamp(-self.eps, self.eps)
        return delta.to(self.dtype).double()

    def decode(self, stored: torch.Tensor, clean_row: torch.Tensor) -> torch.Tensor:
        """The memory example (float64) from a stored value and the current clean input."""
        stored, clean = stored.double(), clean_row.double()
        if self.mode == "example":
            if self.dtype != torch.uint8:
                return stored
            example = stored / 255
            if self.eps is not None:
                example = torch.minimum(torch.maximum(example, clean - self.eps), clean + self.eps)
                example = example.clamp(0, 1)
            return example
        if self.dtype == torch.int8:
            stored = stored * (self.eps / 127)
        return (clean + stored).clamp(0, 1)

    def stored_tolerance(self, input_dtype: torch.dtype) -> dict:
        if not self.dtype.is_floating_point:
            # Rounded to the nearest step: at most half a step away, plus the rounding of the
            # scaling in the input dtype (up to 127 or 255 steps).
            return {"rtol": 0, "atol": 0.5 + 4 * 255 * torch.finfo(input_dtype).eps}
        if self.mode == "example":
            return {"rtol": 0, "atol": 0}  # a plain cast
        rounding = torch.finfo(input_dtype).eps + torch.finfo(self.dtype).eps
        return {"rtol": 2 * rounding, "atol": 1e-30}


def ulps(dtype: torch.dtype) -> float:
    return 3 * torch.finfo(dtype).eps


@st.composite
def memories(draw):
    mode, dtype, eps = draw(st.sampled_from(STORAGES))
    shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=3)))
    return {
        "num_samples": draw(st.integers(1, 8)),
        "sample_shape": shape,
        "depth": draw(st.integers(1, 3)),
        "mode": mode,
        "dtype": dtype,
        "eps": eps,
        "beta_prime": draw(st.sampled_from([0.0, 0.5, 2.0])),
        "weighting": draw(st.sampled_from(["difficulty", "none"])),
        "classes": draw(st.integers(2, 4)),
        "input_dtype": draw(st.sampled_from(FLOATS)),
        "logit_dtype": draw(st.sampled_from(FLOATS)),
        "logit_scale": draw(st.sampled_from([1.0, 30.0, 1e3, 6e4])),
        "device": draw(st.sampled_from(DEVICES)),
    }


@st.composite
def batches(draw, config):
    n, shape = config["num_samples"], config["sample_shape"]
    batch = draw(st.integers(0, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n, (batch,), generator=generator)  # duplicates are likely
    clean = torch.rand(batch, *shape, generator=generator, dtype=torch.float64)
    noise = (torch.rand(batch, *shape, generator=generator, dtype=torch.float64) - 0.5) * 0.2
    adv = clean + noise
    flat = adv.view(batch, int(np.prod(shape)))
    for _ in range(draw(st.integers(0, 3)) if batch else 0):
        row = draw(st.integers(0, batch - 1))
        column = draw(st.integers(0, flat.shape[1] - 1))
        flat[row, column] = draw(st.sampled_from(SPECIAL_VALUES))
    scale = config["logit_scale"]
    logits = (torch.rand(batch, config["classes"], generator=generator) - 0.5) * 2 * scale
    device, dtype = config["device"], config["input_dtype"]
    return {
        "indices": indices,
        "clean": clean.to(device, dtype),
        "adv": adv.to(device, dtype),
        "logits": logits.to(device, config["logit_dtype"]),
        "targets": torch.randint(0, config["classes"], (batch,), generator=generator).to(device),
    }


def with_first(tensor: torch.Tensor, value) -> torch.Tensor:
    changed = tensor.clone()
    changed[0] = value
    return changed


# name -> (applies to a batch of size B, change, expected error)
CORRUPTIONS = {
    "negative index": (1, lambda b, n: {"indices": with_first(b["indices"], -1)}, IndexError),
    "index == num_samples": (1, lambda b, n: {"indices": with_first(b["indices"], n)}, IndexError),
    "index > num_samples": (
        1,
        lambda b, n: {"indices": with_first(b["indices"], n + 1000)},
        IndexError,
    ),
    "float indices": (0, lambda b, n: {"indices": b["indices"].double()}, TypeError),
    "bool indices": (0, lambda b, n: {"indices": b["indices"] > 0}, TypeError),
    "uint8 indices": (0, lambda b, n: {"indices": b["indices"].to(torch.uint8)}, TypeError),
    "complex indices": (0, lambda b, n: {"indices": b["indices"].to(torch.complex64)}, TypeError),
    "float in an index list": (
        1,
        lambda b, n: {"indices": [0.5] + b["indices"][1:].tolist()},
        TypeError,
    ),
    "bool in an index list": (
        1,
        lambda b, n: {"indices": [True] + [0] * (len(b["indices"]) - 1)},
        TypeError,
    ),
    "numpy float indices": (
        0,
        lambda b, n: {"indices": b["indices"].numpy().astype(float)},
        TypeError,
    ),
    "numpy bool indices": (0, lambda b, n: {"indices": b["indices"].numpy() > 0}, TypeError),
    "2-D indices": (0, lambda b, n: {"indices": b["indices"].view(1, -1)}, ValueError),
    "one index too many": (
        0,
        lambda b, n: {"indices": torch.cat([b["indices"], torch.zeros(1, dtype=torch.long)])},
        ValueError,
    ),
    "target below 0": (1, lambda b, n: {"targets": with_first(b["targets"], -1)}, ValueError),
    "target >= classes": (
        1,
        lambda b, n: {"targets": with_first(b["targets"], b["logits"].shape[1])},
        ValueError,
    ),
    "float targets": (0, lambda b, n: {"targets": b["targets"].float()}, TypeError),
    "2-D targets": (0, lambda b, n: {"targets": b["targets"].view(-1, 1)}, ValueError),
    "targets batch size": (
        0,
        lambda b, n: {"targets": torch.cat([b["targets"], b["targets"].new_zeros(1)])},
        ValueError,
    ),
    "logits batch size": (
        0,
        lambda b, n: {
            "logits": torch.cat([b["logits"], b["logits"].new_zeros(1, b["logits"].shape[1])])
        },
        ValueError,
    ),
    "clean sample shape": (0, lambda b, n: {"clean": b["clean"].unsqueeze(1)}, ValueError),
    "adv sample shape": (0, lambda b, n: {"adv": b["adv"].unsqueeze(-1)}, ValueError),
    "clean batch size": (1, lambda b, n: {"clean": b["clean"][1:]}, ValueError),
    "adv batch size": (1, lambda b, n: {"adv": b["adv"][1:]}, ValueError),
    "1-D logits": (0, lambda b, n: {"logits": b["logits"].flatten()}, ValueError),
    "3-D logits": (0, lambda b, n: {"logits": b["logits"].unsqueeze(-1)}, ValueError),
    "integer clean": (0, lambda b, n: {"clean": b["clean"].long()}, TypeError),
    "integer adv": (0, lambda b, n: {"adv": b["adv"].to(torch.int32)}, TypeError),
    "adv as a NumPy array": (0, lambda b, n: {"adv": b["adv"].cpu().float().numpy()}, TypeError),
}
TARGET_VALUES = ("target below 0", "target >= classes")
if torch.cuda.is_available():
    CORRUPTIONS["adv on another device"] = (
        0,
        lambda b, n: {"adv": b["adv"].to("cpu" if b["adv"].is_cuda else "cuda")},
        ValueError,
    )


def slot_of_age(memory: MemoryWrapper, sample: int, age: int) -> torch.Tensor:
    state = memory.state_dict()
    slot = (int(state["ring_head"][sample]) - age) % memory.depth
    return state["slots"][sample, slot].double().cpu()


def check_stored(memory: MemoryWrapper, reference: Reference, input_dtype) -> None:
    counts = memory.state_dict()["slot_count"]
    for sample, expected in reference.slots.items():
        assert int(counts[sample]) == len(expected), f"sample {sample}"
        for age, value in enumerate(expected):
            torch.testing.assert_close(
                slot_of_age(memory, sample, age),
                value,
                **reference.stored_tolerance(input_dtype),
                equal_nan=False,
            )


def expected_term(reference, model, batch, stored_before, seen):
    """The term from the documented formula, in float64, on the inputs the model received."""
    indices = batch["indices"].tolist()
    clean = batch["clean"].cpu()
    rows, owners = [], []
    for position, sample in enumerate(indices):
        for stored in stored_before[sample]:
            rows.append(reference.decode(stored, clean[position]))
            owners.append(position)
    if not rows or reference.beta_prime == 0.0:
        assert not seen, "no forward pass is needed"
        return 0.0, 0, 0.0
    assert len(seen) == 1 and seen[0].shape[0] == len(rows)
    examples = seen[0].cpu()
    # The memory examples are the decoded slots, in the input dtype (a few units of rounding).
    decoded = torch.stack(rows).to(clean.dtype).double()
    torch.testing.assert_close(
        examples.double(), decoded, rtol=ulps(clean.dtype), atol=ulps(clean.dtype)
    )
    memory_logits = model(seen[0]).double().cpu()
    model.seen.pop()
    clean_logits = batch["logits"].double().cpu()
    per_sample: list[list[torch.Tensor]] = [[] for _ in indices]
    for row, position in enumerate(owners):
        per_sample[position].append(memory_logits[row])
    expected = term_by_hand(
        clean_logits,
        per_sample,
        batch["targets"].cpu(),
        beta_prime=reference.beta_prime,
        weighting=reference.weighting,
    )
    largest = max(float(clean_logits.abs().max()), float(memory_logits.abs().max()))
    return float(expected), len(rows), largest


def apply_write(reference: Reference, batch) -> int:
    indices = batch["indices"].tolist()
    adv, clean = batch["adv"].cpu(), batch["clean"].cpu()
    winners: dict[int, int] = {}
    rejected = 0
    for position, sample in enumerate(indices):
        if reference.accepts(adv[position], clean[position]):
            winners[sample] = position  # the last accepted row of a sample wins
        else:
            rejected += 1
    for sample, position in winners.items():
        encoded = reference.encode(adv[position], clean[position])
        reference.slots[sample] = [encoded, *reference.slots[sample]][: reference.depth]
    return rejected


@FUZZ
@given(data=st.data())
def test_random_calls_match_the_reference_or_raise_and_change_nothing(data):
    config = data.draw(memories())
    model = RecordingModel(
        int(np.prod(config["sample_shape"])),
        config["classes"],
        config["logit_scale"],
        config["logit_dtype"],
    )
    options = {k: config[k] for k in ("depth", "mode", "dtype", "eps", "beta_prime", "weighting")}
    memory = MemoryWrapper(model, config["num_samples"], config["sample_shape"], **options)
    reference = Reference(num_samples=config["num_samples"], **options)
    for _ in range(data.draw(st.integers(2, 6))):
        batch = data.draw(batches(config))
        corruption = None
        if data.draw(st.integers(0, 3)) == 0:  # one call in four is refused
            corruption = data.draw(st.sampled_from(list(CORRUPTIONS)))
        if corruption is not None:
            min_batch, change, error = CORRUPTIONS[corruption]
            if len(batch["indices"]) < min_batch:
                continue
            if corruption in TARGET_VALUES and config["device"] != "cpu":
                continue  # target values on a GPU are range-checked by the caller's own loss
            event(f"refused: {corruption}")
            before = snapshot(memory)
            with pytest.raises(error):
                memory(**{**batch, **change(batch, config["num_samples"])})
            assert_unchanged(before, memory)
            assert not model.seen
            continue
        stored_before = {
            s: [v.clone() for v in reference_values(memory, s)] for s in reference.slots
        }
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rejected rows warn once
            term = memory(**batch)
        expected, rows, largest = expected_term(reference, model, batch, stored_before, model.seen)
        model.seen.clear()
        assert term.dtype == torch.float32 or term.dtype == torch.float64
        assert term.dim() == 0 and bool(torch.isfinite(term))
        # float32 log-softmax: absolute errors of a few units in the last place of the logits.
        tolerance = config["beta_prime"] * (1e-6 + 2e-7 * largest * config["classes"])
        assert float(term) == pytest.approx(expected, rel=1e-5, abs=tolerance)
        rejected = apply_write(reference, batch)
        event("term computed" if rows else "term zero")
        event("rows rejected" if rejected else "no row rejected")
        counters = reference.counters
        counters["calls"] += 1
        if rows:
            counters["terms_computed"] += 1
            counters["rows_read"] += rows
        counters["rows_written"] += len(batch["indices"]) - rejected
        counters["rejected_rows"] += rejected
        stats = memory.stats()
        assert {k: stats[k] for k in counters} == counters
        check_stored(memory, reference, config["input_dtype"])


def reference_values(memory: MemoryWrapper, sample: int) -> list[torch.Tensor]:
    """The memory's stored values of ``sample``, newest first (checked against the reference)."""
    count = int(memory.state_dict()["slot_count"][sample])
    return [slot_of_age(memory, sample, age) for age in range(count)]


INDEX_FORMS = ["tensor", "numpy", "list"]
INDEX_DTYPES = {
    "int64": (torch.int64, -(2**62), 2**62),
    "int32": (torch.int32, -(2**31), 2**31 - 1),
    "int16": (torch.int16, -(2**15), 2**15 - 1),
    "int8": (torch.int8, -128, 127),
    "uint8": (torch.uint8, 0, 255),
    "bool": (torch.bool, 0, 1),
    "float32": (torch.float32, -(2**20), 2**20),
}


@FUZZ
@given(
    num_samples=st.integers(1, 300),
    form=st.sampled_from(INDEX_FORMS),
    dtype_name=st.sampled_from(list(INDEX_DTYPES)),
    data=st.data(),
)
def test_any_index_array_is_used_or_refused_by_the_documented_rule(
    num_samples, form, dtype_name, data
):
    dtype, low, high = INDEX_DTYPES[dtype_name]
    batch = data.draw(st.integers(0, 5))
    length = data.draw(st.sampled_from([batch, batch, batch, batch + 1, max(batch - 1, 0)]))
    values = data.draw(
        st.lists(
            st.one_of(
                st.integers(low, high), st.integers(max(low, -3), min(high, num_samples + 3))
            ),
            min_size=length,
            max_size=length,
        )
    )
    indices = torch.tensor(values, dtype=dtype)
    if form == "numpy":
        indices = indices.numpy()
    elif form == "list":
        indices = indices.tolist()  # ints, bools or floats
    model = nn.Linear(2, 3)
    memory = MemoryWrapper(model, num_samples, (2,), depth=2)
    x = torch.rand(batch, 2)
    memory(torch.arange(batch) % num_samples, x, x, model(x), torch.zeros(batch, dtype=torch.long))
    before = snapshot(memory)

    # The documented order of checks: type, then shape, then range.
    wrong_type = dtype_name in ("float32", "bool") or (dtype_name == "uint8" and form == "tensor")
    if wrong_type and not (form == "list" and length == 0):  # an empty list has no wrong element
        expected = TypeError
    elif length != batch:
        expected = ValueError
    elif any(v < 0 or v >= num_samples for v in values):
        expected = IndexError
    else:
        expected = None
    call = (indices, x, x.flip(0), model(x), torch.zeros(batch, dtype=torch.long))
    if expected is None:
        term = memory(*call)
        assert bool(torch.isfinite(term))
        assert memory.stats()["rows_written"] == 2 * batch
    else:
        with pytest.raises(expected):
            memory(*call)
        assert_unchanged(before, memory)


@FUZZ
@given(config=memories(), data=st.data())
def test_non_finite_clean_inputs_never_reach_the_memory(config, data):
    """NaN or Inf in clean inputs (a caller's bug, not checked so as not to sync with a GPU):
    the call may return a non-finite term, but never stores a non-finite value."""
    model = RecordingModel(
        int(np.prod(config["sample_shape"])), config["classes"], 1.0, config["logit_dtype"]
    )
    options = {k: config[k] for k in ("depth", "mode", "dtype", "eps", "beta_prime", "weighting")}
    memory = MemoryWrapper(model, config["num_samples"], config["sample_shape"], **options)
    for _ in range(3):
        batch = data.draw(batches(config))
        if len(batch["indices"]):
            flat = batch["clean"].flatten(1)
            flat[0, 0] = data.draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            memory(**batch)
        slots = memory.state_dict()["slots"]
        if slots.is_floating_point():
            assert bool(torch.isfinite(slots.float()).all())


def test_inf_in_a_perturbation_is_rejected_not_clamped_to_eps():
    """An Inf delta must be refused before the eps clamp turns it into a plausible +-eps."""
    memory = MemoryWrapper(nn.Identity(), 2, (2,), mode="perturbation", eps=0.1, beta_prime=0.0)
    clean = torch.full((2, 2), 0.5)
    adv = clean.clone()
    adv[0, 0], adv[1, 1] = float("inf"), -float("inf")
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        memory(torch.arange(2), clean, adv, torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))
    assert memory.stats()["rejected_rows"] == 2
    assert memory.state_dict()["slot_count"].tolist() == [0, 0]
