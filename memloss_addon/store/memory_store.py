"""The memory store: per-sample slots of encoded adversarial examples on a chosen device.

``MemoryStore`` joins three parts with one job each: a codec (how a row is encoded), a placement
(where rows live) and a slot ring (which slots of a sample are filled). Everything that depends on
dtypes and devices is here; the caller sees examples in, examples out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from .codecs import Mode, make_codec
from .placement import TensorStore
from .slots import ReadPlan, SlotRing

__all__ = ["MemoryRead", "MemoryStore", "estimate_nbytes", "FORMAT_VERSION"]

FORMAT_VERSION = 1

_DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.uint8: "uint8",
    torch.int8: "int8",
}


def dtype_name(dtype: torch.dtype) -> str:
    """The short name used in state dicts and messages (``torch.float16`` -> ``"float16"``)."""
    return _DTYPE_NAMES.get(dtype, str(dtype))


def estimate_nbytes(
    num_samples: int,
    sample_shape: tuple[int, ...],
    *,
    depth: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes a memory of this configuration allocates: slots plus 8 bytes of bookkeeping a sample.

    Pinned reads to CUDA add two batch-sized staging buffers on top of this.

    Example:
        >>> estimate_nbytes(50_000, (3, 32, 32), dtype=torch.uint8)
        154000000
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    return num_samples * depth * math.prod(sample_shape) * itemsize + num_samples * 8


@dataclass(frozen=True)
class MemoryRead:
    """Memory examples of a batch: row ``r`` belongs to batch position ``sample_of_row[r]``."""

    examples: torch.Tensor
    sample_of_row: torch.Tensor
    slots_of_sample: torch.Tensor

    @property
    def num_rows(self) -> int:
        return int(self.sample_of_row.shape[0])


class MemoryStore:
    """Slots of ``depth`` encoded examples for each of ``num_samples`` samples.

    Args:
        num_samples: dataset size; samples are keyed by their dataset index.
        sample_shape: shape of one input, e.g. ``(3, 32, 32)``.
        depth: slots per sample.
        mode: ``"example"`` stores the adversarial example, ``"perturbation"`` stores
            ``adv - clean`` and replays it on the current clean input.
        dtype: storage dtype (float32, float16, bfloat16, uint8, int8).
        eps: the L-inf radius; needed by int8, used by uint8 to re-project on read.
        device: ``"cpu"`` or a CUDA device.
        pin_memory: pin a CPU store (``None``: when CUDA is available).

    Example:
        >>> store = MemoryStore(num_samples=4, sample_shape=(2,))
        >>> store.write(torch.tensor([3]), torch.tensor([[0.5, 1.0]]), torch.zeros(1, 2))
        0
        >>> read = store.read(torch.tensor([3, 0]), torch.zeros(2, 2))
        >>> read.examples.tolist(), read.sample_of_row.tolist(), read.slots_of_sample.tolist()
        ([[0.5, 1.0]], [0], [1, 0])
    """

    def __init__(
        self,
        *,
        num_samples: int,
        sample_shape: tuple[int, ...],
        depth: int = 1,
        mode: Mode = "example",
        dtype: torch.dtype = torch.float32,
        eps: float | None = None,
        device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
    ) -> None:
        self.codec = make_codec(mode=mode, dtype=dtype, eps=eps)
        self.num_samples = num_samples
        self.sample_shape = tuple(sample_shape)
        self.depth = depth
        self.mode = mode
        self.dtype = dtype
        self.eps = None if eps is None else float(eps)
        self.ring = SlotRing(num_samples=num_samples, depth=depth)
        self.rows = TensorStore(
            num_samples * depth,
            self.sample_shape,
            dtype=dtype,
            device=device,
            pin_memory=pin_memory,
        )

    @property
    def device(self) -> torch.device:
        return self.rows.device

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes + self.ring.nbytes

    def read(self, indices: torch.Tensor, clean: torch.Tensor) -> MemoryRead:
        """Decoded memory examples of the filled slots of ``indices``, on ``clean``'s device.

        Args:
            indices: validated 1-D int64 CPU dataset indices of the batch.
            clean: the batch's clean inputs (perturbation and eps-projection replay on them).
        """
        plan: ReadPlan = self.ring.plan_read(indices)
        if plan.store_rows.numel() == 0:
            empty = clean.new_empty((0, *self.sample_shape))
            return MemoryRead(empty, plan.sample_of_row, plan.slots_of_sample)
        stored = self.rows.read(plan.store_rows, clean.device)
        clean_rows = clean.detach().index_select(0, plan.sample_of_row.to(clean.device))
        examples = self.codec.decode(stored, clean_rows)
        return MemoryRead(examples, plan.sample_of_row, plan.slots_of_sample)

    def write(self, indices: torch.Tensor, adv: torch.Tensor, clean: torch.Tensor) -> int:
        """Stores ``adv`` as the newest slot of each index; returns how many rows were rejected.

        Rows that are not finite (or overflow the storage dtype) are not stored: their samples keep
        their old slots. For an index repeated in the batch, the last accepted row wins.
        """
        encoded, accepted = self.codec.encode(adv, clean)
        accepted = accepted.cpu()
        plan = self.ring.plan_write(indices, accepted)
        if plan.samples.numel():
            winners = encoded
            every_row_in_order = plan.batch_positions.numel() == encoded.shape[0] and torch.equal(
                plan.batch_positions, torch.arange(encoded.shape[0])
            )
            if not every_row_in_order:  # duplicates or rejected rows: keep the winning rows only
                winners = encoded.index_select(0, plan.batch_positions.to(encoded.device))
            self.rows.write(plan.store_rows, winners)
            self.ring.commit(plan)
        return int(accepted.numel() - accepted.sum())

    def filled_fraction(self) -> float:
        return self.ring.filled_fraction()

    def config(self) -> dict[str, Any]:
        """The storage configuration: what a loaded state must match."""
        return {
            "num_samples": self.num_samples,
            "sample_shape": list(self.sample_shape),
            "depth": self.depth,
            "mode": self.mode,
            "dtype": dtype_name(self.dtype),
            "eps": self.eps,
        }

    def state_dict(self) -> dict[str, Any]:
        """Slots (as ``(num_samples, depth, *sample_shape)``), fill counts and ring heads.

        The tensors alias the live memory, as ``nn.Module.state_dict`` does: save or clone them
        before training goes on.
        """
        return {
            "slots": self.rows.data.view(self.num_samples, self.depth, *self.sample_shape),
            "slot_count": self.ring.slot_count,
            "ring_head": self.ring.ring_head,
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raises ValueError/TypeError if ``state`` cannot be loaded; changes nothing."""
        expected = {
            "slots": ((self.num_samples, self.depth, *self.sample_shape), self.dtype),
            "slot_count": ((self.num_samples,), torch.int32),
            "ring_head": ((self.num_samples,), torch.int32),
        }
        for key, (shape, dtype) in expected.items():
            if key not in state:
                raise ValueError(f"memory state has no {key!r} entry")
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"memory state {key!r} must be a tensor, got {type(value).__name__}"
                )
            if tuple(value.shape) != shape or value.dtype != dtype:
                raise ValueError(
                    f"memory state {key!r} has shape {tuple(value.shape)} and dtype {value.dtype}, "
                    f"expected {shape} and {dtype}"
                )
        counts, heads = state["slot_count"], state["ring_head"]
        if counts.numel() and (int(counts.min()) < 0 or int(counts.max()) > self.depth):
            raise ValueError(f"memory state 'slot_count' must lie in [0, {self.depth}]")
        if heads.numel() and (int(heads.min()) < 0 or int(heads.max()) >= self.depth):
            raise ValueError(f"memory state 'ring_head' must lie in [0, {self.depth - 1}]")
        slots = state["slots"]
        if slots.is_floating_point() and not bool(torch.isfinite(slots).all()):
            raise ValueError("memory state 'slots' holds NaN or Inf values")

    def load_state(self, state: dict[str, Any]) -> None:
        """Copies a checked state into the store, keeping its device and pinning."""
        self.check_state(state)
        self.rows.load_(state["slots"].reshape(self.rows.data.shape))
        self.ring.slot_count.copy_(state["slot_count"])
        self.ring.ring_head.copy_(state["ring_head"])
