"""A memory kept in files on disk, so that it can be larger than RAM.

A storage folder holds three files:

- ``rows.bin``: the encoded rows, ``(num_rows, *row_shape)`` in the storage dtype, memory-mapped
  with ``MAP_SHARED``: writes land in the page cache and the file, never in the process's
  anonymous memory, so the kernel can evict them under memory pressure.
- ``ring.bin``: int32 ``(2, num_samples)``, the fill counts then the ring heads, memory-mapped the
  same way, so the bookkeeping is always as current as the rows.
- ``slot_info.bin``: the per-slot bookkeeping (float32 last weights, then uint8 fooled-at-write
  flags; see :data:`~memloss_addon.store.slots.BOOKKEEPING`), mapped the same way. A folder made
  before it existed gets it, with initial values, when reopened.
- ``meta.json``: the storage configuration, written atomically once the other two files exist. A
  folder without it is unfinished and is created afresh; a reopen must match it.

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> rows, ring = open_disk_memory(folder, layout={"num_samples": 3}, num_samples=3, depth=1,
    ...                               row_shape=(2,), dtype=torch.float32, staging=False)
    >>> rows.write(torch.tensor([1]), torch.tensor([[0.5, 1.0]]))
    >>> ring.commit(ring.plan_write(torch.tensor([1]), torch.tensor([True])))
    >>> rows, ring = open_disk_memory(folder, layout={"num_samples": 3}, num_samples=3, depth=1,
    ...                               row_shape=(2,), dtype=torch.float32, staging=False)
    >>> rows.data[1].tolist(), ring.slot_count.tolist()
    ([0.5, 1.0], [0, 1, 0])
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .files import atomic_write, fsync_path
from .placement import TensorStore, _PinnedStaging
from .slots import BOOKKEEPING, BookkeepingField, SlotRing

__all__ = ["DiskTensorStore", "open_disk_memory"]

_META = "meta.json"
_ROWS = "rows.bin"
_RING = "ring.bin"
_SLOT_INFO = "slot_info.bin"
# The bookkeeping files and the fields each holds, in order.
_BOOKKEEPING_FILES = {
    _RING: tuple(field for field in BOOKKEEPING if not field.per_slot),
    _SLOT_INFO: tuple(field for field in BOOKKEEPING if field.per_slot),
}


class DiskTensorStore(TensorStore):
    """A :class:`TensorStore` whose rows are a memory-mapped file instead of RAM.

    Args:
        file: the rows file (created, zero-filled, if missing).
        num_rows: how many rows.
        row_shape: the shape of one row.
        dtype: the storage dtype.
        staging: keep pinned staging buffers for reads to CUDA (needs CUDA).
    """

    def __init__(
        self,
        file: str | os.PathLike[str],
        num_rows: int,
        row_shape: tuple[int, ...],
        *,
        dtype: torch.dtype,
        staging: bool,
    ) -> None:
        self.device = torch.device("cpu")
        self.row_shape = tuple(row_shape)
        self.dtype = dtype
        self.path = Path(file)
        numel = num_rows * math.prod(self.row_shape)
        # A file mapping cannot be pinned; reads to CUDA go through pinned staging buffers instead.
        flat = torch.from_file(str(self.path), shared=True, size=max(numel, 1), dtype=dtype)
        self.data = flat[:numel].view(num_rows, *self.row_shape)
        self._staging = _PinnedStaging(self.row_shape, dtype) if staging else None

    def flush(self) -> None:
        """Forces the written rows to the disk (they are in the page cache already)."""
        fsync_path(self.path)


def open_disk_memory(
    folder: str | os.PathLike[str],
    *,
    layout: dict[str, Any],
    num_samples: int,
    depth: int,
    row_shape: tuple[int, ...],
    dtype: torch.dtype,
    staging: bool,
    num_rows: int | None = None,
) -> tuple[DiskTensorStore, SlotRing]:
    """Opens (or creates) a storage folder; returns its rows and its file-backed slot ring.

    Args:
        folder: the storage folder.
        layout: the configuration the folder must have been made with (JSON-serializable).
        num_samples: samples in the slot ring.
        depth: slots per sample.
        row_shape: the shape of one stored row.
        dtype: the storage dtype.
        staging: pinned staging buffers for reads to CUDA.
        num_rows: rows in the rows file (default ``num_samples * depth``).

    Raises:
        ValueError: the folder holds a memory of another configuration, or its files are damaged.
    """
    folder = Path(folder)
    num_rows = num_samples * depth if num_rows is None else num_rows
    meta_file = folder / _META
    if meta_file.exists():
        try:
            saved = json.loads(meta_file.read_text())
        except (OSError, ValueError) as error:
            raise ValueError(f"storage_path {str(folder)!r} has an unreadable {_META}") from error
        if saved != _jsonable(layout):
            raise ValueError(
                f"storage_path {str(folder)!r} holds a memory made with {saved}, which does not "
                f"match this memory's {_jsonable(layout)}; use another folder or delete it"
            )
        itemsize = torch.empty((), dtype=dtype).element_size()
        expected = {_ROWS: max(num_rows * math.prod(row_shape), 1) * itemsize}
        for name, fields in _BOOKKEEPING_FILES.items():
            expected[name] = max(_field_offsets(fields, num_samples, depth)[-1], 1)
        for name, size in expected.items():
            if name == _SLOT_INFO and not (folder / name).exists():
                continue  # a folder of an earlier version: created below
            actual = (folder / name).stat().st_size if (folder / name).exists() else -1
            if actual != size:
                raise ValueError(
                    f"storage_path {str(folder)!r}: {name} has {actual} bytes, expected {size}"
                )
        rows = DiskTensorStore(folder / _ROWS, num_rows, row_shape, dtype=dtype, staging=staging)
        return rows, _mapped_ring(folder, num_samples=num_samples, depth=depth)
    folder.mkdir(parents=True, exist_ok=True)
    for name in (_ROWS, *_BOOKKEEPING_FILES):  # leftovers of an unfinished creation
        (folder / name).unlink(missing_ok=True)
    rows = DiskTensorStore(folder / _ROWS, num_rows, row_shape, dtype=dtype, staging=staging)
    ring = _mapped_ring(folder, num_samples=num_samples, depth=depth)
    with atomic_write(meta_file) as file:
        file.write(json.dumps(_jsonable(layout), sort_keys=True).encode())
    return rows, ring


def _field_offsets(fields: tuple[BookkeepingField, ...], num_samples: int, depth: int) -> list[int]:
    """Byte offset of each field in its file, each at its natural alignment, then the file size."""
    offsets = [0]
    for field in fields:
        start = -(-offsets[-1] // field.dtype.itemsize) * field.dtype.itemsize
        offsets[-1] = start
        offsets.append(start + math.prod(field.shape(num_samples, depth)) * field.dtype.itemsize)
    return offsets


def _mapped_ring(folder: Path, *, num_samples: int, depth: int) -> SlotRing:
    """A slot ring whose bookkeeping tensors are shared maps of the folder's files.

    A file that does not exist yet is created with each field's initial value. SlotRing updates
    its tensors in place, so every commit reaches the files.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, fields in _BOOKKEEPING_FILES.items():
        path = folder / name
        fresh = not path.exists()
        offsets = _field_offsets(fields, num_samples, depth)
        raw = torch.from_file(str(path), shared=True, size=max(offsets[-1], 1), dtype=torch.uint8)
        for field, start, end in zip(fields, offsets, offsets[1:], strict=False):
            tensor = raw[start:end].view(field.dtype)
            if fresh:
                tensor.fill_(field.resolve(field.initial, depth))  # type: ignore[arg-type]
            tensors[field.name] = tensor
        if fresh:
            fsync_path(path)
    return SlotRing(num_samples=num_samples, depth=depth, tensors=tensors)


def _jsonable(layout: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(layout, sort_keys=True))
