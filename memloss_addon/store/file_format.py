"""Saving a memory to one file and loading it back: atomic, streamed, checked, never unpickled.

A memory file holds a JSON header and the raw bytes of three tensors, nothing that can run code::

    offset 0         8 bytes  magic b"\\x93MEMLOSS"
    offset 8         8 bytes  header length H (unsigned, little-endian)
    offset 16        H bytes  header: UTF-8 JSON, padded with spaces to a multiple of 64 bytes
    offset 16 + H    P bytes  payload: "slots" and the bookkeeping tensors (``slot_count``,
                              ``ring_head``, ``last_weight``, ``fooled_at_write``; see
                              :data:`memloss_addon.store.slots.BOOKKEEPING`) in C order, each
                              at a 64-byte aligned offset from the payload start
    end - 8          8 bytes  trailer: the tag b"MLCK" and the CRC-32 (unsigned, little-endian)
                              of every byte before the trailer

The header records the file format version, the memory's state format version, the byte order,
the checksum algorithm, the memory's configuration (``num_samples``, ``sample_shape``, ``depth``,
``mode``, ``dtype``, ``eps`` and the loss settings), its counters, for one rank of a sharded
memory the rank and world size (a file then holds that rank's shard; see
:func:`memloss_addon.store.distributed.merge_shard_states` to combine them), and each tensor's
dtype, shape, offset and size. A file of memory state version 1 (before the per-slot
bookkeeping) still loads: its missing fields get their initial values.

Saving streams the slots to the file in chunks (a CUDA memory is copied to the host one chunk at a
time), so no second full copy is held in RAM. The file is written next to its target and moved
over it with ``os.replace`` only once complete and on disk: a crash at any moment leaves either
the previous file or the new one. A process killed mid-write can leave a hidden
``.<name>.<random>.tmp`` file in the folder; it is never read and may be deleted.

Loading reads the header with ``json``, checks the size against it, verifies the checksum over the
whole file, then maps the payload with ``numpy.memmap`` (the slots are not read into a second
buffer) and hands it to :meth:`MemoryWrapper.load_state_dict`, which checks the configuration,
shapes, ranges and finiteness before copying anything. No step unpickles: a ``torch.save`` or
pickle file is refused by its first bytes. The checksum detects accidental damage (a flipped byte,
a truncated copy); it is not a signature against deliberate forgery, and a forged file can still
only hold numbers, which are checked like any loaded state.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import math
import os
import struct
import sys
import zlib
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import torch

from .codecs import STORAGE_DTYPES
from .files import PathLike, atomic_write
from .local import READABLE_FORMAT_VERSIONS
from .slots import BOOKKEEPING

__all__ = [
    "FILE_FORMAT",
    "FILE_FORMAT_VERSION",
    "MemoryFileError",
    "mapped_memory_file",
    "read_header",
    "write_memory_file",
]

FILE_FORMAT = "memloss-addon memory"
FILE_FORMAT_VERSION = 1

_MAGIC = b"\x93MEMLOSS"
_TRAILER_TAG = b"MLCK"
_PREFIX = struct.Struct("<8sQ")  # magic, header length
_TRAILER = struct.Struct("<4sI")  # tag, CRC-32
_ALIGN = 64
_CHUNK_BYTES = 16 * 2**20  # streaming granularity: bounds the extra RAM of saving and checking
_MAX_HEADER_BYTES = 16 * 2**20  # a real header is a few hundred bytes; refuse absurd lengths
_TENSORS = ("slots", *(field.name for field in BOOKKEEPING))


def _tensors_of_version(version: int) -> tuple[str, ...]:
    """The tensors a file of memory state ``version`` holds."""
    since = {field.name: field.since_version for field in BOOKKEEPING}
    return tuple(name for name in _TENSORS if since.get(name, 1) <= version)


_DTYPES: dict[str, torch.dtype] = {name: dtype for name, dtype in STORAGE_DTYPES.items()}
_DTYPES.update({str(field.dtype).removeprefix("torch."): field.dtype for field in BOOKKEEPING})
_DTYPE_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


class MemoryFileError(ValueError):
    """A file is not a memory file this version can load: other format, damaged or inconsistent."""


# ---------------------------------------------------------------------------------------- writing


def write_memory_file(state: dict[str, Any], path: PathLike) -> None:
    """Writes a memory's state dict to ``path`` atomically, streaming the slots.

    See the module docstring for the layout. Use :meth:`MemoryWrapper.save`, which calls this.

    Args:
        state: a :meth:`MemoryWrapper.state_dict`; it is not changed.
        path: the file to create or replace; its folder must exist.

    Raises:
        ValueError: the state holds entries a memory file has no place for.

    Example:
        >>> import pathlib, tempfile
        >>> from memloss_addon import MemoryWrapper
        >>> memory = MemoryWrapper(torch.nn.Linear(2, 2), num_samples=4, sample_shape=(2,))
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "memory.bin"
        >>> write_memory_file(memory.state_dict(), path)
        >>> read_header(path)["config"]["num_samples"]
        4
    """
    unknown = set(state) - {*_TENSORS, "format_version", "config", "counters", "shard"}
    if unknown:  # never drop part of a state silently
        raise ValueError(f"cannot save memory state entries {sorted(unknown)} to a memory file")
    tensors = {name: state[name] for name in _tensors_of_version(state["format_version"])}
    layout: dict[str, dict[str, Any]] = {}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        layout[name] = {
            "dtype": _DTYPE_NAMES[tensor.dtype],
            "shape": list(tensor.shape),
            "offset": offset,
            "nbytes": nbytes,
        }
        offset = _aligned(offset + nbytes)
    header = {
        "format": FILE_FORMAT,
        "file_version": FILE_FORMAT_VERSION,
        "state_version": state["format_version"],
        "byte_order": sys.byteorder,
        "checksum": "crc32",
        "config": state["config"],
        "counters": state["counters"],
        "shard": state.get("shard"),  # rank and world size of one rank's part of a sharded memory
        "tensors": layout,
        "payload_nbytes": offset,
    }
    encoded = json.dumps(header, sort_keys=True).encode()
    # Pad so that the payload starts 64-byte aligned in the file (and in a memory map of it).
    encoded += b" " * (_aligned(_PREFIX.size + len(encoded)) - _PREFIX.size - len(encoded))
    with atomic_write(path) as file:
        checksum = 0
        for piece in (_PREFIX.pack(_MAGIC, len(encoded)), encoded):
            file.write(piece)
            checksum = zlib.crc32(piece, checksum)
        written = 0
        for name, tensor in tensors.items():
            padding = bytes(layout[name]["offset"] - written)
            file.write(padding)
            checksum = zlib.crc32(padding, checksum)
            for chunk in _byte_chunks(tensor):
                file.write(chunk)
                checksum = zlib.crc32(chunk, checksum)
            written = layout[name]["offset"] + layout[name]["nbytes"]
        padding = bytes(offset - written)
        file.write(padding)
        checksum = zlib.crc32(padding, checksum)
        file.write(_TRAILER.pack(_TRAILER_TAG, checksum))


def _aligned(offset: int) -> int:
    return -(-offset // _ALIGN) * _ALIGN


def _byte_chunks(tensor: torch.Tensor) -> Iterator[memoryview]:
    """The tensor's bytes in C order, at most ``_CHUNK_BYTES`` at a time, without a full copy."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():  # never the case for the memory's own tensors
        flat = flat.contiguous()
    step = max(1, _CHUNK_BYTES // flat.element_size())
    for start in range(0, flat.numel(), step):
        piece = flat[start : start + step]
        if piece.device.type != "cpu":
            piece = piece.cpu()  # one chunk at a time, never the whole memory
        yield piece.view(torch.uint8).numpy().data


# ---------------------------------------------------------------------------------------- reading


def read_header(path: PathLike) -> dict[str, Any]:
    """The header of a memory file: its configuration, counters and tensor layout.

    Checks the magic bytes, the header and the file size, but not the checksum (which needs the
    whole file): use it to build a matching :class:`MemoryWrapper` before loading.

    Raises:
        MemoryFileError: not a memory file, an unreadable header, or a truncated file.
        OSError: the file cannot be opened.

    Example:
        >>> import pathlib, tempfile
        >>> from memloss_addon import MemoryWrapper
        >>> memory = MemoryWrapper(torch.nn.Linear(3, 2), num_samples=5, sample_shape=(3,))
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "memory.bin"
        >>> memory.save(path)
        >>> header = read_header(path)
        >>> header["config"]["sample_shape"], header["config"]["dtype"], header["file_version"]
        ([3], 'float32', 1)
    """
    with open(path, "rb") as file:
        header, _ = _read_checked_header(file, os.fspath(path))
    return header


@contextlib.contextmanager
def mapped_memory_file(path: PathLike) -> Iterator[dict[str, Any]]:
    """Checks a memory file whole, then yields its state dict, mapped rather than read.

    The tensors are views of a private (copy-on-write) map of the file, valid inside the block
    only; the map is released on exit. Use :meth:`MemoryWrapper.load`, which calls this and
    checks the state against the memory before copying anything.

    Raises:
        MemoryFileError: another format (a ``torch.save`` or pickle file included), a damaged or
            truncated file, or a newer format version.
        OSError: the file cannot be opened.

    Example:
        >>> import pathlib, tempfile
        >>> from memloss_addon import MemoryWrapper
        >>> memory = MemoryWrapper(torch.nn.Linear(2, 2), num_samples=3, sample_shape=(2,))
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "memory.bin"
        >>> memory.save(path)
        >>> with mapped_memory_file(path) as state:
        ...     tuple(state["slots"].shape)
        (3, 1, 2)
    """
    name = os.fspath(path)
    with open(path, "rb") as file:
        header, payload_start = _read_checked_header(file, name)
        _verify_checksum(file, name)
        state = _mapped_state(file, header, payload_start)
    try:
        yield state
    finally:
        state.clear()  # unmap the file now, not when a traceback holding this frame is freed


def _mapped_state(file: IO[bytes], header: dict[str, Any], payload_start: int) -> dict[str, Any]:
    """A state dict whose tensors are read-only-in-effect views of a private map of the file."""
    # mode "c" (copy-on-write) gives writable arrays, so torch does not warn, and writes would
    # never reach the file; nothing here writes to them.
    payload = np.memmap(
        file, dtype=np.uint8, mode="c", offset=payload_start, shape=(header["payload_nbytes"],)
    )
    state: dict[str, Any] = {
        "format_version": header["state_version"],
        "config": header["config"],
        "counters": header["counters"],
    }
    if header["shard"] is not None:
        state["shard"] = header["shard"]
    for tensor_name, entry in header["tensors"].items():
        raw = torch.from_numpy(payload[entry["offset"] : entry["offset"] + entry["nbytes"]])
        state[tensor_name] = raw.view(_DTYPES[entry["dtype"]]).view(entry["shape"])
    return state


def _read_checked_header(file: IO[bytes], name: str) -> tuple[dict[str, Any], int]:
    """Reads and validates the header; returns it and the payload's offset in the file."""
    size = os.fstat(file.fileno()).st_size
    prefix = file.read(_PREFIX.size)
    if len(prefix) < _PREFIX.size or not prefix.startswith(_MAGIC):
        raise MemoryFileError(f"{name} is not a memloss-addon memory file: {_describe(prefix)}")
    _, header_length = _PREFIX.unpack(prefix)
    if header_length > min(_MAX_HEADER_BYTES, size - _PREFIX.size):
        raise MemoryFileError(
            f"{name} is damaged or truncated: its header length {header_length} does not fit in "
            f"a file of {size} bytes"
        )
    try:
        header = json.loads(file.read(header_length).decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise MemoryFileError(f"{name} is damaged: its header is not readable JSON") from error
    _check_header(header, name)
    payload_start = _PREFIX.size + header_length
    expected = payload_start + header["payload_nbytes"] + _TRAILER.size
    if size < expected:
        raise MemoryFileError(
            f"{name} is truncated: it has {size} bytes, its header describes {expected}"
        )
    if size > expected:
        raise MemoryFileError(
            f"{name} is damaged: it has {size} bytes, its header describes only {expected}"
        )
    return header, payload_start


def _describe(prefix: bytes) -> str:
    if not prefix:
        return "the file is empty"
    if prefix.startswith(b"PK\x03\x04"):
        return (
            "it is a zip archive, as torch.save writes (load those with "
            "torch.load(path, weights_only=True) and MemoryWrapper.load_state_dict)"
        )
    if prefix[:1] == b"\x80":
        return "it is a pickle, which is never loaded because unpickling can run code"
    if _MAGIC.startswith(prefix):
        return "the file is truncated inside its first bytes"
    return f"it starts with {prefix[:8]!r}, not {_MAGIC!r}"


def _check_header(header: object, name: str) -> None:
    """Strict type and consistency checks of a parsed header; nothing in it is trusted."""

    def fail(reason: str) -> MemoryFileError:
        return MemoryFileError(f"{name} has an invalid header: {reason}")

    if not isinstance(header, dict):
        raise fail("not a JSON object")
    if header.get("format") != FILE_FORMAT:
        raise fail(f"format is {header.get('format')!r}, expected {FILE_FORMAT!r}")
    version = header.get("file_version")
    if version != FILE_FORMAT_VERSION:
        raise MemoryFileError(
            f"{name} has file format version {version!r}; this version of memloss-addon reads "
            f"version {FILE_FORMAT_VERSION}"
        )
    state_version = header.get("state_version")
    if state_version not in READABLE_FORMAT_VERSIONS:
        raise MemoryFileError(
            f"{name} holds memory state version {state_version!r}; this version of "
            f"memloss-addon reads versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}"
        )
    if header.get("byte_order") != sys.byteorder:
        raise fail(f"byte order {header.get('byte_order')!r}, this machine is {sys.byteorder!r}")
    if header.get("checksum") != "crc32":
        raise fail(f"unknown checksum {header.get('checksum')!r}")
    for key in ("config", "counters", "tensors"):
        if not isinstance(header.get(key), dict):
            raise fail(f"{key!r} is not an object")
    shard = header.get("shard", False)
    if shard is not None and not (
        isinstance(shard, dict)
        and sorted(shard) == ["rank", "world_size"]
        and _is_count(shard["rank"])
        and _is_count(shard["world_size"])
        and shard["rank"] < shard["world_size"]
    ):
        raise fail(f"shard is {shard!r}")
    payload = header.get("payload_nbytes")
    if not _is_count(payload) or payload == 0:
        raise fail(f"payload_nbytes is {payload!r}")
    tensors = header["tensors"]
    expected = sorted(_tensors_of_version(state_version))
    if sorted(tensors) != expected:
        raise fail(f"tensors are {sorted(tensors)}, expected {expected}")
    for tensor_name, entry in tensors.items():
        if not isinstance(entry, dict):
            raise fail(f"tensor {tensor_name!r} is not described by an object")
        dtype, shape = entry.get("dtype"), entry.get("shape")
        offset, nbytes = entry.get("offset"), entry.get("nbytes")
        if dtype not in _DTYPES:
            raise fail(f"tensor {tensor_name!r} has dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
            raise fail(f"tensor {tensor_name!r} has shape {shape!r}")
        if not isinstance(offset, int) or not _is_count(offset) or offset % _ALIGN:
            raise fail(f"tensor {tensor_name!r} has offset {offset!r} and size {nbytes!r}")
        if not _is_count(nbytes):
            raise fail(f"tensor {tensor_name!r} has offset {offset!r} and size {nbytes!r}")
        if nbytes != math.prod(shape) * _DTYPES[dtype].itemsize:
            raise fail(f"tensor {tensor_name!r} has {nbytes} bytes for shape {shape} of {dtype}")
        if offset + nbytes > payload:
            raise fail(f"tensor {tensor_name!r} ends at {offset + nbytes}, after the payload")
    spans = sorted(
        (entry["offset"], entry["offset"] + entry["nbytes"]) for entry in tensors.values()
    )
    if any(end > next_start for (_, end), (next_start, _) in itertools.pairwise(spans)):
        raise fail("tensors overlap")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _verify_checksum(file: io.BufferedReader, name: str) -> None:
    """Streams the CRC-32 of everything before the trailer and compares it with the trailer."""
    size = os.fstat(file.fileno()).st_size
    covered = size - _TRAILER.size
    file.seek(covered)
    tag, recorded = _TRAILER.unpack(file.read(_TRAILER.size))
    if tag != _TRAILER_TAG:
        raise MemoryFileError(f"{name} is damaged: its trailer is missing or overwritten")
    file.seek(0)
    checksum = 0
    buffer = bytearray(min(_CHUNK_BYTES, max(covered, 1)))
    view = memoryview(buffer)
    remaining = covered
    while remaining:
        count = file.readinto(view[: min(remaining, len(buffer))])
        if not count:
            raise MemoryFileError(f"{name} became shorter while being read")
        checksum = zlib.crc32(view[:count], checksum)
        remaining -= count
    if checksum != recorded:
        raise MemoryFileError(
            f"{name} is damaged: its CRC-32 is {checksum:08x}, the file records {recorded:08x}"
        )
