"""The undo journal of a disk-backed memory: whole rows after a kill, and rollback to a step.

A disk-backed memory changes its files in place: a write stores rows into ``rows.bin``, then its
bookkeeping into ``ring.bin`` and ``slot_info.bin``. Before it changes anything, it appends what
it is about to overwrite (the old rows, their checksums, the old bookkeeping entries) to an undo
log, and only then marks the write as in progress in ``journal.bin``. Once the bookkeeping is
committed the write is marked complete.

- **Process kill** (SIGKILL, the OOM killer, an exception, Ctrl-C). Every store a process makes
  to a shared file mapping, and every ``pwrite``, is in the page cache, in program order, the
  moment it returns, and the page cache outlives the process. A memory reopened on the same boot
  of the machine therefore finds either no write in progress, or one whose undo records are
  complete: it restores them (rows, checksums and bookkeeping of that write), and the memory is
  exactly as after the last complete call. A write is all-or-nothing; no row is ever torn.
- **Power loss, OS crash.** The page cache is lost and the disk holds an arbitrary subset of the
  pages written since the last flush, in no particular order, so the undo log cannot be trusted.
  Each row's CRC-32 is kept in ``checks.bin``. The first change after a flush records, durably
  (``fsync``), that the folder is being changed on this boot of the machine; a folder reopened on
  another boot (``/proc/sys/kernel/random/boot_id``) with that record is checked whole: every
  filled slot's row against its CRC-32. A row that does not match (torn, or never reached the
  disk) is dropped from its sample's slots, the per-slot facts (last weight, fooled at write)
  are reset, and the memory cannot be rolled back. It then holds only rows written whole, each
  of its own sample, from steps up to the crash. A distributed memory's folder is refused
  instead: the ranks' folders can no longer be reconciled.

Rollback. Without :meth:`Journal.mark`, the log keeps only the last complete write (two files
used in turn), so a memory can always step back one write (enough to realign the ranks of a
distributed memory stopped mid-step). After ``mark()``, which flushes the folder, the log keeps
every change since, and :meth:`Journal.rollback` returns the memory bit-identically to any step
from the mark on. Cost: each write copies the rows it overwrites into the log (one extra write of
the batch's rows) and computes their CRC-32s; with a mark the log grows by the rows overwritten
since the mark, up to the size of the rows written in a checkpoint interval.
"""

from __future__ import annotations

import atexit
import operator
import os
import struct
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .slots import BOOKKEEPING, SlotRing
from .space import allocate, boot_id, pread, pwrite, space_error

__all__ = [
    "CHECKS_FILE",
    "HEADER_FILE",
    "SEGMENT_FILES",
    "Journal",
    "MemoryAheadWarning",
    "never_written_check",
    "row_checks",
]

HEADER_FILE = "journal.bin"
SEGMENT_FILES = ("undo-0.bin", "undo-1.bin")
CHECKS_FILE = "checks.bin"
HEADER_BYTES = 4096
_CHECK_BYTES = 64 * 2**20  # rows read at a time by the whole check after a power loss

IDLE, WRITE, LOAD, ROLLBACK = 0, 1, 2, 3
_ROWS, _SAMPLES, _SLOTS = 1, 2, 3
_MAGIC = b"MLJRNL01"
_CHUNK_MAGIC = b"MLUC"
_CHUNK = struct.Struct("<4sIQQq")  # magic, kind, entries, payload bytes, step
_PER_SAMPLE = tuple(field for field in BOOKKEEPING if not field.per_slot)
_PER_SLOT = tuple(field for field in BOOKKEEPING if field.per_slot)


class MemoryAheadWarning(RuntimeWarning):
    """A reopened disk-backed memory holds writes from steps after its last checkpoint mark."""


@dataclass
class _Header:
    """The journal's state, rewritten whole (one page, one ``pwrite``) at every transition."""

    magic: bytes = _MAGIC
    state: int = IDLE  # IDLE, WRITE (a write in progress), LOAD, ROLLBACK
    dirty: int = 0  # changed since the last flush
    marked: int = 0  # mark() was called: the log keeps every change since mark_step
    seg: int = 0  # the segment file holding the kept log
    cur_seg: int = 0  # the segment file of the write in progress
    step: int = 0  # the memory's step after its last complete change
    writes: int = 0  # complete writes (identical on every rank of a distributed memory)
    mark_step: int = -1
    base_step: int = 0  # the earliest step the kept log can restore
    log_end: int = 0  # bytes of complete records in segment ``seg``
    cur_start: int = 0  # the write in progress: its chunks in [cur_start, cur_end) of cur_seg
    cur_end: int = 0
    cur_step: int = 0
    target: int = 0  # the step of a rollback in progress
    flushed_step: int = 0  # the step at the last flush
    boot: bytes = b""  # the boot on which the folder was changed since the last flush

    _STRUCT = struct.Struct("<8s5I10q36s")

    def pack(self) -> bytes:
        return self._STRUCT.pack(*_header_values(self))

    @classmethod
    def unpack(cls, data: bytes) -> _Header:
        header = cls(*cls._STRUCT.unpack(data[: cls._STRUCT.size]))
        header.boot = header.boot.rstrip(b"\0")
        return header


_header_values = operator.attrgetter(*(field.name for field in fields(_Header)))


@dataclass(frozen=True)
class _Chunk:
    offset: int
    kind: int
    count: int
    nbytes: int
    step: int

    @property
    def end(self) -> int:
        return self.offset + _CHUNK.size + self.nbytes


def row_checks(rows: np.ndarray) -> np.ndarray:
    """The CRC-32 of each row of a 2-D uint8 array, as uint32.

    Example:
        >>> row_checks(np.zeros((2, 4), dtype=np.uint8)).tolist()
        [558161692, 558161692]
    """
    return np.fromiter((zlib.crc32(row) for row in rows), dtype=np.uint32, count=rows.shape[0])


def never_written_check(row_bytes: int) -> int:
    """The check value of a row never written: never the CRC-32 of its (zero) content."""
    return zlib.crc32(bytes(row_bytes)) ^ 0xFFFFFFFF


def _pad(nbytes: int) -> int:
    return -(-nbytes // 8) * 8


class Journal:
    """The undo log and state of one storage folder (see the module docstring).

    The disk-backed rows and slot ring call :meth:`before_rows`, :meth:`before_ring`,
    :meth:`end_write`, :meth:`before_weights`, :meth:`begin_load` and :meth:`end_load` around
    their changes; the memory sets :attr:`step` before each call.

    Args:
        folder: the storage folder.
        rows: the rows file's mapping, ``(num_rows, row_bytes)`` uint8.
        checks: the checks file's mapping, ``(num_rows,)`` uint32.
        ring: the file-backed slot ring.
        distributed: the folder holds one rank's part of a distributed memory.
        create: a new folder (write a fresh header) rather than an existing one (recover it).
    """

    def __init__(
        self,
        folder: Path,
        *,
        rows: np.ndarray,
        checks: np.ndarray,
        ring: SlotRing,
        distributed: bool,
        create: bool,
    ) -> None:
        self.folder = folder
        self.rows = rows
        self.checks = checks
        self.ring = ring
        self.distributed = distributed
        self.files: list[Path] = []  # every file to fsync on a flush, set by the opener
        self._boot = boot_id().encode()
        self._header_fd = os.open(folder / HEADER_FILE, os.O_RDWR)
        self._segment_fds = [os.open(folder / name, os.O_RDWR) for name in SEGMENT_FILES]
        self._capacity = [os.fstat(fd).st_size for fd in self._segment_fds]
        self._open_record = False  # a write of this process is between its first chunk and end
        self._weights_step: int | None = None  # the step of the last unlogged weight change
        if create:
            self.header = _Header()
            self._write_header(sync=True)
        else:
            data = pread(self._header_fd, HEADER_BYTES, 0)
            if len(data) < _Header._STRUCT.size or not data.startswith(_MAGIC):
                raise ValueError(f"storage_path {str(folder)!r}: {HEADER_FILE} is damaged")
            self.header = _Header.unpack(data)
        self.step = self.header.step
        # At a normal exit the folder is flushed, so that the next boot trusts it without
        # checking every row (a killed process leaves it to the page cache, which is enough).
        atexit.register(_flush_at_exit, weakref.ref(self))

    # ------------------------------------------------------------------ reopening

    def recover(self) -> list[str]:
        """Brings a reopened folder to a consistent state; returns what was done, for a warning.

        Raises:
            ValueError: a load into the folder was interrupted, or a distributed memory's folder
                was being changed when the machine went down.
        """
        header, name = self.header, repr(str(self.folder))
        if header.state == LOAD:
            raise ValueError(
                f"storage_path {name}: a load into this memory was interrupted, so it holds part "
                "of the loaded state and part of the old one; load the state again (after "
                "deleting the folder) or delete the folder"
            )
        same_boot = bool(self._boot) and header.boot == self._boot
        if header.dirty and not same_boot:
            if self.distributed:
                raise ValueError(
                    f"storage_path {name} holds one rank's part of a distributed memory and was "
                    "being changed when the machine went down (power loss, OS crash or reboot "
                    f"since step {header.flushed_step}, its last flush): its rows can be checked, "
                    "but the ranks' folders cannot be reconciled. Load every rank's state saved "
                    "with memory.save(), or delete the folders"
                )
            return [self._check_everything()]
        notes = []
        if header.state == WRITE:
            self._undo_current()
            notes.append(
                f"the write of step {header.cur_step} was interrupted (the process stopped "
                f"mid-write) and has been undone: the memory is as after step {header.step}"
            )
        elif header.state == ROLLBACK:
            self.rollback(header.target)
            notes.append(f"an interrupted rollback to step {header.target} was completed")
        return notes

    def _check_everything(self) -> str:
        """Drops every filled slot whose row does not match its CRC-32 (after a power loss)."""
        ring, depth = self.ring, self.ring.depth
        counts = ring.slot_count.numpy()
        heads = ring.ring_head.numpy()
        ages = np.arange(depth)
        slots = (heads[:, None].astype(np.int64) - ages) % depth  # (N, depth), newest first
        filled = ages < counts[:, None]
        rows = np.arange(counts.shape[0])[:, None] * depth + slots
        good = np.zeros_like(filled)
        wanted = rows[filled]
        verdicts = np.empty(wanted.shape[0], dtype=bool)
        step = max(1, _CHECK_BYTES // max(self.rows.shape[1], 1))  # bounds the RAM of the pass
        for start in range(0, wanted.shape[0], step):
            part = wanted[start : start + step]
            verdicts[start : start + step] = row_checks(self.rows[part]) == self.checks[part]
        good[filled] = verdicts
        damaged = int((filled & ~good).sum())
        for sample in np.flatnonzero((filled & ~good).any(axis=1)):
            valid = good[sample, : counts[sample]]
            first = int(np.argmax(valid)) if valid.any() else int(counts[sample])
            run = int(np.argmin(valid[first:])) if not valid[first:].all() else len(valid) - first
            heads[sample] = (heads[sample] - first) % depth
            counts[sample] = run
        for field in _PER_SLOT:  # which example they describe is no longer known
            getattr(ring, field.name).fill_(field.resolve(field.initial, depth))
        header = self.header
        header.state = IDLE
        header.log_end = 0
        header.base_step = header.step
        self.flush()
        return (
            f"the folder was being changed when the machine went down (power loss, OS crash or "
            f"reboot; last flush at step {header.flushed_step}). Every stored row was checked "
            f"against its CRC-32: {damaged} torn or lost row(s) were dropped, "
            f"{int(filled.sum()) - damaged} kept. The per-slot facts (last weight, fooled at "
            "write) were reset, and the memory cannot be rolled back"
        )

    # ------------------------------------------------------------------ writes

    def before_rows(self, rows: np.ndarray) -> None:
        """Logs the rows (and their checks) a write is about to overwrite."""
        self._begin()
        old_rows = self.rows[rows]
        self._append(_ROWS, rows.shape[0], [rows.astype(np.int64), self.checks[rows], old_rows])
        self._write_header(state=WRITE)

    def before_ring(self, samples: np.ndarray, slots: np.ndarray) -> None:
        """Logs the bookkeeping entries a write's commit is about to change."""
        self._begin()
        self._append_bookkeeping(samples, slots)
        self._write_header(state=WRITE)

    def end_write(self) -> None:
        """Marks the write in progress complete."""
        header = self.header
        if header.marked:
            header.log_end = header.cur_end
        else:  # keep this write only; a weight change logged nowhere bars stepping behind it
            header.seg, header.log_end = header.cur_seg, header.cur_end
            header.base_step = self.step if self._weights_step == self.step else header.step
        header.step = self.step
        header.writes += 1
        self._open_record = False
        self._write_header(state=IDLE)

    def before_weights(self, slots: np.ndarray) -> None:
        """Logs the last weights a read is about to record (kept for a rollback after a mark)."""
        self._refuse_if_half_loaded()
        if self.header.state == WRITE:
            self._undo_current()
        self._make_dirty()
        header = self.header
        if not header.marked:
            self._weights_step = self.step
            if header.base_step != self.step or header.step != self.step:
                header.base_step = header.step = self.step
                self._write_header()
            return
        header.cur_seg, header.cur_start = header.seg, header.log_end
        header.cur_end = header.cur_start
        self._append(_SLOTS, slots.shape[0], self._slot_values(slots))
        header.log_end, header.step = header.cur_end, self.step
        self._write_header()

    def _refuse_if_half_loaded(self) -> None:
        if self.header.state == LOAD:
            raise ValueError(
                f"storage_path {str(self.folder)!r}: a load into this memory was interrupted "
                "(it raised part-way); load the state again before using the memory"
            )

    def _begin(self) -> None:
        self._refuse_if_half_loaded()
        header = self.header
        if header.state == WRITE:
            if self._open_record and header.cur_step == self.step:
                return  # a later part of this call's write
            self._undo_current()  # an earlier write of this process stopped by an exception
        self._make_dirty()
        header.cur_seg = header.seg if header.marked else 1 - header.seg
        header.cur_start = header.log_end if header.marked else 0
        header.cur_end = header.cur_start
        header.cur_step = self.step
        self._open_record = True

    def _append_bookkeeping(self, samples: np.ndarray, slots: np.ndarray) -> None:
        buffers = [samples.astype(np.int64)]
        buffers += [getattr(self.ring, field.name).numpy()[samples] for field in _PER_SAMPLE]
        self._append(_SAMPLES, samples.shape[0], buffers)
        self._append(_SLOTS, slots.shape[0], self._slot_values(slots))

    def _slot_values(self, slots: np.ndarray) -> list[np.ndarray]:
        buffers = [slots.astype(np.int64)]
        return buffers + [getattr(self.ring, field.name).numpy()[slots] for field in _PER_SLOT]

    def _append(self, kind: int, count: int, buffers: Sequence[np.ndarray]) -> None:
        """Writes one chunk at the end of the record in progress (before anything it protects)."""
        header = self.header
        arrays = [np.ascontiguousarray(buffer) for buffer in buffers]
        payload = sum(_pad(array.nbytes) for array in arrays)
        offset = header.cur_end
        fd = self._segment_fds[header.cur_seg]
        try:
            self._reserve(header.cur_seg, offset + _CHUNK.size + payload)
        except OSError:
            if header.state == WRITE:  # part of this write is done: take it back first
                self._undo_current()
            self._open_record = False
            raise
        _write_all(fd, _CHUNK.pack(_CHUNK_MAGIC, kind, count, payload, self.step), offset)
        position = offset + _CHUNK.size
        for array in arrays:
            _write_all(fd, array.reshape(-1).view(np.uint8).data, position)
            position += _pad(array.nbytes)
        header.cur_end = position

    def _reserve(self, segment: int, size: int) -> None:
        capacity = self._capacity[segment]
        if size <= capacity:
            return
        fd = self._segment_fds[segment]
        for target in (max(size, 2 * capacity), size):
            try:
                allocate(fd, target, start=capacity)
                self._capacity[segment] = target
                return
            except OSError as error:
                if target == size:
                    name = SEGMENT_FILES[segment]
                    raise space_error(
                        self.folder,
                        {name: size - capacity},
                        error,
                        what="the undo log of this write (the rows it overwrites"
                        + (" since the last mark_checkpoint())" if self.header.marked else ")"),
                    ) from error

    # ------------------------------------------------------------------ undo

    def _chunks(self, segment: int, start: int, end: int) -> list[_Chunk]:
        chunks, offset, fd = [], start, self._segment_fds[segment]
        while offset < end:
            magic, kind, count, nbytes, step = _CHUNK.unpack(pread(fd, _CHUNK.size, offset))
            if magic != _CHUNK_MAGIC or offset + _CHUNK.size + nbytes > end:
                raise ValueError(
                    f"storage_path {str(self.folder)!r}: {SEGMENT_FILES[segment]} is damaged at "
                    f"byte {offset}"
                )
            chunks.append(_Chunk(offset, kind, count, nbytes, step))
            offset = chunks[-1].end
        return chunks

    def _undo(self, segment: int, chunks: Sequence[_Chunk]) -> None:
        """Restores what the chunks recorded, the newest first (so the oldest value wins)."""
        fd = self._segment_fds[segment]
        for chunk in reversed(chunks):
            data = pread(fd, chunk.nbytes, chunk.offset + _CHUNK.size)
            reader = _Reader(data)
            index = reader.take(np.int64, chunk.count)
            if chunk.kind == _ROWS:
                checks = reader.take(np.uint32, chunk.count)
                rows = reader.take(np.uint8, chunk.count * self.rows.shape[1])
                self.rows[index] = rows.reshape(chunk.count, self.rows.shape[1])
                self.checks[index] = checks
                continue
            logged = _PER_SAMPLE if chunk.kind == _SAMPLES else _PER_SLOT
            for field in logged:
                values = reader.take(_NUMPY[field.dtype], chunk.count)
                getattr(self.ring, field.name).numpy()[index] = values

    def _undo_current(self) -> None:
        header = self.header
        self._undo(header.cur_seg, self._chunks(header.cur_seg, header.cur_start, header.cur_end))
        self._open_record = False
        self._write_header(state=IDLE)

    def rollback(self, target: int) -> None:
        """Returns the memory to what it was at step ``target`` (``MemoryWrapper.rollback_to``).

        Raises:
            ValueError: ``target`` is after the memory's step, or before the oldest step the log
                can restore; nothing is changed.
        """
        header = self.header
        self._refuse_if_half_loaded()
        if header.state == WRITE:
            self._undo_current()
        if target == header.step:
            return
        if target > header.step:
            raise ValueError(
                f"cannot roll the memory in {str(self.folder)!r} forward to step {target}: its "
                f"last change was at step {header.step}. A checkpoint newer than the memory "
                "means the memory lost writes (a power loss) or belongs to another run"
            )
        if target < header.base_step:
            how = (
                f"its last mark_checkpoint() was at step {header.mark_step}"
                if header.marked
                else "without mark_checkpoint() it keeps only its last write"
            )
            raise ValueError(
                f"cannot roll the memory in {str(self.folder)!r} back to step {target}: it is at "
                f"step {header.step} and can return to steps {header.base_step} to "
                f"{header.step} only ({how}). Call memory.mark_checkpoint() after each "
                "checkpoint so that a resumed run can roll the memory back to it"
            )
        chunks = [c for c in self._chunks(header.seg, 0, header.log_end) if c.step > target]
        self._make_dirty()
        header.target = target
        self._write_header(state=ROLLBACK)
        self._undo(header.seg, chunks)
        if chunks:
            header.log_end = chunks[0].offset
        header.writes -= sum(chunk.kind == _SAMPLES for chunk in chunks)
        header.step = self.step = target
        if not header.marked:
            header.base_step = target
        self._write_header(state=IDLE)

    # ------------------------------------------------------------------ loads, marks, flushes

    def begin_load(self) -> None:
        """Records, durably, that the whole memory is being replaced."""
        if self.header.state == WRITE:
            self._undo_current()
        self._make_dirty()
        self._write_header(state=LOAD, sync=True)

    def end_load(self) -> None:
        """The load is complete: the memory is at :attr:`step`; the log starts afresh."""
        header = self.header
        header.step, header.writes = self.step, 0
        header.log_end, header.base_step = 0, self.step
        if header.marked:
            header.mark_step = self.step
        header.state = IDLE
        self.flush()

    def mark(self) -> int:
        """Flushes the folder; from now on every change is kept, so that :meth:`rollback` can
        return to this step. Returns the step."""
        header = self.header
        if header.state == WRITE:
            self._undo_current()
        header.marked, header.mark_step = 1, self.step
        header.step, header.base_step, header.log_end = self.step, self.step, 0
        self.flush()
        return self.step

    def flush(self) -> None:
        """Forces every file of the folder to the disk, then records that it is clean."""
        for path in self.files:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        for fd in self._segment_fds:
            os.fsync(fd)
        header = self.header
        header.dirty, header.flushed_step = 0, header.step
        self._write_header(sync=True)

    def _make_dirty(self) -> None:
        header = self.header
        if header.dirty and header.boot == self._boot:
            return
        header.dirty, header.boot = 1, self._boot
        self._write_header(sync=True)  # on the disk before any change it announces

    def _write_header(self, *, state: int | None = None, sync: bool = False) -> None:
        if state is not None:
            self.header.state = state
        _write_all(self._header_fd, self.header.pack(), 0)
        if sync:
            os.fsync(self._header_fd)

    def close(self) -> None:
        for fd in (self._header_fd, *self._segment_fds):
            try:
                os.close(fd)
            except OSError:
                pass
        self._segment_fds = []

    def __del__(self) -> None:
        if getattr(self, "_segment_fds", None):
            self.close()

    @property
    def writes(self) -> int:
        return self.header.writes


def _flush_at_exit(reference: weakref.ref[Journal]) -> None:
    journal = reference()
    if journal is None or not journal._segment_fds or not journal.header.dirty:
        return
    if journal.header.state != IDLE:
        return  # a write or load cut short by the exit: the next open deals with it
    try:
        journal.flush()
    except (OSError, ValueError):  # the folder may be gone: nothing to keep
        pass


_NUMPY = {
    torch.int32: np.int32,
    torch.int64: np.int64,
    torch.float32: np.float32,
    torch.uint8: np.uint8,
}


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def take(self, dtype: type, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize * count
        values: np.ndarray = np.frombuffer(self.data, dtype=dtype, count=count, offset=self.offset)
        self.offset += _pad(size)
        return values


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = pwrite(fd, view, offset)
        view, offset = view[written:], offset + written
