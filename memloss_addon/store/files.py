"""Writing files so that a crash never leaves a torn one: the one atomic writer of the package.

Every file the package writes whole (memory files, a disk-backed memory's metadata, checkpoints,
patched sources) goes through :func:`atomic_write`; :func:`fsync_path` forces a file (or a
folder's entries) to the disk.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from typing import IO

try:
    import fcntl
except ImportError:  # not POSIX: stale temporary files are left alone
    fcntl = None  # type: ignore[assignment]

__all__ = ["PathLike", "atomic_write", "fsync_path", "remove_stale_temporaries"]

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

    A writer that is killed leaves its hidden temporary file ``.<name>.<random>.tmp`` behind; the
    next ``atomic_write`` to the same path removes such leftovers first (see
    :func:`remove_stale_temporaries`). Each writer holds an exclusive ``flock`` on its temporary
    file while it writes, so a live writer's file, even another process's, is never removed.

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
    remove_stale_temporaries(target)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        if fcntl is not None:
            # Held until the file is renamed (or this process dies): a later writer's cleanup
            # never removes it.
            fcntl.flock(handle, fcntl.LOCK_EX)
        with os.fdopen(handle, "wb") as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
            if fcntl is not None:
                os.chmod(temporary, mode)
                os.replace(temporary, target)
        if fcntl is None:  # Windows cannot rename an open file
            os.chmod(temporary, mode)
            os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    fsync_path(folder)


def remove_stale_temporaries(path: PathLike) -> list[str]:
    """Removes the temporary files that killed :func:`atomic_write` calls to ``path`` left behind.

    A candidate is a file named ``.<name>.<8 random characters>.tmp`` next to ``path``. It is
    removed only if no process holds its lock: a live writer locks its file for as long as it
    writes, and the kernel drops the locks of a process that dies. (A writer that another
    process's cleanup catches in the microseconds between creating and locking its file loses
    the file and raises ``FileNotFoundError``; ``path`` is then left as it was.) Without
    ``fcntl`` (not POSIX) nothing is removed. Errors are ignored: this is housekeeping.

    Returns:
        The paths removed.

    Example:
        >>> import pathlib, tempfile
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> leftover = folder / ".memory.bin.k3j9x_2a.tmp"
        >>> _ = leftover.write_bytes(b"half a file")  # by a save that was killed
        >>> [pathlib.Path(p).name for p in remove_stale_temporaries(folder / "memory.bin")]
        ['.memory.bin.k3j9x_2a.tmp']
    """
    if fcntl is None:
        return []
    folder, name = os.path.split(os.path.realpath(os.fspath(path)))
    pattern = re.compile(rf"\.{re.escape(name)}\.[a-z0-9_]{{8}}\.tmp")
    removed = []
    try:
        entries = os.listdir(folder or ".")
    except OSError:
        return []
    for entry in entries:
        if not pattern.fullmatch(entry):
            continue
        candidate = os.path.join(folder, entry)
        with contextlib.suppress(OSError):
            descriptor = os.open(candidate, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                info = os.fstat(descriptor)
                try:
                    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live writer holds it
                # Still the file we locked (not replaced by a new writer's in the meantime).
                if os.stat(candidate, follow_symlinks=False).st_ino == info.st_ino:
                    os.unlink(candidate)
                    removed.append(candidate)
            finally:
                os.close(descriptor)
    return removed


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
