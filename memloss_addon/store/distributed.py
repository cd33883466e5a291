"""Memory stores spread over the ranks of a ``torch.distributed`` process group.

Under DDP with ``DistributedSampler`` a sample is visited by a different rank almost every epoch,
so each rank must be able to read every sample's memory. Two layouts:

- :class:`ShardedMemoryStore` (``distributed="sharded"``): rank ``r`` holds the slots of the
  samples ``i`` with ``i % world_size == r`` (about ``num_samples / world_size``). Each call
  fetches the rows its batch needs from their owners and sends its new rows to their owners, with
  ``all_to_all_single`` (gloo and NCCL).
- :class:`ReplicatedMemoryStore` (``distributed="replicated"``): every rank holds every slot; a
  read is local and each call's new rows are sent to every other rank.

Both behave exactly like one process that sees the concatenation of all ranks' batches (rank 0
first) in every step:

- every read of a step sees the memory as it was before the step (all reads happen before any
  rank's write of that step);
- each rank's term is over its own batch, as each rank's loss is under DDP: rank ``r``'s term
  equals the term a single-process memory, holding everything every rank has written before,
  computes for rank ``r``'s batch;
- when several rows write one sample in one step (``DistributedSampler`` pads the last ranks with
  repeated indices) the last accepted row of the concatenated batch wins: the highest rank's,
  and within a rank the last one. A rejected (non-finite) row never wins, on any rank.

The slot bookkeeping (fill counts, ring heads: 8 bytes a sample) is replicated: every rank applies
the same write plan, computed from the gathered indices and acceptance flags of the step, so the
fill fraction and the rejected-row counters agree on every rank without extra communication.

Collectives per call, in order (the first one carries a status so that a call that fails its
argument checks on one rank raises on every rank instead of leaving the others waiting):

1. ``all_gather`` of a ``[status, batch_size]`` header;
2. ``all_gather`` of the batch indices, padded to the largest batch;
3. sharded only, when the term is computed: ``all_to_all_single`` of the rows read from owners;
4. ``all_gather`` of the acceptance flags of the rows written, padded likewise;
5. ``all_to_all_single`` of the accepted, de-duplicated rows: to their owner (sharded) or to every
   other rank (replicated).

Rows travel encoded, in the storage dtype (a uint8 memory sends bytes). ``stats()`` reports the
payload bytes this rank received from other ranks in the last call and in total.

Devices. The gathers of headers, indices and flags (1, 2, 4) run on the host whenever the group
has a CPU backend (``gloo``, or ``"cpu:gloo,cuda:nccl"``), so they never wait for a GPU; on a pure
``nccl`` group they run on the GPU and the host waits for each (it plans the step with their
values). The rows (3, 5) travel GPU to GPU when the group's CUDA backend is NCCL and the memory is
on CUDA (or the group has no CPU backend), else through the host; a CUDA memory whose rows go
through the host gets a warning. A rank's GPU is its memory's, else its batch's, else the current
device; a memory on another GPU than its batch, or built with a bare ``"cuda"`` before
``torch.cuda.set_device(local_rank)``, raises a ValueError before the call's first collective.

Every rank must make the same calls with the same ``beta_prime`` (a call with ``beta_prime=0``
skips the read exchange). A rank never waits forever:

- an exception on one rank between the read exchange and the write (in the memory forward pass,
  out of memory, say) or while encoding its rows is announced in the write's gather of flags
  (4): every other rank raises at once, naming the failed rank and the step, and nothing of the
  step is stored on any rank (the failing rank re-raises its own exception);
- a rank that stops taking part otherwise (it died, or raised outside the memory) leaves the
  others waiting in their next collective for at most the process group's timeout
  (``init_process_group(timeout=...)``; gloo's default is 30 minutes, NCCL's 10): they then raise
  a ``RuntimeError`` naming the step, the exchange and the timeout. ``torchrun`` stops them
  sooner when the failed rank's process exits.

Disk-backed ranks (``storage_path``) keep their folders in ``<storage_path>/rank<r>-of-<n>``.
The header (1) also carries each rank's count of completed writes: a run stopped mid-step can
leave the ranks' folders one write apart, and the next call then raises on every rank with each
rank's step and the ``memory.rollback_to(step)`` that realigns them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from . import transfer
from .local import MemoryRead, MemoryStore, SeenAtWrite, facts_to_host
from .slots import BOOKKEEPING, FOOLED_UNKNOWN, ReadPlan, WritePlan

# A flag byte with this bit set: the rank raised after the read exchange (see fail_step).
_FAILED = 8

__all__ = [
    "ReplicatedMemoryStore",
    "ShardedMemoryStore",
    "merge_shard_states",
]


@dataclass(frozen=True)
class _Fetched:
    """A sharded read's rows, exchanged, before decoding: kept by a recall for the step's read."""

    step: _GlobalBatch
    plan: ReadPlan  # this rank's rows; ``store_rows`` are flat slot ids
    stored: torch.Tensor
    device: torch.device
    run_forward: bool


@dataclass(frozen=True)
class _GlobalBatch:
    """The indices of one step on every rank, concatenated in rank order."""

    local: torch.Tensor  # this rank's indices
    indices: torch.Tensor  # (G,) every rank's indices
    sizes: list[int]  # batch size of each rank
    rank_of_position: torch.Tensor  # (G,) the rank that holds each position
    start: int  # this rank's first position

    @property
    def max_size(self) -> int:
        return max(self.sizes)


def backends_by_device(config: str) -> dict[str, str]:
    """The backend of each device type in a process group's backend configuration.

    Example:
        >>> backends_by_device("cpu:gloo,cuda:nccl")
        {'cpu': 'gloo', 'cuda': 'nccl'}
    """
    found: dict[str, str] = {}
    for part in config.lower().split(","):
        device, _, backend = part.strip().rpartition(":")
        devices = [device] if device else dist.Backend.backend_capability.get(backend, ["cpu"])
        for name in devices:
            found[name] = backend
    return found


def exchange_gpu(
    store: torch.device, batch: torch.device | None, *, store_was_bare: bool
) -> torch.device | None:
    """The GPU a rank's exchange uses: the memory's, else the batch's, else the current device.

    Args:
        store: the memory's device.
        batch: the batch's device (``None``: not known).
        store_was_bare: the memory was asked for ``"cuda"`` without an index, so its device is
            the one that was current when it was built.

    Raises:
        ValueError: the memory is on another GPU than the batch, or was put on the current GPU
            by a bare ``"cuda"`` and the current device has changed since.

    Example:
        >>> exchange_gpu(torch.device("cpu"), torch.device("cpu"), store_was_bare=False) is None
        True
    """
    if store.type == "cuda":
        if batch is not None and batch.type == "cuda" and batch != store:
            raise ValueError(_wrong_gpu(f"the memory is on {store} but the batch on {batch}"))
        current = _current_gpu() if store_was_bare else None
        if current is not None and store != current:
            raise ValueError(
                _wrong_gpu(
                    f"the memory is on {store} (device='cuda' was the current device when it was "
                    f"built) but the current CUDA device is now {current}"
                )
            )
        return store
    if batch is not None and batch.type == "cuda":
        return batch
    return _current_gpu()


def _current_gpu() -> torch.device | None:
    # Asked only when needed: the first question creates a CUDA context on the current GPU.
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None


def _wrong_gpu(problem: str) -> str:
    return (
        f"{problem}: under DDP each rank keeps its memory and its batches on its own GPU. Call "
        "torch.cuda.set_device(local_rank) before building the memory, or pass "
        "device=f'cuda:{local_rank}' (with the model and the batches there too)"
    )


class _Exchange:
    """The collectives of the memory over one process group, with their received-byte counts.

    ``device`` carries the rows, ``meta_device`` the gathered headers, indices and flags; both are
    picked for each call by :meth:`use_devices`.
    """

    def __init__(self, group: dist.ProcessGroup | None, requested: torch.device) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "a distributed memory needs torch.distributed initialized first "
                "(torch.distributed.init_process_group)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        config = str(dist.get_backend_config(group))
        backends = backends_by_device(config)
        # NCCL carries CUDA tensors only; gloo carries CPU ones (its CUDA support goes through
        # the host anyway).
        self.rows_on_cuda = backends.get("cuda") == "nccl" and (
            requested.type == "cuda" or "cpu" not in backends
        )
        # The small gathers stay on the host whenever the group can: there they never wait.
        self.meta_on_cuda = "cpu" not in backends
        if requested.type == "cuda" and not self.rows_on_cuda:
            warnings.warn(
                f"the process group's backend ({config}) sends this CUDA memory's rows through "
                "the CPU every call; initialise it with backend='nccl' (or 'cpu:gloo,cuda:nccl') "
                "to exchange them GPU to GPU",
                RuntimeWarning,
                stacklevel=5,  # MemoryWrapper's caller
            )
        self.requested = requested
        self.store_device = requested  # the resolved device, once the store is built
        self.device = self.meta_device = torch.device("cpu")
        self.bytes_last_call = 0
        self.bytes_total = 0
        self.where = "memory step 0"  # the call being exchanged, for error messages

    def timeout(self) -> str:
        """The process group's timeout, as text ("unknown" where torch does not tell)."""
        try:
            group = self.group or dist.distributed_c10d._get_default_group()
            backend = group._get_backend(self.meta_device)
            return f"{backend.options._timeout.total_seconds():g} s"
        except Exception:  # noqa: BLE001 - private torch API: any failure means unknown
            return "unknown"

    def _collective(self, what: str, run: Callable[[], object]) -> None:
        """Runs one collective; a failure (a timeout, a peer gone) names the step and timeout."""
        try:
            run()
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise RuntimeError(
                f"{self.where}: the {what} with the other ranks failed after waiting at most the "
                f"process group's timeout ({self.timeout()}): a rank did not take part, most "
                "likely because it raised in this step before reaching it (outside the memory, "
                "or in a way it could not announce) or its process died. This rank abandons the "
                f"call; its rows of this step are not stored. ({type(error).__name__}: {first})"
            ) from error

    def use_devices(self, batch: torch.device | None) -> None:
        """Picks this call's devices from the memory's and the batch's (see :func:`exchange_gpu`).

        Raises:
            ValueError: the memory and the batch are on different GPUs, or the memory was put on
                a GPU that is no longer the current device.
        """
        cpu = torch.device("cpu")
        if self.store_device.type == "cpu" and not (self.rows_on_cuda or self.meta_on_cuda):
            self.device = self.meta_device = cpu  # a CPU exchange leaves CUDA alone
            return
        bare = self.requested.type == "cuda" and self.requested.index is None
        gpu = exchange_gpu(self.store_device, batch, store_was_bare=bare)
        self.device = gpu if self.rows_on_cuda and gpu is not None else cpu
        self.meta_device = gpu if self.meta_on_cuda and gpu is not None else cpu

    def _received(self, nbytes: int) -> None:
        self.bytes_last_call += nbytes
        self.bytes_total += nbytes

    def gather_padded(self, values: torch.Tensor, length: int) -> torch.Tensor:
        """``(world_size, length)``: every rank's 1-D host ``values``, zero-padded to ``length``."""
        padded = torch.zeros(length, dtype=values.dtype)
        padded[: values.shape[0]] = values
        padded = transfer.to_device(padded, self.meta_device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective(
            "gather of batch headers, indices or flags",
            lambda: dist.all_gather(parts, padded, group=self.group),
        )
        self._received((self.world_size - 1) * padded.nbytes)
        # On a GPU (a pure nccl group) the host waits here: it plans the step with these values.
        return torch.stack(parts).cpu()

    def exchange_rows(
        self, rows: torch.Tensor, send_counts: list[int], recv_counts: list[int]
    ) -> torch.Tensor:
        """Sends ``rows`` (grouped by destination rank) and returns the rows received.

        Rows are sent as raw bytes, so every storage dtype travels on every backend.
        """
        row_shape, dtype = tuple(rows.shape[1:]), rows.dtype
        row_bytes = math.prod(row_shape) * rows.element_size()
        flat = transfer.to_device(rows, self.device).contiguous()
        flat = flat.reshape(rows.shape[0], math.prod(row_shape))
        send = flat.view(torch.uint8).reshape(rows.shape[0], row_bytes)
        received = torch.empty((sum(recv_counts), row_bytes), dtype=torch.uint8, device=self.device)
        self._collective(
            "exchange of rows",
            lambda: dist.all_to_all_single(
                received,
                send,
                output_split_sizes=recv_counts,
                input_split_sizes=send_counts,
                group=self.group,
            ),
        )
        self._received(received.nbytes)
        return received.view(dtype).reshape(-1, *row_shape)


def _counts(ranks: torch.Tensor, world_size: int) -> list[int]:
    return torch.bincount(ranks, minlength=world_size).tolist()


def _stable_order(keys: torch.Tensor) -> torch.Tensor:
    return torch.sort(keys, stable=True).indices


class _DistributedStore(MemoryStore):
    """What both layouts share: the step's gathered batch, acceptance flags and counters."""

    def __init__(self, *, process_group: dist.ProcessGroup | None = None, **options: Any) -> None:
        device = torch.device(options.get("device", "cpu"))
        self.exchange = _Exchange(process_group, device)
        self.rank = self.exchange.rank
        self.world_size = self.exchange.world_size
        super().__init__(**options)
        self.exchange.store_device = self.device
        self.exchange.use_devices(None)
        self._step: _GlobalBatch | None = None
        self._recalled: _Fetched | None = None
        self._in_recall = False
        self._rows_accepted_all = 0
        self._rows_rejected_all = 0

    # ----------------------------------------------------------- the first collective of a call

    def _gather_batch(self, indices: torch.Tensor, *, ok: bool = True) -> _GlobalBatch | None:
        self.exchange.bytes_last_call = 0
        self._step = None
        if not self._in_recall:
            self.exchange.where = f"memory step {self.step}"
        # A disk-backed rank also sends its completed writes and its step, in the upper bits of
        # the two words (a memory in RAM sends 0 there): [failed | (writes + 1) << 1,
        # batch size | (step + 1) << 32].
        writes = self.journal.writes if self.journal is not None else -1
        step = self.journal.header.step if self.journal is not None else -1
        header = torch.tensor(
            [(0 if ok else 1) | (writes + 1) << 1, indices.shape[0] | (step + 1) << 32],
            dtype=torch.int64,
        )
        headers = self.exchange.gather_padded(header, 2)
        failed = [rank for rank in range(self.world_size) if int(headers[rank, 0]) & 1]
        if failed:
            if not ok:
                return None
            raise RuntimeError(
                f"the memory call failed its argument checks on rank(s) {failed}; it is abandoned "
                "on every rank and the memory is unchanged"
            )
        counts = (headers[:, 0] >> 1).tolist()
        if min(counts) > 0 and len(set(counts)) > 1:
            steps = ((headers[:, 1] >> 32) - 1).tolist()
            ranks = ", ".join(f"rank {rank} at step {value}" for rank, value in enumerate(steps))
            raise RuntimeError(
                f"the ranks' disk-backed memories are at different points ({ranks}), as a run "
                "stopped in the middle of a step leaves them. Call "
                f"memory.rollback_to({min(steps)}) (or your checkpoint's step) on every rank "
                "before training on; the call is abandoned on every rank"
            )
        sizes = (headers[:, 1] & 0xFFFFFFFF).tolist()
        if max(sizes) > 0:
            gathered = self.exchange.gather_padded(indices, max(sizes))
            everyone = torch.cat([gathered[rank, :size] for rank, size in enumerate(sizes)])
        else:
            everyone = torch.zeros(0, dtype=torch.int64)
        rank_of_position = torch.repeat_interleave(
            torch.arange(self.world_size), torch.tensor(sizes)
        )
        start = sum(sizes[: self.rank])
        return _GlobalBatch(indices, everyone, sizes, rank_of_position, start)

    def _batch_for_write(self, indices: torch.Tensor) -> _GlobalBatch:
        step, self._step = self._step, None
        if step is None:  # no read in this call (beta_prime == 0): gather here
            step = self._gather_batch(indices)
            assert step is not None
        elif not torch.equal(step.local, indices):
            raise RuntimeError("a distributed memory must write the indices it has just read")
        return step

    def abort(self) -> None:
        """Tells the other ranks that this call failed its argument checks (they raise too)."""
        self._gather_batch(torch.zeros(0, dtype=torch.int64), ok=False)

    def fail_step(self, writing: bool) -> None:
        """This rank raised after the call's read exchange: tells the other ranks, in the gather
        of flags they are waiting in, if a write was to follow (they raise at once)."""
        step, self._step = self._step, None
        self._recalled = None
        if step is not None and writing:
            self._announce_failure(step)

    def _announce_failure(self, step: _GlobalBatch) -> None:
        if step.max_size == 0:
            return
        with contextlib.suppress(RuntimeError):  # the others may be gone: nothing to tell
            failed = torch.full((step.max_size,), _FAILED, dtype=torch.uint8)
            self.exchange.gather_padded(failed, step.max_size)

    def _use_devices(self, batch: torch.device) -> None:
        """Picks the call's devices before its first collective; a mismatch raises on every rank.

        The other ranks learn of it through the failed-call header when the small gathers run on
        the host; on a pure nccl group they could be the wrong GPU's, so this rank only raises.
        """
        try:
            self.exchange.use_devices(batch)
        except ValueError:
            if not self.exchange.meta_on_cuda:
                self.abort()
            raise

    def _plan_write(
        self,
        indices: torch.Tensor,
        adv: torch.Tensor,
        clean: torch.Tensor,
        seen: SeenAtWrite | None,
    ) -> tuple[_GlobalBatch, torch.Tensor, torch.Tensor, torch.Tensor, WritePlan]:
        """Encodes this rank's rows and plans every rank's write (the call's flag gather).

        Returns the step, this rank's encoded rows, its acceptance flags (host), every rank's
        fooled-at-write codes by global position, and the global write plan.
        """
        self._use_devices(clean.device)
        step = self._batch_for_write(indices)
        try:  # a failure here (out of memory, say) is announced to the others, which raise
            encoded, accepted = self.codec.encode(adv, clean)
            accepted, seen = facts_to_host(accepted, seen)
        except BaseException:
            self._announce_failure(step)
            raise
        everyone, fooled = self._gather_accepted(step, accepted, seen)
        return step, encoded, accepted, fooled, self.ring.plan_write(step.indices, everyone)

    def _gather_accepted(
        self, step: _GlobalBatch, accepted: torch.Tensor, seen: SeenAtWrite | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's acceptance flags and fooled-at-write codes, in one gather of bytes.

        A byte per row: bit 0 accepted, bit 1 fooled, bit 2 whether bit 1 is known.
        """
        flags = accepted.to(torch.uint8)
        if seen is not None:
            flags = flags | (seen.fooled.to(torch.uint8) << 1) | 4
        gathered = self.exchange.gather_padded(flags, step.max_size)
        failed = [rank for rank in range(self.world_size) if bool((gathered[rank] & _FAILED).any())]
        if failed:
            raise RuntimeError(
                f"{self.exchange.where}: rank(s) {failed} raised in this step after the exchange "
                "of the batch (in the memory forward pass, out of memory, say); the step is "
                "abandoned on every rank and none of its rows is stored"
            )
        flags = torch.cat([gathered[rank, :size] for rank, size in enumerate(step.sizes)])
        everyone = (flags & 1).bool()
        fooled = torch.where(flags & 4 > 0, (flags >> 1) & 1, FOOLED_UNKNOWN).to(torch.uint8)
        self._rows_accepted_all += int(everyone.sum())
        self._rows_rejected_all += int(everyone.numel() - everyone.sum())
        return everyone, fooled

    def _encoded_rows(self, encoded: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return encoded.index_select(0, transfer.to_device(positions, encoded.device))

    # ----------------------------------------------------------- reporting

    def stats(self) -> dict[str, float | int]:
        """Received bytes (payload from other ranks), this rank's rows and every rank's writes."""
        return {
            "comm_bytes_last_step": self.exchange.bytes_last_call,
            "comm_bytes_total": self.exchange.bytes_total,
            "local_rows": self.local_rows,
            "world_size": self.world_size,
            "rows_accepted_all_ranks": self._rows_accepted_all,
            "rows_rejected_all_ranks": self._rows_rejected_all,
        }

    def prefetch(self, indices: torch.Tensor, device: torch.device | None = None) -> None:
        """Ignored: a distributed read starts with a collective, which cannot run ahead alone."""


class ReplicatedMemoryStore(_DistributedStore):
    """Every rank holds every slot; each step's accepted rows are sent to every other rank.

    Takes the arguments of :class:`MemoryStore` plus ``process_group`` (default: the world).
    """

    def _disk_layout(self, folder: str) -> tuple[str, dict[str, Any]]:
        # Each rank keeps its copy (and its undo journal) in a folder of its own.
        shard = {"rank": self.rank, "world_size": self.world_size, "replicated": True}
        return f"{folder}/rank{self.rank}-of-{self.world_size}", {**self.config(), **shard}

    def read(self, indices: torch.Tensor, clean: torch.Tensor) -> MemoryRead:
        self._use_devices(clean.device)
        step = self._gather_batch(indices)
        assert step is not None
        read = super().read(indices, clean)
        anyone = bool(self.ring.slot_count.index_select(0, step.indices).any())
        self._step = step
        return replace(read, run_forward=anyone)

    def prefetch(self, indices: torch.Tensor, device: torch.device | None = None) -> None:
        """Starts reading locally: every row is here, only the bookkeeping is exchanged."""
        MemoryStore.prefetch(self, indices, device)

    def write(
        self,
        indices: torch.Tensor,
        adv: torch.Tensor,
        clean: torch.Tensor,
        *,
        seen: SeenAtWrite | None = None,
    ) -> int:
        step, encoded, accepted, fooled, plan = self._plan_write(indices, adv, clean, seen)
        self._invalidate_prefetch(plan.samples)
        writer = step.rank_of_position.index_select(0, plan.batch_positions)
        mine = (writer == self.rank).nonzero().squeeze(1)
        own_rows = self._encoded_rows(encoded, plan.batch_positions[mine] - step.start)
        others = (writer != self.rank).nonzero().squeeze(1)
        others = others[_stable_order(writer[others])]  # they arrive grouped by writer
        send_counts = [0 if rank == self.rank else mine.numel() for rank in range(self.world_size)]
        recv_counts = _counts(writer[others], self.world_size)
        send = own_rows.repeat(self.world_size - 1, *([1] * len(self.sample_shape)))
        received = self.exchange.exchange_rows(send, send_counts, recv_counts)
        if mine.numel():
            self.rows.write(plan.store_rows[mine], own_rows)
        if others.numel():
            self.rows.write(plan.store_rows[others], received)
        self.ring.commit(plan, fooled=fooled.index_select(0, plan.batch_positions))
        return int(accepted.numel() - accepted.sum())


class ShardedMemoryStore(_DistributedStore):
    """Rank ``r`` holds the slots of samples ``i`` with ``i % world_size == r``.

    Takes the arguments of :class:`MemoryStore` plus ``process_group`` (default: the world).
    :meth:`state_dict` returns this rank's shard (no collective); load it back on the same rank
    and world size, or combine all ranks' shards with :func:`merge_shard_states` to load into any
    world size, a replicated or a single-process memory.
    """

    @property
    def local_rows(self) -> int:
        """Samples owned by this rank: ``ceil((num_samples - rank) / world_size)``."""
        return max(0, -(-(self.num_samples - self.rank) // self.world_size))

    def _disk_layout(self, folder: str) -> tuple[str, dict[str, Any]]:
        # Each rank keeps its shard, and its copy of the bookkeeping, in a folder of its own.
        shard = {"rank": self.rank, "world_size": self.world_size}
        return f"{folder}/rank{self.rank}-of-{self.world_size}", {**self.config(), **shard}

    def _local_store_rows(self, samples: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        return torch.div(samples, self.world_size, rounding_mode="floor") * self.depth + slots

    def read(self, indices: torch.Tensor, clean: torch.Tensor) -> MemoryRead:
        fetched = self._fetched_for(indices, clean.device)
        if fetched.plan.store_rows.numel() == 0:
            empty = clean.new_empty((0, *self.sample_shape))
            return MemoryRead(
                empty,
                fetched.plan.sample_of_row,
                fetched.plan.slots_of_sample,
                fetched.run_forward,
                fetched.plan.store_rows,
            )
        examples = self._decode(
            fetched.stored, fetched.plan.sample_of_row, fetched.plan.slots_of_sample, clean
        )
        return MemoryRead(
            examples,
            fetched.plan.sample_of_row,
            fetched.plan.slots_of_sample,
            fetched.run_forward,
            fetched.plan.store_rows,
        )

    def recall(
        self, indices: torch.Tensor, clean: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`MemoryStore.recall`; the exchange's rows are kept for the step's read."""
        self.exchange.where = f"memory recall before step {self.step + 1}"
        self._in_recall = True
        try:
            fetched = self._fetched_for(indices, clean.device)
        finally:
            self._in_recall = False
        self._recalled = fetched
        stored = fetched.stored if fetched.plan.store_rows.numel() else None
        return self._newest(fetched.plan, stored, clean)

    def _fetched_for(self, indices: torch.Tensor, device: torch.device) -> _Fetched:
        """The rows of a recall of exactly these indices, else an exchange now."""
        recalled, self._recalled = self._recalled, None
        if (
            recalled is not None
            and recalled.device == device
            and torch.equal(recalled.step.local, indices)
        ):
            self._step = recalled.step
            return recalled
        return self._fetch(indices, device)

    def _fetch(self, indices: torch.Tensor, device: torch.device) -> _Fetched:
        """Gathers the batch, exchanges the rows each rank reads, and plans the write."""
        self._use_devices(device)
        step = self._gather_batch(indices)
        assert step is not None
        plan = self.ring.plan_read(step.indices)  # every rank's read, in position order
        samples = step.indices.index_select(0, plan.sample_of_row)
        owner = samples % self.world_size
        reader = step.rank_of_position.index_select(0, plan.sample_of_row)
        local_row = self._local_store_rows(samples, plan.store_rows % self.depth)
        # Rows this rank owns and others read, grouped by reader (plan order within a reader).
        serve = ((owner == self.rank) & (reader != self.rank)).nonzero().squeeze(1)
        serve = serve[_stable_order(reader[serve])]
        # This rank's rows, in the order its batch needs them.
        mine = (reader == self.rank).nonzero().squeeze(1)
        mine_owner = owner.index_select(0, mine)
        remote = (mine_owner != self.rank).nonzero().squeeze(1)
        remote = remote[_stable_order(mine_owner[remote])]  # they arrive grouped by owner
        here = (mine_owner == self.rank).nonzero().squeeze(1)
        send_counts = _counts(reader[serve], self.world_size)
        recv_counts = _counts(mine_owner[remote], self.world_size)
        sent = self.rows.read(local_row[serve], self.exchange.device)
        received = self.exchange.exchange_rows(sent, send_counts, recv_counts)
        self._step = step
        stored = torch.empty((mine.numel(), *self.sample_shape), dtype=self.dtype, device=device)
        if here.numel():
            here_rows = transfer.to_device(here, device)
            stored[here_rows] = self.rows.read(local_row[mine[here]], device)
        if remote.numel():
            remote_rows = transfer.to_device(remote, device)
            stored[remote_rows] = transfer.to_device(received, device)
        local_plan = ReadPlan(
            sample_of_row=plan.sample_of_row.index_select(0, mine) - step.start,
            store_rows=plan.store_rows.index_select(0, mine),  # flat slot ids
            slots_of_sample=plan.slots_of_sample[step.start : step.start + indices.shape[0]],
        )
        return _Fetched(step, local_plan, stored, device, plan.store_rows.numel() > 0)

    def write(
        self,
        indices: torch.Tensor,
        adv: torch.Tensor,
        clean: torch.Tensor,
        *,
        seen: SeenAtWrite | None = None,
    ) -> int:
        step, encoded, accepted, fooled, plan = self._plan_write(indices, adv, clean, seen)
        writer = step.rank_of_position.index_select(0, plan.batch_positions)
        owner = plan.samples % self.world_size
        local_row = self._local_store_rows(plan.samples, plan.new_heads)
        mine = (writer == self.rank).nonzero().squeeze(1)
        outgoing = mine[owner[mine] != self.rank]
        outgoing = outgoing[_stable_order(owner[outgoing])]  # grouped by owner
        kept = mine[owner[mine] == self.rank]
        owned = (owner == self.rank).nonzero().squeeze(1)
        incoming = owned[writer[owned] != self.rank]
        incoming = incoming[_stable_order(writer[incoming])]  # they arrive grouped by writer
        sent = self._encoded_rows(encoded, plan.batch_positions[outgoing] - step.start)
        received = self.exchange.exchange_rows(
            sent,
            _counts(owner[outgoing], self.world_size),
            _counts(writer[incoming], self.world_size),
        )
        if kept.numel():
            own_rows = self._encoded_rows(encoded, plan.batch_positions[kept] - step.start)
            self.rows.write(local_row[kept], own_rows)
        if incoming.numel():
            self.rows.write(local_row[incoming], received)
        self.ring.commit(plan, fooled=fooled.index_select(0, plan.batch_positions))
        return int(accepted.numel() - accepted.sum())

    # ----------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard: its slots, the (replicated) bookkeeping and its place."""
        return {
            "slots": self.rows.data.view(self.local_rows, self.depth, *self.sample_shape),
            **self.ring.fields(),
            "shard": {"rank": self.rank, "world_size": self.world_size},
        }

    def check_state(self, state: dict[str, Any]) -> None:
        shard = state.get("shard")
        if shard is None:  # a full state: this rank keeps its own samples
            MemoryStore.check_state(self, state)
            return
        mine = {"rank": self.rank, "world_size": self.world_size}
        if shard != mine:
            raise ValueError(
                f"memory state is the shard {shard!r} but this rank is {mine}; combine every "
                "rank's state with memloss_addon.store.distributed.merge_shard_states() to load "
                "into another rank or world size"
            )
        full = {**state, "slots": _placeholder_full_slots(state["slots"], self)}
        full.pop("shard")
        MemoryStore.check_state(self, full)
        slots = state["slots"]
        if tuple(slots.shape) != (self.local_rows, self.depth, *self.sample_shape):
            raise ValueError(
                f"memory state 'slots' has shape {tuple(slots.shape)}, expected "
                f"{(self.local_rows, self.depth, *self.sample_shape)} for this rank's shard"
            )

    def load_state(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        self._prefetched = None
        slots = state["slots"]
        if state.get("shard") is None:
            slots = slots[self.rank :: self.world_size]
        self.rows.load_(slots.reshape(self.rows.data.shape))
        self.ring.load(state)


def _placeholder_full_slots(slots: object, store: ShardedMemoryStore) -> object:
    """A zero-strided stand-in of the full slots, so the shared checks see the full shape."""
    if not isinstance(slots, torch.Tensor):
        return slots
    # Row-wise max and min propagate NaN and Inf without a slot-sized temporary.
    flat = slots.reshape(slots.shape[0], -1) if slots.dim() and slots.numel() else None
    if (
        slots.is_floating_point()
        and flat is not None
        and not bool(
            torch.isfinite(flat.amax(dim=1)).all() and torch.isfinite(flat.amin(dim=1)).all()
        )
    ):
        raise ValueError("memory state 'slots' holds NaN or Inf values")
    shape = (store.num_samples, store.depth, *store.sample_shape)
    return torch.zeros((), dtype=slots.dtype).expand(shape)


def merge_shard_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Combines the state dicts of every rank of a sharded memory into one full state dict.

    The result loads into a memory of any world size and layout, or a single-process one. The
    counters are rank 0's.

    Raises:
        ValueError: the states are not one complete set of shards of one memory.

    Example:
        >>> shard = {"format_version": 2, "config": {"num_samples": 3}, "counters": {},
        ...          "slot_count": torch.ones(3, dtype=torch.int32),
        ...          "ring_head": torch.zeros(3, dtype=torch.int32)}
        >>> merged = merge_shard_states([
        ...     {**shard, "slots": torch.tensor([[[0.0]], [[2.0]]]),
        ...      "shard": {"rank": 0, "world_size": 2}},
        ...     {**shard, "slots": torch.tensor([[[1.0]]]), "shard": {"rank": 1, "world_size": 2}},
        ... ])
        >>> merged["slots"].flatten().tolist(), "shard" in merged
        ([0.0, 1.0, 2.0], False)
    """
    if not states:
        raise ValueError("merge_shard_states needs at least one state")
    shards: list[dict[str, Any]] = [
        shard if isinstance(shard := state.get("shard"), dict) else {} for state in states
    ]
    if not all(shards):
        raise ValueError("every state must be a shard (a sharded memory's state_dict())")
    world_size = shards[0].get("world_size")
    # A missing or non-int rank sorts as -1, which fails the check below.
    ranks = sorted(rank if isinstance(rank := shard.get("rank"), int) else -1 for shard in shards)
    if (
        any(shard.get("world_size") != world_size for shard in shards)
        or ranks != list(range(len(states)))
        or world_size != len(states)
    ):
        raise ValueError(
            "need the shard of every rank 0 to world_size - 1 exactly once, got (rank, "
            f"world_size) = {[(s.get('rank'), s.get('world_size')) for s in shards]}"
        )
    by_rank = sorted(states, key=lambda state: state["shard"]["rank"])
    first = by_rank[0]
    for state in by_rank[1:]:
        if state.get("config") != first.get("config"):
            raise ValueError("the shards come from memories of different configurations")
        for key in (field.name for field in BOOKKEEPING if field.name in first):
            if key not in state or not torch.equal(state[key], first[key]):
                raise ValueError(f"the shards disagree on {key!r}: they come from different steps")
    num_samples = first["slot_count"].shape[0]
    local = first["slots"]
    slots = torch.zeros((num_samples, *local.shape[1:]), dtype=local.dtype)
    for rank, state in enumerate(by_rank):
        owned = torch.arange(rank, num_samples, world_size)
        if state["slots"].shape[0] != owned.numel():
            raise ValueError(
                f"the shard of rank {rank} has {state['slots'].shape[0]} samples, expected "
                f"{owned.numel()}"
            )
        slots.index_copy_(0, owned, state["slots"].to("cpu"))
    merged = {key: value for key, value in first.items() if key != "shard"}
    merged["slots"] = slots
    return merged
