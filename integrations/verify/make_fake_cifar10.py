"""Writes a small random stand-in for CIFAR-10 in torchvision's on-disk format.

The verification runs only need data of the right shape and format; their point is to compare
a patched and an unpatched training run on the same inputs, not to learn anything.

Usage: python make_fake_cifar10.py ROOT [--train 200] [--test 100] [--seed 0]
writes ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import numpy as np

_FOLDER = "cifar-10-batches-py"
_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def write_fake_cifar10(root: Path, *, train: int, test: int, seed: int) -> Path:
    """Writes the stand-in and returns its folder (``root / "cifar-10-batches-py"``)."""
    if train % 5:
        raise ValueError(f"--train must be a multiple of 5 (five training batches), got {train}")
    rng = np.random.default_rng(seed)
    folder = root / _FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def batch(count: int, name: str) -> dict:
        return {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),
            "labels": rng.integers(0, 10, size=count).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(count)],
        }

    for number in range(1, 6):
        _dump(folder / f"data_batch_{number}", batch(train // 5, f"training batch {number}"))
    _dump(folder / "test_batch", batch(test, "testing batch 1"))
    _dump(
        folder / "batches.meta",
        {"label_names": _CLASSES, "num_cases_per_batch": train // 5, "num_vis": 3072},
    )
    return folder


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as stream:
        pickle.dump(obj, stream, protocol=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = write_fake_cifar10(args.root, train=args.train, test=args.test, seed=args.seed)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
