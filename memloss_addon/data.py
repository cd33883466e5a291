"""``IndexedDataset``: a dataset whose items also carry their dataset index.

The memory is keyed by dataset index, never by position in a batch: with shuffling (and with
``DistributedSampler``) a sample lands at a different position every epoch.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

from torch.utils.data import Dataset

__all__ = ["IndexedDataset"]


class IndexedDataset(Dataset):
    """Wraps a map-style dataset so that item ``i`` is the inner item's fields plus ``i``.

    A tuple item ``(x, y)`` becomes ``(x, y, i)``; a dict item gets an ``"index"`` key; any other
    item ``x`` becomes ``(x, i)``. The default collate function turns the indices of a batch into an
    int64 tensor, ready for :class:`~memloss_addon.MemoryWrapper`. Indices are positions in the
    wrapped dataset, so wrapping a ``Subset`` or ``ConcatDataset`` gives indices in
    ``[0, len(dataset))``, which is what ``num_samples=len(dataset)`` expects.

    With a loader of your own, pass any integer tensor of dataset indices to the memory instead:
    the only contract is one stable index in ``[0, num_samples)`` per training sample.

    Args:
        dataset: a map-style dataset (with ``__getitem__`` and ``__len__``).

    Example:
        >>> import torch
        >>> from torch.utils.data import DataLoader, TensorDataset
        >>> data = IndexedDataset(TensorDataset(torch.rand(5, 2), torch.arange(5)))
        >>> x, y, idx = next(iter(DataLoader(data, batch_size=3)))
        >>> idx
        tensor([0, 1, 2])
    """

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(
                "IndexedDataset needs a map-style dataset with __getitem__ and __len__, "
                f"got {type(dataset).__name__}"
            )
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        size = len(self.dataset)
        if isinstance(index, bool) or not isinstance(index, int):
            index = _as_int(index)
        if not -size <= index < size:
            raise IndexError(f"index {index} is out of range for a dataset of {size} items")
        index = index % size  # a negative index still yields its non-negative dataset index
        item = self.dataset[index]
        if isinstance(item, tuple | list):
            return (*item, index)
        if isinstance(item, Mapping):
            return {**item, "index": index}
        return (item, index)


def _as_int(index: object) -> int:
    try:
        return operator.index(index)  # type: ignore[arg-type]  # numpy ints, 0-dim int tensors
    except TypeError as error:
        raise TypeError(f"dataset index must be an int, got {index!r}") from error
