"""The memory store: per-sample slots of encoded adversarial examples on a chosen device.

``MemoryStore`` joins three parts with one job each: a codec (how a row is encoded), a placement
(where rows live) and a slot ring (which slots of a sample are filled). Everything that depends on
dtypes and devices is here; the caller sees examples in, examples out.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from ..options import Mode
from . import transfer
from .codecs import dtype_name, make_codec
from .disk import open_disk_memory
from .journal import Journal
from .placement import PendingRead, TensorStore
from .slots import ReadPlan, SlotRing

__all__ = [
    "FORMAT_VERSION",
    "READABLE_FORMAT_VERSIONS",
    "MemoryRead",
    "MemoryStore",
    "SeenAtWrite",
    "estimate_nbytes",
]

# 2: per-slot bookkeeping (last weight, fooled at write). Version 1 states load with its initial
# values (see slots.BOOKKEEPING).
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)


def estimate_nbytes(
    num_samples: int,
    sample_shape: tuple[int, ...],
    *,
    depth: int = 1,
    dtype: torch.dtype = torch.float32,
) -> int:
    """Bytes a memory of this configuration allocates: slots plus bookkeeping.

    The bookkeeping (:data:`~memloss_addon.store.slots.BOOKKEEPING`) is 8 bytes per sample and
    5 per slot.

    Reads of a CPU memory to CUDA add pinned staging buffers on top of this: two for reads and
    one for prefetches, each the next power of two of a batch's bytes (``memory.nbytes`` counts
    them once they exist).

    Example:
        >>> estimate_nbytes(50_000, (3, 32, 32), dtype=torch.uint8)
        154250000
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    slots = num_samples * depth * math.prod(sample_shape) * itemsize
    return slots + SlotRing.estimate_nbytes(num_samples, depth)


@dataclass(frozen=True)
class MemoryRead:
    """Memory examples of a batch: row ``r`` belongs to batch position ``sample_of_row[r]``.

    ``slots_of_sample`` counts every filled slot of a sample (``K_i``), also those a selection
    left out of the rows; ``slot_ids`` names each row's slot for the bookkeeping.
    """

    examples: torch.Tensor
    sample_of_row: torch.Tensor
    slots_of_sample: torch.Tensor
    # Whether the memory forward pass must run. ``None``: when this batch has rows. A distributed
    # store sets it when any rank has rows, so that every rank runs the model the same number of
    # times (DDP's buffer broadcasts in a forward pass are collectives too).
    run_forward: bool | None = None
    slot_ids: torch.Tensor | None = None
    # Filled rows of the batch before a selection (``num_rows`` when nothing was left out).
    rows_filled: int | None = None

    @property
    def num_rows(self) -> int:
        return int(self.sample_of_row.shape[0])

    def subset(self, rows: torch.Tensor) -> MemoryRead:
        """The read of some of its rows (``rows``: row positions, in increasing order)."""
        return replace(
            self,
            examples=self.examples.index_select(0, transfer.to_device(rows, self.examples.device)),
            sample_of_row=self.sample_of_row.index_select(0, rows),
            slot_ids=None if self.slot_ids is None else self.slot_ids.index_select(0, rows),
            rows_filled=self.num_rows if self.rows_filled is None else self.rows_filled,
            run_forward=None if self.run_forward is None else bool(rows.numel()),
        )

    @property
    def needs_forward(self) -> bool:
        return self.num_rows > 0 if self.run_forward is None else self.run_forward


@dataclass(frozen=True)
class SeenAtWrite:
    """What the model made of each example of a write when it was made (from its logits).

    Attributes:
        fooled: ``(B,)`` bool, whether the example was misclassified.
        weight: ``(B,)`` float, ``1 - p_y`` of the example.
    """

    fooled: torch.Tensor
    weight: torch.Tensor


def facts_to_host(
    accepted: torch.Tensor, seen: SeenAtWrite | None
) -> tuple[torch.Tensor, SeenAtWrite | None]:
    """The per-row facts of a write on the host, with one device-to-host copy (one CUDA sync)."""
    if seen is None:
        return accepted.cpu(), None
    device = accepted.device
    rows = [accepted.float(), seen.fooled.to(device).float(), seen.weight.to(device).float()]
    host = torch.stack(rows).cpu()
    return host[0].bool(), SeenAtWrite(fooled=host[1].bool(), weight=host[2])


@dataclass(frozen=True)
class _Prefetch:
    """A read started ahead of time for exactly these indices."""

    indices: torch.Tensor
    plan: ReadPlan
    device: torch.device
    rows: PendingRead | None


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
        pin_memory: read a CPU (or disk-backed) store to CUDA through pinned staging buffers, a
            few batches of rows; the store itself is never pinned (``None``: when CUDA is
            available).
        storage_path: a folder to keep the memory in (see :mod:`memloss_addon.store.disk`)
            instead of RAM; reopening the folder continues where it left off. Needs
            ``device="cpu"`` (rows are still returned on the batch's device).

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
        storage_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.codec = make_codec(mode=mode, dtype=dtype, eps=eps)
        self.num_samples = num_samples
        self.sample_shape = tuple(sample_shape)
        self.depth = depth
        self.mode = mode
        self.dtype = dtype
        self.eps = None if eps is None else float(eps)
        if storage_path is not None and not isinstance(storage_path, (str, os.PathLike)):
            raise TypeError(f"storage_path must be a path or None, got {storage_path!r}")
        self.storage_path = None if storage_path is None else os.fspath(storage_path)
        self._prefetched: _Prefetch | None = None
        self._last_device: torch.device | None = None
        self.journal: Journal | None = None  # a disk-backed memory's undo journal
        self._call_step = 0
        if storage_path is None:
            self.ring = SlotRing(num_samples=num_samples, depth=depth)
            self.rows = TensorStore(
                self.local_rows * depth,
                self.sample_shape,
                dtype=dtype,
                device=device,
                pin_memory=pin_memory,
            )
            return
        if torch.device(device).type != "cpu":
            raise ValueError(
                f"a disk-backed memory (storage_path) needs device='cpu', got {device!r}; its rows "
                "are still returned on the batch's device"
            )
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA, which is not available")
        folder, layout = self._disk_layout(os.fspath(storage_path))
        self.rows, self.ring, self.journal = open_disk_memory(
            folder,
            layout=layout,
            num_samples=num_samples,
            depth=depth,
            row_shape=self.sample_shape,
            dtype=dtype,
            staging=torch.cuda.is_available() if pin_memory is None else pin_memory,
            num_rows=self.local_rows * depth,
        )
        self._call_step = self.journal.step

    @property
    def step(self) -> int:
        """The memory's step (its calls so far); a disk-backed memory records it with each write
        and a reopened one starts from its last write's."""
        return self._call_step

    @step.setter
    def step(self, value: int) -> None:
        self._call_step = value
        if self.journal is not None:
            self.journal.step = value

    def mark(self) -> int:
        """A disk-backed memory flushes its folder and keeps every change from now on, so that
        :meth:`rollback_to` can return to this step; returns the step."""
        return self.step if self.journal is None else self.journal.mark()

    def rollback_to(self, step: int) -> None:
        """Returns a disk-backed memory, bit-identically, to what it was at ``step``.

        Raises:
            ValueError: a memory in RAM, or a step the folder's undo log cannot restore.
        """
        if self.journal is None:
            raise ValueError(
                "only a disk-backed memory (storage_path) can roll back; a memory in RAM "
                "resumes from the state saved with the checkpoint (memory.load)"
            )
        self.journal.rollback(step)
        self._prefetched = None
        self._call_step = step

    @property
    def local_rows(self) -> int:
        """Samples whose slots this process holds (all of them, unless sharded across ranks)."""
        return self.num_samples

    def _disk_layout(self, folder: str) -> tuple[str, dict[str, Any]]:
        """The folder the files go in and the configuration recorded with them."""
        return folder, self.config()

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
        self._last_device = clean.device
        plan, pending = self._plan_or_prefetched(indices, clean.device)
        if plan.store_rows.numel() == 0:
            empty = clean.new_empty((0, *self.sample_shape))
            return MemoryRead(
                empty, plan.sample_of_row, plan.slots_of_sample, None, plan.store_rows
            )
        stored = pending.wait() if pending is not None else None
        if stored is None:
            stored = self.rows.read(plan.store_rows, clean.device)
        examples = self._decode(stored, plan.sample_of_row, plan.slots_of_sample, clean)
        return MemoryRead(examples, plan.sample_of_row, plan.slots_of_sample, None, plan.store_rows)

    def _plan_or_prefetched(
        self, indices: torch.Tensor, device: torch.device
    ) -> tuple[ReadPlan, PendingRead | None]:
        """The read plan of ``indices``, and the rows of a prefetch or recall for exactly them."""
        prefetched = self._prefetched
        if (
            prefetched is not None
            and prefetched.device == device
            and torch.equal(prefetched.indices, indices)
        ):
            self._prefetched = None
            return prefetched.plan, prefetched.rows
        # A prefetch for other indices stays for a later call (writes invalidate it).
        return self.ring.plan_read(indices), None

    def _decode(
        self,
        stored: torch.Tensor,
        sample_of_row: torch.Tensor,
        slots_of_sample: torch.Tensor,
        clean: torch.Tensor,
    ) -> torch.Tensor:
        if stored.shape[0] == clean.shape[0] and bool((slots_of_sample.numpy() == 1).all()):
            clean_rows = clean.detach()  # one row per sample, in batch order: no copy needed
        else:
            rows = transfer.to_device(sample_of_row, clean.device)
            clean_rows = clean.detach().index_select(0, rows)
        return self.codec.decode(stored, clean_rows)

    def recall(
        self, indices: torch.Tensor, clean: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's newest stored example (``clean``'s row where none), and which had one.

        The rows read are kept for the next :meth:`read` of exactly these indices on this
        device, so a recall followed by the step's call reads them once.

        Args:
            indices: validated 1-D int64 CPU dataset indices of the batch.
            clean: the batch's clean inputs.

        Returns:
            ``(start, found)``: ``(B, *sample_shape)`` on ``clean``'s device and dtype, and a
            ``(B,)`` bool CPU tensor.
        """
        plan, pending = self._plan_or_prefetched(indices, clean.device)
        stored = pending.wait() if pending is not None else None
        if stored is None and plan.store_rows.numel():
            stored = self.rows.read(plan.store_rows, clean.device)
        self._prefetched = _Prefetch(
            indices=indices.clone(),
            plan=plan,
            device=clean.device,
            rows=None if stored is None else PendingRead(stored),
        )
        return self._newest(plan, stored, clean)

    def _newest(
        self, plan: ReadPlan, stored: torch.Tensor | None, clean: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        start = clean.detach().clone()
        found = torch.zeros(clean.shape[0], dtype=torch.bool)
        if stored is None:
            return start, found
        newest = plan.newest_rows()
        positions = plan.sample_of_row.index_select(0, newest)
        found[positions] = True
        on_device = transfer.to_device(positions, clean.device)
        rows = stored.index_select(0, transfer.to_device(newest, stored.device))
        start[on_device] = self.codec.decode(rows, clean.detach().index_select(0, on_device)).to(
            clean.dtype
        )
        return start, found

    def write(
        self,
        indices: torch.Tensor,
        adv: torch.Tensor,
        clean: torch.Tensor,
        *,
        seen: SeenAtWrite | None = None,
    ) -> int:
        """Stores ``adv`` as the newest slot of each index; returns how many rows were rejected.

        Rows that are not finite (or overflow the storage dtype) are not stored: their samples keep
        their old slots. For an index repeated in the batch, the last accepted row wins.

        Args:
            indices: validated 1-D int64 CPU dataset indices of the batch.
            adv: the examples to store.
            clean: the batch's clean inputs.
            seen: what the model made of each example when it was made (recorded per slot;
                ``None``: not known).
        """
        encoded, accepted = self.codec.encode(adv, clean)
        accepted, seen = facts_to_host(accepted, seen)
        plan = self.ring.plan_write(indices, accepted)
        self._invalidate_prefetch(plan.samples)
        if plan.samples.numel():
            winners = encoded
            every_row_in_order = plan.batch_positions.numel() == encoded.shape[0] and torch.equal(
                plan.batch_positions, torch.arange(encoded.shape[0])
            )
            if not every_row_in_order:  # duplicates or rejected rows: keep the winning rows only
                positions = transfer.to_device(plan.batch_positions, encoded.device)
                winners = encoded.index_select(0, positions)
            self.rows.write(plan.store_rows, winners)
            if seen is None:
                self.ring.commit(plan)
            else:
                winners_of = plan.batch_positions
                self.ring.commit(
                    plan,
                    fooled=seen.fooled.index_select(0, winners_of),
                    weight=seen.weight.index_select(0, winners_of),
                )
        return int(accepted.numel() - accepted.sum())

    def fooled_at_write(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """Whether these slots' examples fooled the model when made: 0, 1 or 255 (not known)."""
        return self.ring.fooled_at_write.index_select(0, slot_ids)

    def last_weights(self, slot_ids: torch.Tensor) -> torch.Tensor:
        """``1 - p_y`` of these slots' examples when last seen (inf: never seen by the memory)."""
        return self.ring.last_weight.index_select(0, slot_ids)

    def record_weights(self, slot_ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Keeps ``1 - p_y`` of these slots' examples, measured at this read."""
        self.ring.record_weights(slot_ids, weights.detach().to("cpu", torch.float32))

    def prefetch(self, indices: torch.Tensor, device: torch.device | None = None) -> None:
        """Starts reading the slots of ``indices`` for the next :meth:`read`.

        A read uses the prefetched rows only if it asks for exactly these indices on this device
        (other reads ignore them, and a new prefetch replaces them); a write to any of these
        samples before that read discards them, so a read never returns stale rows.

        Args:
            indices: validated 1-D int64 CPU dataset indices of the next batch.
            device: the device of the next batch (default: the last batch's device; before the
                first read nothing is prefetched).
        """
        target = self._last_device if device is None else device
        if target is None:
            return
        if target.type == "cuda" and target.index is None:  # compare like a batch's device
            target = torch.device("cuda", torch.cuda.current_device())
        plan = self.ring.plan_read(indices)
        rows = self.rows.start_read(plan.store_rows, target) if plan.store_rows.numel() else None
        self._prefetched = _Prefetch(indices=indices.clone(), plan=plan, device=target, rows=rows)

    def _invalidate_prefetch(self, written_samples: torch.Tensor) -> None:
        pending = self._prefetched
        if pending is not None and bool(torch.isin(pending.indices, written_samples).any()):
            self._prefetched = None

    def abort(self) -> None:
        """Called when a memory call fails its argument checks (distributed stores tell peers)."""

    def fail_step(self, writing: bool) -> None:
        """Called when a memory call raises after its read (distributed stores tell peers that
        wait for its write, if ``writing``)."""

    def stats(self) -> dict[str, float | int]:
        """Store-specific counters added to the memory's stats (none for a local store)."""
        return {}

    def flush(self) -> None:
        """Forces a disk-backed memory to the disk; nothing to do for a memory in RAM."""
        flush = getattr(self.rows, "flush", None)
        if flush is not None:
            flush()

    def filled_fraction(self) -> float:
        return self.ring.filled_fraction()

    def filled_samples(self) -> int:
        """Samples with at least one filled slot."""
        return int((self.ring.slot_count > 0).sum())

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
            **self.ring.fields(),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raises ValueError/TypeError if ``state`` cannot be loaded; changes nothing."""
        shard = state.get("shard")
        if isinstance(shard, dict):
            raise ValueError(
                f"memory state is the shard of rank {shard.get('rank')!r} of a memory sharded over "
                f"{shard.get('world_size')!r} ranks; combine every rank's state with "
                "memloss_addon.store.distributed.merge_shard_states() first"
            )
        shape = (self.num_samples, self.depth, *self.sample_shape)
        if "slots" not in state:
            raise ValueError("memory state has no 'slots' entry")
        slots = state["slots"]
        if not isinstance(slots, torch.Tensor):
            raise TypeError(f"memory state 'slots' must be a tensor, got {type(slots).__name__}")
        if tuple(slots.shape) != shape or slots.dtype != self.dtype:
            raise ValueError(
                f"memory state 'slots' has shape {tuple(slots.shape)} and dtype {slots.dtype}, "
                f"expected {shape} and {self.dtype}"
            )
        self.ring.check_state(state, version=state.get("format_version", FORMAT_VERSION))
        if slots.is_floating_point():
            # amax/amin propagate NaN and need no temporary; isfinite() would allocate a
            # slot-sized float copy (abs) plus a mask, 1.25x the memory, on every load.
            limit = torch.finfo(slots.dtype).max
            if not (float(slots.amax()) <= limit and float(slots.amin()) >= -limit):
                raise ValueError("memory state 'slots' holds NaN or Inf values")

    def load_state(self, state: dict[str, Any]) -> None:
        """Copies a checked state into the store, keeping its device and pinning."""
        self.check_state(state)
        self._prefetched = None
        self.rows.load_(state["slots"].reshape(self.rows.data.shape))
        self.ring.load(state)
