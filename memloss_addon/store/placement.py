"""Where the memory's rows live: a CPU tensor (pinned when CUDA is present) or a CUDA tensor.

``TensorStore`` holds ``num_rows`` rows of one shape and dtype and moves them between the storage
device and the batch's device. It knows nothing about samples, slots or codecs.

CPU -> CUDA reads go through reusable pinned staging buffers: ``index_select(..., out=staging)``
then a non-blocking copy, with an event recorded after the copy. A staging buffer is only written
again after its event has completed, so the asynchronous copy never reads a buffer being refilled.
CUDA -> CPU writes are synchronized before the rows are used on the host, because a non-blocking
device-to-host copy is not valid until the copy has finished.
"""

from __future__ import annotations

import torch

__all__ = ["TensorStore", "resolve_device"]


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
            event.synchronize()  # the previous copy out of this buffer has finished
            self.events[slot] = None
        buffer = self.buffers[slot]
        if buffer is None or buffer.shape[0] < num_rows:
            buffer = torch.empty((num_rows, *self.row_shape), dtype=self.dtype, pin_memory=True)
            self.buffers[slot] = buffer
        return slot, buffer[:num_rows]

    def mark_in_use(self, slot: int, device: torch.device) -> None:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self.events[slot] = event

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers if b is not None)


class TensorStore:
    """Fixed-size rows in one tensor, read and written by flat row index.

    Args:
        num_rows: how many rows.
        row_shape: the shape of one row.
        dtype: the storage dtype.
        device: ``"cpu"`` or a CUDA device.
        pin_memory: pin a CPU store; ``None`` pins it when CUDA is available.

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
        # never-written row must read back as something harmless.
        self.data = torch.zeros(
            (num_rows, *self.row_shape), dtype=dtype, device=self.device, pin_memory=pin_memory
        )
        self._staging = _PinnedStaging(self.row_shape, dtype) if pin_memory else None

    @property
    def nbytes(self) -> int:
        """Bytes held by the rows (staging buffers included)."""
        staging = self._staging.nbytes if self._staging is not None else 0
        return self.data.nbytes + staging

    @property
    def is_pinned(self) -> bool:
        return self.data.device.type == "cpu" and self.data.is_pinned()

    def read(self, rows: torch.Tensor, target: torch.device) -> torch.Tensor:
        """Gathers ``rows`` (int64 CPU indices) and returns them, still encoded, on ``target``."""
        if self.device.type == "cuda":
            gathered = self.data.index_select(0, rows.to(self.device))
            return gathered.to(target)
        if target.type == "cuda" and self._staging is not None:
            slot, staging = self._staging.take(rows.shape[0])
            torch.index_select(self.data, 0, rows, out=staging)
            moved = staging.to(target, non_blocking=True)
            self._staging.mark_in_use(slot, target)
            return moved
        return self.data.index_select(0, rows).to(target)

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Writes ``values`` (storage dtype, any device) into unique int64 CPU ``rows``."""
        if self.device.type == "cuda":
            self.data.index_copy_(0, rows.to(self.device), values.to(self.device))
            return
        # A blocking copy: the host must not read the rows before the device has written them.
        self.data.index_copy_(0, rows, values.to("cpu"))

    def load_(self, data: torch.Tensor) -> None:
        """Copies a full tensor of the same shape and dtype into the store (keeps pinning)."""
        self.data.copy_(data)
