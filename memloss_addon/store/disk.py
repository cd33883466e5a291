"""A memory kept in files on disk, so that it can be larger than RAM.

A storage folder holds:

- ``rows.bin``: the encoded rows, ``(num_rows, *row_shape)`` in the storage dtype, memory-mapped
  with ``MAP_SHARED``: writes land in the page cache and the file, never in the process's
  anonymous memory, so the kernel can evict them under memory pressure.
- ``ring.bin``: int32 ``(2, num_samples)``, the fill counts then the ring heads, memory-mapped the
  same way, so the bookkeeping is always as current as the rows.
- ``slot_info.bin``: the per-slot bookkeeping (float32 last weights, then uint8 fooled-at-write
  flags; see :data:`~memloss_addon.store.slots.BOOKKEEPING`), mapped the same way. A folder made
  before it existed gets it, with initial values, when reopened.
- ``checks.bin``: uint32, the CRC-32 of each row of ``rows.bin``, and ``journal.bin``,
  ``undo-0.bin``, ``undo-1.bin``: the undo journal, which makes each write all-or-nothing after a
  process kill, lets a reopened folder be checked row by row after a power loss, and rolls the
  memory back to a step (see :mod:`memloss_addon.store.journal`). A folder made before they
  existed gets them when reopened (its rows' checksums computed then).
- ``meta.json``: the storage configuration, written atomically once the other files exist. A
  folder without it is unfinished and is created afresh; a reopen must match it.

Every file is allocated in full when the folder is created (``os.posix_fallocate``, else written
out; see :mod:`memloss_addon.store.space`): a file system that cannot hold the memory is an
``OSError`` naming the folder, the bytes needed and the bytes free, raised before training, and
the files made so far are removed. Writes through the mappings then never need a new disk block,
so a disk that fills up later never stops the process with ``SIGBUS`` (except on copy-on-write
file systems, which get a warning).

Example:
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> rows, ring, _ = open_disk_memory(folder, layout={"num_samples": 3}, num_samples=3,
    ...                                  depth=1, row_shape=(2,), dtype=torch.float32,
    ...                                  staging=False)
    >>> rows.write(torch.tensor([1]), torch.tensor([[0.5, 1.0]]))
    >>> ring.commit(ring.plan_write(torch.tensor([1]), torch.tensor([True])))
    >>> rows, ring, _ = open_disk_memory(folder, layout={"num_samples": 3}, num_samples=3,
    ...                                  depth=1, row_shape=(2,), dtype=torch.float32,
    ...                                  staging=False)
    >>> rows.data[1].tolist(), ring.slot_count.tolist()
    ([0.5, 1.0], [0, 1, 0])
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .files import atomic_write, fsync_path
from .journal import (
    CHECKS_FILE,
    HEADER_BYTES,
    HEADER_FILE,
    SEGMENT_FILES,
    Journal,
    MemoryAheadWarning,
    never_written_check,
    row_checks,
)
from .placement import TensorStore, _PinnedStaging, _row_bytes
from .slots import BOOKKEEPING, BookkeepingField, SlotRing, WritePlan
from .space import allocate, copy_on_write_filesystem, free_bytes, space_error

__all__ = ["DiskTensorStore", "JournaledSlotRing", "open_disk_memory"]

_META = "meta.json"
_ROWS = "rows.bin"
_RING = "ring.bin"
_SLOT_INFO = "slot_info.bin"
# The bookkeeping files and the fields each holds, in order.
_BOOKKEEPING_FILES = {
    _RING: tuple(field for field in BOOKKEEPING if not field.per_slot),
    _SLOT_INFO: tuple(field for field in BOOKKEEPING if field.per_slot),
}
_DATA_FILES = (_ROWS, *_BOOKKEEPING_FILES, CHECKS_FILE, HEADER_FILE, *SEGMENT_FILES)
# Errors of a file system that cannot hold a file: reported with the folder, need and free.
_NO_SPACE = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
_LOG_ROWS = 256  # the undo log is allocated up front for writes of this many rows
_CHECK_BYTES = 64 * 2**20  # rows read at a time when computing every row's checksum


class DiskTensorStore(TensorStore):
    """A :class:`TensorStore` whose rows are a memory-mapped file instead of RAM.

    Each write first logs the rows it overwrites to the folder's :class:`Journal` (once set),
    then stores the rows and their CRC-32s.

    Args:
        file: the rows file (allocated in full beforehand, see :func:`open_disk_memory`).
        num_rows: how many rows.
        row_shape: the shape of one row.
        dtype: the storage dtype.
        staging: keep pinned staging buffers for reads to CUDA (needs CUDA).
    """

    journal: Journal | None = None

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

    def write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Logs the rows overwritten, then writes ``values`` into unique int64 CPU ``rows``."""
        index = rows.numpy()
        if self.journal is None or not index.shape[0]:
            super().write(rows, values)
            return
        new = _row_bytes(values.to("cpu").contiguous())
        self.journal.before_rows(index)
        _row_bytes(self.data)[index] = new
        self.journal.checks[index] = row_checks(new)

    def load_(self, data: torch.Tensor) -> None:
        """Replaces every row (the journal records the load as in progress until the slot ring's
        load ends it)."""
        if self.journal is not None:
            self.journal.begin_load()
        self.data.copy_(data)
        if self.journal is not None:
            _compute_checks(_row_bytes(self.data), self.journal.checks)

    def flush(self) -> None:
        """Forces the folder's files to the disk (the rows are in the page cache already)."""
        if self.journal is not None:
            self.journal.flush()
        else:
            fsync_path(self.path)


class JournaledSlotRing(SlotRing):
    """A :class:`SlotRing` on mapped files whose changes are logged to the folder's journal."""

    journal: Journal | None = None

    def commit(
        self,
        plan: WritePlan,
        fooled: torch.Tensor | None = None,
        weight: torch.Tensor | None = None,
    ) -> None:
        if self.journal is not None:
            self.journal.before_ring(plan.samples.numpy(), plan.store_rows.numpy())
        super().commit(plan, fooled, weight)
        if self.journal is not None:
            self.journal.end_write()

    def record_weights(self, slots: torch.Tensor, weights: torch.Tensor) -> None:
        if self.journal is not None:
            self.journal.before_weights(slots.numpy())
        super().record_weights(slots, weights)

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        super().load(state)
        if self.journal is not None:
            self.journal.end_load()


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
) -> tuple[DiskTensorStore, JournaledSlotRing, Journal]:
    """Opens (or creates) a storage folder; returns its rows, its slot ring and its journal.

    A new folder's files are allocated in full first. An existing folder is recovered (see
    :meth:`Journal.recover`) and warns, with a :class:`MemoryAheadWarning`, when it holds
    changes made after its last checkpoint mark.

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
        OSError: the folder's file system cannot hold the memory (the message names the folder,
            the bytes needed and the bytes free); nothing is left in the folder.
        ValueError: the folder holds a memory of another configuration, or its files are damaged
            or cannot be made consistent.
    """
    folder = Path(folder)
    num_rows = num_samples * depth if num_rows is None else num_rows
    itemsize = torch.empty((), dtype=dtype).element_size()
    row_bytes = math.prod(row_shape) * itemsize
    sizes = {_ROWS: max(num_rows * row_bytes, 1)}
    for name, fields in _BOOKKEEPING_FILES.items():
        sizes[name] = max(_field_offsets(fields, num_samples, depth)[-1], 1)
    sizes[CHECKS_FILE] = max(num_rows, 1) * 4
    sizes[HEADER_FILE] = HEADER_BYTES
    for name in SEGMENT_FILES:
        sizes[name] = HEADER_BYTES + min(num_rows, _LOG_ROWS) * (row_bytes + 64)
    distributed = "world_size" in layout
    meta_file = folder / _META
    if not meta_file.exists():
        return _create(
            folder, sizes, layout, num_samples, depth, row_shape, dtype, staging, num_rows
        )
    try:
        saved = json.loads(meta_file.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"storage_path {str(folder)!r} has an unreadable {_META}") from error
    if saved != _jsonable(layout):
        raise ValueError(
            f"storage_path {str(folder)!r} holds a memory made with {saved}, which does not "
            f"match this memory's {_jsonable(layout)}; use another folder or delete it"
        )
    missing = {name: size for name, size in sizes.items() if not (folder / name).exists()}
    if _ROWS in missing or _RING in missing:
        raise ValueError(f"storage_path {str(folder)!r}: {_ROWS} or {_RING} is missing")
    for name in (_ROWS, *_BOOKKEEPING_FILES, CHECKS_FILE):
        if name in missing:
            continue  # a folder of an earlier version: created below
        actual = (folder / name).stat().st_size
        if actual != sizes[name]:
            raise ValueError(
                f"storage_path {str(folder)!r}: {name} has {actual} bytes, expected {sizes[name]}"
            )
    if missing:  # files of a later version: allocated like a new folder's
        _allocate_files(folder, missing, created_folder=False)
    rows = DiskTensorStore(folder / _ROWS, num_rows, row_shape, dtype=dtype, staging=staging)
    ring = _mapped_ring(folder, num_samples=num_samples, depth=depth, fresh=set(missing))
    checks = _mapped_checks(folder, num_rows)
    if CHECKS_FILE in missing:
        _compute_checks(_row_bytes(rows.data), checks)
    journal = Journal(
        folder,
        rows=_row_bytes(rows.data),
        checks=checks,
        ring=ring,
        distributed=distributed,
        create=HEADER_FILE in missing,
    )
    journal.files = [folder / name for name in (_ROWS, *_BOOKKEEPING_FILES, CHECKS_FILE)]
    notes = journal.recover()
    if missing:
        journal.flush()
    rows.journal = ring.journal = journal
    if notes:
        warnings.warn(
            f"storage_path {str(folder)!r}: " + "; ".join(notes) + ".",
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )
    _warn_if_ahead(folder, journal)
    return rows, ring, journal


def _create(
    folder: Path,
    sizes: dict[str, int],
    layout: dict[str, Any],
    num_samples: int,
    depth: int,
    row_shape: tuple[int, ...],
    dtype: torch.dtype,
    staging: bool,
    num_rows: int,
) -> tuple[DiskTensorStore, JournaledSlotRing, Journal]:
    """Allocates, initialises and syncs a new folder's files, then writes its ``meta.json``."""
    created_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    for name in _DATA_FILES:  # leftovers of an unfinished creation
        (folder / name).unlink(missing_ok=True)
    _allocate_files(folder, sizes, created_folder=created_folder)
    kind = copy_on_write_filesystem(folder)
    if kind is not None:
        warnings.warn(
            f"storage_path {str(folder)!r} is on a copy-on-write file system ({kind}): the memory "
            "was allocated in full, but an overwrite there needs new disk blocks, so if the disk "
            "fills up during training the process can still be stopped by SIGBUS. Prefer a "
            "folder on ext4, XFS or tmpfs",
            RuntimeWarning,
            stacklevel=_user_stacklevel(),
        )
    try:
        rows = DiskTensorStore(folder / _ROWS, num_rows, row_shape, dtype=dtype, staging=staging)
        ring = _mapped_ring(folder, num_samples=num_samples, depth=depth, fresh=set(sizes))
        checks = _mapped_checks(folder, num_rows)
        checks[:] = never_written_check(rows.data[0].nbytes if num_rows else 0)
        journal = Journal(
            folder,
            rows=_row_bytes(rows.data),
            checks=checks,
            ring=ring,
            distributed="world_size" in layout,
            create=True,
        )
        journal.files = [folder / name for name in (_ROWS, *_BOOKKEEPING_FILES, CHECKS_FILE)]
        journal.flush()
        rows.journal = ring.journal = journal
        fsync_path(folder)
        with atomic_write(folder / _META) as file:
            file.write(json.dumps(_jsonable(layout), sort_keys=True).encode())
    except BaseException:
        _remove(folder, sizes, created_folder=created_folder)
        raise
    return rows, ring, journal


def _allocate_files(folder: Path, sizes: dict[str, int], *, created_folder: bool) -> None:
    """Creates and allocates each file in full, or removes them all and raises OSError."""
    free = free_bytes(folder)
    try:
        if free is not None and sum(sizes.values()) > free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        for name, size in sizes.items():
            descriptor = os.open(folder / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                allocate(descriptor, size)
            finally:
                os.close(descriptor)
    except OSError as error:
        _remove(folder, sizes, created_folder=created_folder)
        if error.errno in _NO_SPACE:
            raise space_error(folder, sizes, error) from error
        raise


def _remove(folder: Path, sizes: Mapping[str, int], *, created_folder: bool) -> None:
    """Removes the files of an unfinished creation (and the folder, if it made it)."""
    for name in sizes:
        with contextlib.suppress(OSError):
            (folder / name).unlink(missing_ok=True)
    if created_folder:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _field_offsets(fields: tuple[BookkeepingField, ...], num_samples: int, depth: int) -> list[int]:
    """Byte offset of each field in its file, each at its natural alignment, then the file size."""
    offsets = [0]
    for field in fields:
        start = -(-offsets[-1] // field.dtype.itemsize) * field.dtype.itemsize
        offsets[-1] = start
        offsets.append(start + math.prod(field.shape(num_samples, depth)) * field.dtype.itemsize)
    return offsets


def _mapped_ring(
    folder: Path, *, num_samples: int, depth: int, fresh: set[str]
) -> JournaledSlotRing:
    """A slot ring whose bookkeeping tensors are shared maps of the folder's (allocated) files.

    The files named in ``fresh`` get each field's initial value. SlotRing updates its tensors in
    place, so every commit reaches the files.
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, fields in _BOOKKEEPING_FILES.items():
        path = folder / name
        offsets = _field_offsets(fields, num_samples, depth)
        raw = torch.from_file(str(path), shared=True, size=max(offsets[-1], 1), dtype=torch.uint8)
        for field, start, end in zip(fields, offsets, offsets[1:], strict=False):
            tensor = raw[start:end].view(field.dtype)
            if name in fresh:
                tensor.fill_(field.resolve(field.initial, depth))  # type: ignore[arg-type]
            tensors[field.name] = tensor
    return JournaledSlotRing(num_samples=num_samples, depth=depth, tensors=tensors)


def _mapped_checks(folder: Path, num_rows: int) -> np.ndarray:
    path = str(folder / CHECKS_FILE)
    raw = torch.from_file(path, shared=True, size=max(num_rows, 1) * 4, dtype=torch.uint8)
    return raw.view(torch.int32)[:num_rows].numpy().view(np.uint32)


def _compute_checks(rows: np.ndarray, checks: np.ndarray) -> None:
    """Every row's CRC-32, a bounded number of rows at a time."""
    step = max(1, _CHECK_BYTES // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        checks[start : start + step] = row_checks(rows[start : start + step])


def _warn_if_ahead(folder: Path, journal: Journal) -> None:
    """Tells the user how far a reopened memory is ahead of its last checkpoint mark."""
    header = journal.header
    if header.marked and header.step > header.mark_step:
        ahead = header.step - header.mark_step
        message = (
            f"the memory was last changed at step {header.step}, {ahead} step(s) after its last "
            f"mark_checkpoint() at step {header.mark_step}. A run resumed from the checkpoint of "
            f"step {header.mark_step} would replay memory examples stored in the {ahead} steps "
            f"it is about to redo: call memory.rollback_to({header.mark_step}) (or to your "
            f"checkpoint's step, from {header.base_step} to {header.step}) to resume "
            "consistently"
        )
    elif not header.marked and header.step > 0:
        message = (
            f"the memory was last changed at step {header.step}. A run resumed from a "
            f"checkpoint older than step {header.step} finds the memory ahead of it by the "
            "difference, replaying examples of the steps it is about to redo, and the memory can "
            f"return only to steps {header.base_step} to {header.step} (memory.rollback_to). "
            "Call memory.mark_checkpoint() after each checkpoint so that a resumed run can roll "
            "the memory back to it (docs/saving.md)"
        )
    else:
        return
    warnings.warn(
        f"storage_path {str(folder)!r}: {message}",
        MemoryAheadWarning,
        stacklevel=_user_stacklevel(),
    )


def _user_stacklevel() -> int:
    """The stack level of the first frame outside this package (for warnings)."""
    package = str(Path(__file__).resolve().parents[1])
    frame, level = sys._getframe(1), 1
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(package):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def _jsonable(layout: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(layout, sort_keys=True))
