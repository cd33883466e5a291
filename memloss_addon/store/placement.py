"""Where the memory's rows live: a CPU tensor or a CUDA tensor.

``TensorStore`` holds ``num_rows`` rows of one shape and dtype and moves them between the storage
device and the batch's device. It knows nothing about samples, slots or codecs.

The rows of a CPU store are never pinned: no device copy ever reads them, since a read first
gathers the batch's rows on the host. Reads to CUDA go through small reusable pinned staging
buffers instead: ``index_select(..., out=staging)`` then a non-blocking copy, with an event
recorded after the copy. A staging buffer is only written again after its event has completed,
so the asynchronous copy never reads a buffer being refilled. CUDA -> CPU writes are synchronized
before the rows are used on the host, because a non-blocking device-to-host copy is not valid
until the copy has finished.

The CUDA primitives (pinned buffers, events, streams, the non-blocking copy) are reached through
:data:`cuda_ops`, one small object that a test may replace with a stand-in to check the ordering
of copies and refills without a GPU.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch

from . import transfer

__all__ = ["PendingRead", "TensorStore", "cuda_ops", "resolve_device"]


def resolve_device(device: str | torch.device) -> torch.device:
    """Parses a storage device and checks that it can be used here.

    Raises:
        ValueError: the device is neither CPU nor CUDA, or CUDA is requested but not available.

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}") from error
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or a CUDA device, got {device!r}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was requested but CUDA is not available")
        if resolved.index is None:
            resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved


def _row_bytes(tensor: torch.Tensor) -> np.ndarray:
    """The rows of a contiguous CPU tensor as a 2-D uint8 NumPy view of the same memory."""
    return tensor.view(tensor.shape[0], -1).view(torch.uint8).numpy()


class CudaOps:
    """The CUDA primitives of the placement, gathered so that a test can stand in for them."""

    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def event(self) -> torch.cuda.Event:
        return torch.cuda.Event()

    def current_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.current_stream(device)

    def new_stream(self, device: torch.device) -> torch.cuda.Stream:
        return torch.cuda.Stream(device=device)

    def use_stream(self, stream: torch.cuda.Stream) -> contextlib.AbstractContextManager[object]:
        return torch.cuda.stream(stream)

    def copy(self, pinned: torch.Tensor, target: torch.device) -> torch.Tensor:
        """A non-blocking copy of a pinned host tensor to ``target``, on the current stream."""
        return pinned.to(target, non_blocking=True)

    def record_stream(self, tensor: torch.Tensor, stream: torch.cuda.Stream) -> None:
        tensor.record_stream(stream)


cuda_ops = CudaOps()


def _pinned_rows(num_rows: int, row_shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A pinned buffer of at least ``num_rows`` rows, as many as the locked block holds.

    The host allocator locks the next power of two of bytes anyway; using all of it lets the
    buffer serve larger batches before it has to be replaced.
    """
    row_bytes = math.prod(row_shape) * torch.empty((), dtype=dtype).element_size()
    capacity = max(num_rows, transfer.pinned_nbytes(num_rows * row_bytes) // max(row_bytes, 1))
    return cuda_ops.pinned_empty((capacity, *row_shape), dtype)


def _locked(buffer: torch.Tensor | None) -> int:
    return 0 if buffer is None else transfer.pinned_nbytes(buffer.nbytes)


class _PinnedStaging:
    """A pool of two pinned host buffers whose reuse waits for the copy that last read them."""

    def __init__(self, row_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.row_shape = row_shape
        self.dtype = dtype
        self.buffers: list[torch.Tensor | None] = [None, None]
        self.events: list[torch.cuda.Event | None] = [None, None]
        self.turn = 0

    def take(self, num_rows: int) -> tuple[int, torch.Tensor]:
        slot = self.turn
        self.turn = 1 - self.turn
        event = self.events[slot]
        if event is not None:
            # The previous copy out of this buffer has finished. It was issued two reads ago, and
            # the write of that call has waited for the device since, so this wait ends at once.
            event.synchronize()
            self.events[slot] = None
        buffer = self.buffers[slot]
        if buffer is None or buffer.shape[0] < num_rows:
            buffer = _pinned_rows(num_rows, self.row_shape, self.dtype)
            self.buffers[slot] = buffer
        return slot, buffer[:num_rows]

    def mark_in_use(self, slot: int, device: torch.device) -> None:
        event = cuda_ops.event()
        event.record(cuda_ops.current_stream(device))
        self.events[slot] = event

    @property
    def nbytes(self) -> int:
        """Pinned bytes locked by the buffers (the host allocator's power-of-two blocks)."""
        return sum(_locked(buffer) for buffer in self.buffers)


class PendingRead:
    """Rows being gathered ahead of time; :meth:`wait` returns them, usable on the current stream.

    Example:
        >>> PendingRead(torch.ones(1, 2)).wait().tolist()
        [[1.0, 1.0]]
    """

    def __init__(self, rows: torch.Tensor, done: torch.cuda.Event | None = None) -> None:
        self._rows = rows
        self._done = done

    def wait(self) -> torch.Tensor:
        if self._done is not None:
            current = cuda_ops.current_stream(self._rows.device)
            current.wait_event(self._done)
            # The rows were allocated on the side stream and are now used on this one.
            cuda_ops.record_stream(self._rows, current)
        return self._rows


class TensorStore:
    """Fixed-size rows in one tensor, read and written by flat row index.

    Args:
        num_rows: how many rows.
        row_shape: the shape of one row.
        dtype: the storage dtype.
        device: ``"cpu"`` or a CUDA device.
        pin_memory: read a CPU store to CUDA through pinned staging buffers (a few batches of
            rows, never the store itself); ``None``: when CUDA is available.

    Example:
        >>> store = TensorStore(4, (2,), dtype=torch.float32, device="cpu")
        >>> store.write(torch.tensor([2]), torch.tensor([[1.0, 2.0]]))
        >>> store.read(torch.tensor([2, 0]), torch.device("cpu")).tolist()
        [[1.0, 2.0], [0.0, 0.0]]
    """

    def __init__(
        self,
        num_rows: int,
        row_shape: tuple[int, ...],
        *,
        dtype: torch.dtype,
        device: str | torch.device = "cpu",
        pin_memory: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        if pin_memory is None:
            pin_memory = self.device.type == "cpu" and torch.cuda.is_available()
        if pin_memory and self.device.type != "cpu":
            raise ValueError(f"pin_memory=True needs a CPU store, got device {self.device}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA, which is not available")
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        # Zeros, not empty: deterministic mode fills empty tensors with NaN, and a
        # never-written row must read back as something harmless. Not pinned: every read gathers
        # its rows on the host first, so only the staging buffers take part in device copies.
        self.data = torch.zeros((num_rows, *self.row_shape), dtype=dtype, device=self.device)
        self._staging = _PinnedStaging(self.row_shape, dtype) if pin_memory else None

    # Prefetch state, created on the first prefetch to CUDA (class attributes keep subclasses
    # that build ``data`` their own way working without calling this constructor).
    _side_streams: dict[torch.device, torch.cuda.Stream] | None = None
    _prefetch_buffer: torch.Tensor | None = None
    _prefetch_done: torch.cuda.Event | None = None

    @property
    def nbytes(self) -> int:
        """Bytes held: the rows, plus the pinned bytes their staging and prefetch buffers lock."""
        staging = self._staging.nbytes if self._staging is not None else 0
        return self.data.nbytes + staging + _locked(self._prefetch_buffer)

    @property
    def pinned_staging(self) -> bool:
        """Whether reads to CUDA go through pinned staging buffers (the rows are never pinned)."""
        return self._staging is not None

    def read(self, rows: torch.Tensor, target: torch.device) -> torch.Tensor:
        """Gathers ``rows`` (int64 CPU indices) and returns them, still encoded, on ``target``."""
        if self.device.type == "cuda":
            gathered = self.data.index_select(0, transfer.to_device(rows, self.device))
            # Another GPU: a stream-ordered copy; the CPU: the host needs the rows, it must wait.
            return gathered.to(target)
        if target.type == "cuda" and self._staging is not None:
            slot, staging = self._staging.take(rows.shape[0])
            torch.index_select(self.data, 0, rows, out=staging)
            moved = cuda_ops.copy(staging, target)
            self._staging.mark_in_use(slot, target)
            return moved
        return self.data.index_select(0, rows).to(target)

    def start_read(self, rows: torch.Tensor, target: torch.device) -> PendingRead:
        """Starts gathering ``rows`` for ``target`` ahead of time; :meth:`PendingRead.wait` ends it.

        On CUDA the copy runs on a side stream, staged through a pinned buffer for a CPU store,
        and the buffer is only refilled after its previous copy has finished. On the CPU the
        rows are gathered at once (for a disk-backed store this reads the pages ahead).
        """
        if target.type != "cuda":
            return PendingRead(self.data.index_select(0, rows).to(target))
        # The side stream belongs to the device that does the work: the store's, else the target's.
        worker = self.device if self.device.type == "cuda" else target
        if self._side_streams is None:
            self._side_streams = {}
        side = self._side_streams.get(worker)
        if side is None:
            side = self._side_streams[worker] = cuda_ops.new_stream(worker)
        if self.device.type == "cuda":
            # Rows written on the current stream before this prefetch are visible to it.
            side.wait_stream(cuda_ops.current_stream(worker))
            with cuda_ops.use_stream(side):
                gathered = self.data.index_select(0, transfer.to_device(rows, self.device))
                moved = gathered.to(target, non_blocking=True)
                done = cuda_ops.event()
                done.record(side)
            return PendingRead(moved, done)
        if self._prefetch_done is not None:
            self._prefetch_done.synchronize()  # the last copy out of the buffer has finished
        buffer = self._prefetch_buffer
        if buffer is None or buffer.shape[0] < rows.shape[0]:
            buffer = _pinned_rows(rows.shape[0], self.row_shape, self.dtype)
            self._prefetch_buffer = buffer
        staging = buffer[: rows.shape[0]]
        torch.index_select(self.data, 0, rows, out=staging)
        with cuda_ops.use_stream(side):
            moved = cuda_ops.copy(staging, target)
            done = cuda_ops.event()
            done.record(side)
        self._prefetch_done = done
        return PendingRead(moved, done)

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Writes ``values`` (storage dtype, any device) into unique int64 CPU ``rows``."""
        if self.device.type == "cuda":
            self.data.index_copy_(
                0, transfer.to_device(rows, self.device), transfer.to_device(values, self.device)
            )
            return
        # A blocking copy: the host must not read the rows before the device has written them.
        values = values.to("cpu")
        # NumPy copies each row whole; index_copy_ on the CPU indexes element by element, about
        # 2x slower for float32 rows and 20x for uint8 rows.
        _row_bytes(self.data)[rows.numpy()] = _row_bytes(values.contiguous())

    def load_(self, data: torch.Tensor) -> None:
        """Copies a full tensor of the same shape and dtype into the store, in place."""
        self.data.copy_(data)
