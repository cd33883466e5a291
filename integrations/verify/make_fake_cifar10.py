"""Writes a small random stand-in for CIFAR-10 (or CIFAR-100, SVHN) in torchvision's format.

The verification runs only need data of the right shape and format; their point is to compare
a patched and an unpatched training run on the same inputs, not to learn anything.

Usage: python make_fake_cifar10.py ROOT [--train 200] [--test 100] [--seed 0] [--format NAME]
writes, by format:
- cifar10 (default): ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta};
- cifar100: ROOT/cifar-100-python/{train,test,meta};
- svhn: ROOT/{train_32x32.mat,test_32x32.mat} (needs scipy).
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


def write_fake_cifar100(root: Path, *, train: int, test: int, seed: int) -> Path:
    """Writes the CIFAR-100 stand-in and returns its folder (``root / "cifar-100-python"``)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)

    def split(count: int, name: str) -> dict:
        fine = rng.integers(0, 100, size=count)
        return {
            "batch_label": name,
            "data": rng.integers(0, 256, size=(count, 3 * 32 * 32), dtype=np.uint8),
            "fine_labels": fine.tolist(),
            "coarse_labels": (fine // 5).tolist(),
            "filenames": [f"{name}_{i}.png" for i in range(count)],
        }

    _dump(folder / "train", split(train, "training batch 1 of 1"))
    _dump(folder / "test", split(test, "testing batch 1 of 1"))
    _dump(
        folder / "meta",
        {
            "fine_label_names": [f"class_{i}" for i in range(100)],
            "coarse_label_names": [f"superclass_{i}" for i in range(20)],
        },
    )
    return folder


def write_fake_svhn(root: Path, *, train: int, test: int, seed: int) -> Path:
    """Writes the SVHN stand-in (``.mat`` files, labels 1..10 as in the real ones); returns root."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for name, count in (("train", train), ("test", test)):
        images = rng.integers(0, 256, size=(32, 32, 3, count), dtype=np.uint8)
        labels = rng.integers(1, 11, size=(count, 1)).astype(np.uint8)
        savemat(root / f"{name}_32x32.mat", {"X": images, "y": labels})
    return root


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as stream:
        pickle.dump(obj, stream, protocol=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("cifar10", "cifar100", "svhn"), default="cifar10")
    args = parser.parse_args()
    write = {
        "cifar10": write_fake_cifar10,
        "cifar100": write_fake_cifar100,
        "svhn": write_fake_svhn,
    }[args.format]
    folder = write(args.root, train=args.train, test=args.test, seed=args.seed)
    print(f"wrote {folder}")


if __name__ == "__main__":
    main()
