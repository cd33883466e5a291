"""Picks the memory store for a configuration: local, sharded or replicated across ranks."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..checks import check_choice
from ..options import DISTRIBUTIONS, Distribution
from .distributed import ReplicatedMemoryStore, ShardedMemoryStore
from .local import MemoryStore

__all__ = ["make_store"]


def make_store(
    *,
    distributed: Distribution | None = None,
    process_group: dist.ProcessGroup | None = None,
    **options: Any,
) -> MemoryStore:
    """Returns the store for ``distributed`` built with the :class:`MemoryStore` ``options``.

    Raises:
        ValueError: an unknown ``distributed`` value, or a process group without ``distributed``.

    Example:
        >>> type(make_store(num_samples=4, sample_shape=(2,))).__name__
        'MemoryStore'
    """
    if distributed is None:
        if process_group is not None:
            raise ValueError(
                "process_group is only used with distributed='sharded' or 'replicated'"
            )
        return MemoryStore(**options)
    check_choice("distributed", distributed, (None, *DISTRIBUTIONS))
    if distributed == "sharded":
        return ShardedMemoryStore(process_group=process_group, **options)
    return ReplicatedMemoryStore(process_group=process_group, **options)
