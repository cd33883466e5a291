"""Apply and revert the integration patches: ``memloss patch <name> PATH [--revert]``.

A patch (see :mod:`memloss_addon.integrations.specs`) is a list of anchored edits plus new files of
ours. Applying it:

1. checks that PATH has the files that identify the repository and that every anchor occurs
   exactly as often as expected, and refuses, changing nothing, when one does not;
2. writes ``.memloss-patch.json`` (the patch name, the original bytes of each edited file and
   hashes of the results), then the edited files and the new files.

Applying again is a no-op. ``--revert`` restores the original bytes exactly and deletes the new
files, after checking that none of them was changed since; otherwise it refuses, changing nothing.

Also runs as ``python -m memloss_addon.experiments.patching <name> PATH [--revert]``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..integrations.specs import PATCHES, Edit, RepoPatch
from ..store.files import atomic_write

__all__ = [
    "STATE_FILE",
    "PatchError",
    "PatchResult",
    "add_patch_subcommand",
    "apply_patch",
    "edit_text",
    "main",
    "revert_patch",
]

STATE_FILE = ".memloss-patch.json"
_STATE_FORMAT = 1

Outcome = Literal["applied", "already-applied", "reverted", "not-applied"]


class PatchError(Exception):
    """The patch tool refused; the target directory was left unchanged."""


@dataclass(frozen=True)
class PatchResult:
    """What :func:`apply_patch` or :func:`revert_patch` did.

    Args:
        outcome: ``"applied"``, ``"already-applied"``, ``"reverted"`` or ``"not-applied"``.
        files: the files written or removed, relative to the target directory.
        message: one line for people.
    """

    outcome: Outcome
    files: tuple[str, ...]
    message: str


# ---------------------------------------------------------------------- pure text editing


def edit_text(text: str, edits: Sequence[Edit], *, path: str = "<text>") -> str:
    """Applies anchored edits to ``text`` and returns the result.

    Anchors are compared line by line, ignoring only the line endings. New lines take the line
    ending of their anchor.

    Args:
        text: the file's content.
        edits: edits of this file, applied in order.
        path: the file's name, for messages.

    Returns:
        The edited text.

    Raises:
        PatchError: an anchor occurs a different number of times than the edit expects.

    Example:
        >>> edit = Edit("a.py", ("b = 2",), "insert_after", ("c = 3",))
        >>> edit_text("a = 1\\nb = 2\\n", [edit])
        'a = 1\\nb = 2\\nc = 3\\n'
    """
    lines = text.splitlines(keepends=True)
    for edit in edits:
        starts = _find(lines, edit.anchor)
        if len(starts) != edit.count:
            raise PatchError(
                f"{path}: expected {edit.count} occurrence(s) of the anchor "
                f"{_show(edit.anchor)}, found {len(starts)}"
            )
        for start in reversed(starts):  # back to front, so earlier positions stay valid
            lines = _apply_one(lines, start, edit)
    return "".join(lines)


def _find(lines: list[str], anchor: tuple[str, ...]) -> list[int]:
    width = len(anchor)
    return [
        start
        for start in range(len(lines) - width + 1)
        if all(_strip_eol(lines[start + k]) == anchor[k] for k in range(width))
    ]


def _apply_one(lines: list[str], start: int, edit: Edit) -> list[str]:
    end = start + len(edit.anchor)
    ending = _eol(lines[start]) or _first_eol(lines)
    new = [line + ending for line in edit.lines]
    if edit.action == "insert_before":
        return lines[:start] + new + lines[start:]
    if edit.action == "replace":
        if not _eol(lines[end - 1]) and new:  # the file's last line had no line ending
            new[-1] = _strip_eol(new[-1])
        return lines[:start] + new + lines[end:]
    anchor_lines = lines[start:end]
    if not _eol(anchor_lines[-1]):
        anchor_lines[-1] += ending
    return lines[:start] + anchor_lines + new + lines[end:]


def _strip_eol(line: str) -> str:
    return line.rstrip("\r\n")


def _eol(line: str) -> str:
    return line[len(_strip_eol(line)) :]


def _first_eol(lines: list[str]) -> str:
    return next((_eol(line) for line in lines if _eol(line)), "\n")


def _show(anchor: tuple[str, ...]) -> str:
    return " / ".join(repr(line.strip()) for line in anchor)


# ---------------------------------------------------------------------- apply and revert


def apply_patch(patch: RepoPatch | str, root: str | os.PathLike[str]) -> PatchResult:
    """Applies ``patch`` to the checkout at ``root``.

    Args:
        patch: a :class:`RepoPatch` or the name of one in ``PATCHES``.
        root: the repository's top directory.

    Returns:
        ``"applied"``, or ``"already-applied"`` when ``root`` already carries this patch.

    Raises:
        PatchError: ``root`` is not that repository at a compatible state (nothing is changed).

    Example:
        >>> import tempfile, pathlib
        >>> from memloss_addon.integrations.specs import RepoPatch
        >>> demo = RepoPatch("demo", "me/demo", "0" * 40, ("a.py",),
        ...                  (Edit("a.py", ("x = 1",), "insert_after", ("y = 2",)),))
        >>> root = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (root / "a.py").write_text("x = 1\\n")
        >>> apply_patch(demo, root).outcome, (root / "a.py").read_text()
        ('applied', 'x = 1\\ny = 2\\n')
        >>> apply_patch(demo, root).outcome
        'already-applied'
        >>> revert_patch(demo, root).outcome, (root / "a.py").read_text()
        ('reverted', 'x = 1\\n')
    """
    patch = _resolve(patch)
    root = Path(root)
    _check_directory(patch, root)
    state = _read_state(root)
    if state is not None:
        if state.get("patch") != patch.name:
            raise PatchError(
                f"{root} already carries the {state.get('patch')!r} patch; revert it first "
                f"with `memloss patch {state.get('patch')} {root} --revert`"
            )
        changed = _changed_since_patching(root, state)
        note = f" (changed since: {', '.join(changed)})" if changed else ""
        return PatchResult("already-applied", (), f"{patch.name}: already applied to {root}{note}")
    _check_identity(patch, root)
    for new_file in patch.new_files:
        if (root / new_file).exists():
            raise PatchError(
                f"{root / new_file} already exists but {root / STATE_FILE} does not; remove it "
                "(or restore the checkout) before patching. Nothing was changed."
            )

    originals = {name: (root / name).read_bytes() for name in patch.edited_files}
    patched: dict[str, bytes] = {}
    problems: list[str] = []
    for name, data in originals.items():
        try:
            text = data.decode("utf-8")
            edits = [edit for edit in patch.edits if edit.path == name]
            patched[name] = edit_text(text, edits, path=name).encode("utf-8")
        except UnicodeDecodeError:
            problems.append(f"{name}: not UTF-8 text")
        except PatchError as error:
            problems.append(str(error))
    if problems:
        raise PatchError(_incompatible(patch, root, problems))

    new_files = {name: text.encode("utf-8") for name, text in patch.new_files.items()}
    state = {
        "format": _STATE_FORMAT,
        "patch": patch.name,
        "repository": patch.repository,
        "commit": patch.commit,
        "files": {
            name: {
                "original": base64.b64encode(originals[name]).decode("ascii"),
                "patched_sha256": _sha256(patched[name]),
            }
            for name in patched
        },
        "new_files": {name: _sha256(data) for name, data in new_files.items()},
    }
    # The state goes first: whatever happens next, it holds the original bytes.
    _write_atomic(root / STATE_FILE, json.dumps(state, indent=1).encode("utf-8"))
    for name, data in patched.items():
        _write_atomic(root / name, data)
    for name, data in new_files.items():
        _write_atomic(root / name, data)
    written = (*patched, *new_files)
    return PatchResult(
        "applied",
        written,
        f"{patch.name}: patched {len(patched)} files ({patch.changed_lines} lines changed) and "
        f"added {', '.join(new_files) or 'no files'} in {root}",
    )


def revert_patch(patch: RepoPatch | str, root: str | os.PathLike[str]) -> PatchResult:
    """Restores the files ``apply_patch`` changed to their exact original bytes.

    Args:
        patch: a :class:`RepoPatch` or the name of one in ``PATCHES``.
        root: the repository's top directory.

    Returns:
        ``"reverted"``, or ``"not-applied"`` when ``root`` does not carry the patch.

    Raises:
        PatchError: ``root`` carries another patch, or a patched file was changed since
            (nothing is changed).

    Example:
        >>> import tempfile
        >>> revert_patch("trades", tempfile.mkdtemp()).outcome  # never patched: nothing to do
        'not-applied'
    """
    patch = _resolve(patch)
    root = Path(root)
    _check_directory(patch, root)
    state = _read_state(root)
    if state is None:
        leftovers = [name for name in patch.new_files if (root / name).exists()]
        if leftovers:
            raise PatchError(
                f"{root} has {', '.join(leftovers)} but no {STATE_FILE}, so the original files "
                "are unknown; restore them with your version control. Nothing was changed."
            )
        return PatchResult("not-applied", (), f"{patch.name}: not applied to {root}; nothing to do")
    if state.get("patch") != patch.name:
        raise PatchError(
            f"{root} carries the {state.get('patch')!r} patch, not {patch.name!r}. "
            "Nothing was changed."
        )
    changed = _changed_since_patching(root, state)
    if changed:
        raise PatchError(
            f"these files changed after patching: {', '.join(changed)}. Undo those changes (or "
            "restore the checkout with your version control) and revert again. "
            "Nothing was changed."
        )
    for name, entry in state["files"].items():
        _write_atomic(root / name, base64.b64decode(entry["original"]))
    for name in state["new_files"]:
        (root / name).unlink()
    (root / STATE_FILE).unlink()
    restored = (*state["files"], *state["new_files"])
    return PatchResult("reverted", restored, f"{patch.name}: reverted {root}")


def _resolve(patch: RepoPatch | str) -> RepoPatch:
    if isinstance(patch, RepoPatch):
        return patch
    if patch not in PATCHES:
        raise PatchError(f"unknown patch {patch!r}; choose one of {', '.join(sorted(PATCHES))}")
    return PATCHES[patch]


def _check_directory(patch: RepoPatch, root: Path) -> None:
    if not root.is_dir():
        raise PatchError(f"{root} is not a directory (expected a checkout of {patch.repository})")


def _check_identity(patch: RepoPatch, root: Path) -> None:
    missing = [name for name in patch.required_files if not (root / name).is_file()]
    if missing:
        raise PatchError(_incompatible(patch, root, [f"missing {', '.join(missing)}"]))


def _incompatible(patch: RepoPatch, root: Path, problems: list[str]) -> str:
    details = "\n  ".join(problems)
    return (
        f"{root} is not a checkout of {patch.repository} at a compatible state (the patch was "
        f"made for commit {patch.commit[:12]}):\n  {details}\nNothing was changed."
    )


def _read_state(root: Path) -> dict | None:
    path = root / STATE_FILE
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PatchError(f"{path} is unreadable ({error}); nothing was changed") from error
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
        raise PatchError(f"{path} is not a state file this version understands")
    return state


def _changed_since_patching(root: Path, state: dict) -> list[str]:
    expected = {name: entry["patched_sha256"] for name, entry in state["files"].items()}
    expected.update(state["new_files"])
    changed = []
    for name, digest in expected.items():
        path = root / name
        if not path.is_file() or _sha256(path.read_bytes()) != digest:
            changed.append(name)
    return changed


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_write(path) as stream:  # keeps an executable script executable
        stream.write(data)


# ---------------------------------------------------------------------- command line


def add_patch_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Registers ``patch <name> PATH [--revert]`` on an argparse subparsers object.

    The handler, set with ``set_defaults(func=...)``, takes the parsed arguments and returns an
    exit code: 0 on success (including "already applied"), 2 when the tool refused.

    Args:
        subparsers: the result of ``parser.add_subparsers()``.

    Example:
        >>> parser = argparse.ArgumentParser(prog="memloss")
        >>> add_patch_subcommand(parser.add_subparsers())
        >>> args = parser.parse_args(["patch", "trades", "/tmp/TRADES", "--revert"])
        >>> args.name, args.path, args.revert
        ('trades', '/tmp/TRADES', True)
    """
    command = subparsers.add_parser(
        "patch",
        help="add MemLoss to a checkout of TRADES, MART, HAT, Squeeze Training, "
        "robust_overfitting (PGD-AT) or AWP",
        description="Apply (or revert) an integration patch to a repository checkout.",
    )
    _add_patch_arguments(command)
    command.set_defaults(func=run_patch_command)


def _add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(PATCHES), help="which repository")
    parser.add_argument("path", help="top directory of the repository checkout")
    parser.add_argument(
        "--revert", action="store_true", help="restore the original files and remove ours"
    )


def run_patch_command(args: argparse.Namespace) -> int:
    """Runs the ``patch`` subcommand; prints one message and returns the exit code."""
    try:
        if args.revert:
            result = revert_patch(args.name, args.path)
        else:
            result = apply_patch(args.name, args.path)
    except PatchError as error:
        print(f"memloss patch: refused: {error}", file=sys.stderr)
        return 2
    print(result.message)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m memloss_addon.experiments.patching``."""
    parser = argparse.ArgumentParser(
        prog="python -m memloss_addon.experiments.patching",
        description="Apply (or revert) a MemLoss integration patch to a repository checkout.",
    )
    _add_patch_arguments(parser)
    return run_patch_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
