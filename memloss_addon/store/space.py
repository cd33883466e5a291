"""Disk space for a disk-backed memory: files allocated in full, or a clear ``OSError``.

A memory-mapped file that is sparse (created with ``ftruncate``) gets its disk blocks only when a
page is first written through the mapping. If the file system is full by then, the kernel cannot
report an error to a store instruction and sends ``SIGBUS``: the process dies without a Python
exception, hours into a run. Every file of a storage folder is therefore allocated in full when
the memory is created, with ``os.posix_fallocate`` where it exists, else by writing zeros, so
that a disk that cannot hold the memory is an ``OSError`` from the constructor, and writes
through the mapping later never need a new block.

Limits: on a copy-on-write file system (btrfs, ZFS, bcachefs) an overwrite needs new blocks
whatever was allocated before, so a full disk can still stop the process with ``SIGBUS`` there;
:func:`copy_on_write_filesystem` names such a file system so that the creator can warn. The same
holds for storage that is thin-provisioned or compresses zeros away below the file system.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "allocate",
    "boot_id",
    "copy_on_write_filesystem",
    "free_bytes",
    "pread",
    "pwrite",
    "space_error",
]

_ZEROS = bytes(4 * 2**20)  # the written-out fallback writes this many zero bytes at a time
_NO_FALLOCATE = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, getattr(errno, "ENOTSUP", -1)}
_COPY_ON_WRITE = {"btrfs", "zfs", "bcachefs"}


def allocate(descriptor: int, size: int, *, start: int = 0) -> None:
    """Gives the open file ``descriptor`` real disk blocks for bytes ``[start, size)``.

    Extends the file to ``size`` bytes if it is shorter. Uses ``os.posix_fallocate`` where the
    platform and file system have it, else writes zeros (which a file system allocates as it
    writes them).

    Raises:
        OSError: the file system is full (``ENOSPC``), the file would exceed the process's file
            size limit (``EFBIG``, ``RLIMIT_FSIZE``), or another I/O error.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryFile() as file:
        ...     allocate(file.fileno(), 10_000)
        ...     os.fstat(file.fileno()).st_size
        10000
    """
    if size <= start:
        return
    fallocate = getattr(os, "posix_fallocate", None)
    if fallocate is not None:
        try:
            fallocate(descriptor, start, size - start)
            return
        except OSError as error:
            if error.errno not in _NO_FALLOCATE:
                raise
    # Written out: zeros over the whole range (a sparse range gets its blocks this way).
    offset = start
    while offset < size:
        count = pwrite(descriptor, memoryview(_ZEROS)[: min(len(_ZEROS), size - offset)], offset)
        offset += count


def pwrite(descriptor: int, data: bytes | memoryview, offset: int) -> int:
    """``os.pwrite``, or a seek and a write where the platform lacks it (Windows)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(descriptor, data, offset)
    os.lseek(descriptor, offset, os.SEEK_SET)
    return os.write(descriptor, data)


def pread(descriptor: int, count: int, offset: int) -> bytes:
    """``os.pread``, or a seek and a read where the platform lacks it (Windows)."""
    if hasattr(os, "pread"):
        return os.pread(descriptor, count, offset)
    os.lseek(descriptor, offset, os.SEEK_SET)
    return os.read(descriptor, count)


def free_bytes(folder: str | os.PathLike[str]) -> int | None:
    """Bytes an unprivileged process may still allocate on ``folder``'s file system, if known.

    Example:
        >>> free_bytes("/") is None or free_bytes("/") >= 0
        True
    """
    try:
        stats = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs outside POSIX
        return None
    return stats.f_bavail * stats.f_frsize


def space_error(
    folder: str | os.PathLike[str],
    sizes: Mapping[str, int],
    cause: OSError | None = None,
    *,
    what: str = "the memory",
) -> OSError:
    """The ``OSError`` for a folder that cannot hold ``sizes`` bytes: folder, need, free, limit.

    Example:
        >>> error = space_error("/scratch/memory", {"rows.bin": 2_000_000})
        >>> error.errno == errno.ENOSPC, "2,000,000 bytes" in str(error)
        (True, True)
    """
    needed = sum(sizes.values())
    free = free_bytes(folder) if Path(folder).exists() else free_bytes(Path(folder).parent)
    free_text = "an unknown number of bytes" if free is None else f"{free:,} bytes"
    parts = ", ".join(f"{name} {size:,}" for name, size in sizes.items())
    limit = _file_size_limit()
    limit_text = (
        f"; this process may not write files larger than {limit:,} bytes (RLIMIT_FSIZE, "
        "`ulimit -f`)"
        if limit is not None and (cause is None or cause.errno == errno.EFBIG)
        else ""
    )
    reason = f" ({cause.strerror})" if cause is not None and cause.strerror else ""
    code = cause.errno if cause is not None and cause.errno else errno.ENOSPC
    return OSError(
        code,
        f"storage_path {os.fspath(folder)!r} cannot hold {what}: it needs {needed:,} bytes "
        f"({parts}) and its file system has {free_text} free{limit_text}{reason}. Free some "
        "space, choose another folder, or make the memory smaller (dtype=torch.uint8, a smaller "
        "depth)",
    )


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def copy_on_write_filesystem(
    folder: str | os.PathLike[str], *, mountinfo: str = "/proc/self/mountinfo"
) -> str | None:
    """The type of ``folder``'s file system if it is copy-on-write (btrfs, ZFS, bcachefs).

    Reads the mount table ``mountinfo`` (Linux); where there is none, returns ``None``.

    Example:
        >>> copy_on_write_filesystem("/proc") is None
        True
    """
    path = os.path.realpath(os.fspath(folder))
    best, kind = "", None
    try:
        with open(mountinfo) as mounts:
            for line in mounts:
                fields = line.split()
                if " - " not in line or len(fields) < 5:
                    continue
                point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4])
                fs_type = line.split(" - ", 1)[1].split()[0]
                inside = path == point or path.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, kind = point, fs_type
    except OSError:
        return None
    return kind if kind in _COPY_ON_WRITE else None


def boot_id() -> str:
    """An id of the running boot of this machine ('' where unknown): a page cache outlives a
    killed process, never a reboot.

    Example:
        >>> boot_id() == boot_id()
        True
    """
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
