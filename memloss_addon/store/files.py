"""Writing files so that a crash never leaves a torn one: the one atomic writer of the package.

Every file the package writes whole (memory files, a disk-backed memory's metadata, checkpoints,
patched sources) goes through :func:`atomic_write`; :func:`fsync_path` forces a file (or a
folder's entries) to the disk.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import IO

__all__ = ["PathLike", "atomic_write", "fsync_path"]

PathLike = str | os.PathLike[str]


@contextlib.contextmanager
def atomic_write(path: PathLike) -> Iterator[IO[bytes]]:
    """Opens a binary file whose content replaces ``path`` only once completely written.

    The data goes to a temporary file in the same folder (so the final rename never copies across
    file systems), which is flushed and fsynced, then moved over ``path`` with ``os.replace``; the
    folder is fsynced so that the rename itself survives a power loss. If the block raises
    anything (``KeyboardInterrupt`` included) the temporary file is removed and ``path`` is left
    as it was. A new file gets the permissions ``open()`` would give it; a replaced file keeps
    its own. A symbolic link at ``path`` is followed: the file it points to is replaced.

    Use it for checkpoints too: ``torch.save`` writes in place and a kill mid-write leaves a torn
    file.

    Args:
        path: the file to create or replace. Its folder must exist.

    Example:
        >>> import pathlib, tempfile, torch
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "checkpoint.pt"
        >>> with atomic_write(target) as file:
        ...     torch.save({"step": 3}, file)
        >>> torch.load(target, weights_only=True)
        {'step': 3}
    """
    target = os.path.realpath(os.fspath(path))
    folder, name = os.path.split(target)
    mode = _mode_for(target)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_path(folder)


def _mode_for(target: str) -> int:
    """Permission bits for the new file: those of the file it replaces, else ``0o666 & ~umask``."""
    with contextlib.suppress(OSError):
        return os.stat(target).st_mode & 0o7777
    return 0o666 & ~_umask()


def _umask() -> int:
    # Reading the umask with os.umask() briefly changes it for every thread; /proc does not.
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def fsync_path(path: PathLike) -> None:
    """Forces a file's data, or a folder's entries (a rename, a new file), to the disk.

    Folders cannot be opened for fsync outside POSIX; there this is a no-op for a folder.

    Example:
        >>> import tempfile
        >>> fsync_path(tempfile.gettempdir())
    """
    if os.name != "posix" and os.path.isdir(path):
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
