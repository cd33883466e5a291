"""Compares two training checkpoints tensor by tensor: prints ``identical`` or what differs.

The verification runs save the model (and optimizer) after the last epoch; a patched run at
``--beta-prime 0`` must have written exactly the tensors of the unpatched run.

Usage: python compare_checkpoints.py A B
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        for key, item in value.items():
            yield from _leaves(item, f"{path}/{key}")
    elif isinstance(value, Sequence) and not isinstance(value, str | bytes):
        for position, item in enumerate(value):
            yield from _leaves(item, f"{path}[{position}]")
    else:
        yield path, value


def differences(first: Any, second: Any) -> list[str]:
    """Paths whose tensors (or other values) differ, or exist in one checkpoint only."""
    left, right = dict(_leaves(first)), dict(_leaves(second))
    found = [f"{path} (only in one)" for path in sorted(set(left) ^ set(right))]
    for path in sorted(set(left) & set(right)):
        a, b = left[path], right[path]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        else:
            same = type(a) is type(b) and a == b
        if not same:
            found.append(path)
    return found


def main() -> None:
    first, second = (
        torch.load(path, map_location="cpu", weights_only=False) for path in sys.argv[1:3]
    )
    found = differences(first, second)
    print("identical" if not found else f"DIFFERENT ({', '.join(found[:5])})")


if __name__ == "__main__":
    main()
