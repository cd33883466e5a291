"""Which test samples an evaluation uses: all of a test set, or its first ``eval_samples``.

Example:
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> test = TensorDataset(torch.zeros(10, 2), torch.zeros(10, dtype=torch.long))
    >>> sample_count(first_samples(test, 4)), sample_count(first_samples(test, None))
    (4, 10)
    >>> len(evaluation_loader(test, 20, batch_size=3))
    4
"""

from __future__ import annotations

from collections.abc import Sized
from typing import Any

from torch.utils.data import DataLoader, Dataset, Subset

from memloss_addon.checks import positive_int

__all__ = ["evaluation_loader", "first_samples", "sample_count"]


def sample_count(dataset: Dataset[Any]) -> int:
    """The number of samples of ``dataset``.

    Raises:
        TypeError: If the dataset does not know its length (e.g. an iterable-style one).
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"the dataset must have a length, got {type(dataset).__name__}")
    return len(dataset)


def first_samples(dataset: Dataset[Any], eval_samples: int | None) -> Dataset[Any]:
    """The first ``eval_samples`` samples of ``dataset`` (all of them for ``None`` or more).

    Raises:
        TypeError: If ``eval_samples`` is not an int or ``None``.
        ValueError: If ``eval_samples`` is below 1.
    """
    if eval_samples is None:
        return dataset
    positive_int("eval_samples", eval_samples)
    if eval_samples >= sample_count(dataset):
        return dataset
    return Subset(dataset, range(eval_samples))


def evaluation_loader(
    dataset: Dataset[Any], eval_samples: int | None, *, batch_size: int = 512
) -> DataLoader:
    """A loader over :func:`first_samples` in order, in batches of ``batch_size``."""
    return DataLoader(first_samples(dataset, eval_samples), batch_size=batch_size, shuffle=False)
