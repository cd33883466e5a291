"""memloss-addon: MemLoss as a drop-in add-on for existing adversarial-training code.

The add-on is what a training loop imports: :class:`MemoryWrapper` (the memory and its term),
:class:`IndexedDataset` (dataset indices for the loader), the term as pure functions of logits,
and the atomic writer and file error of saving. It needs torch and numpy only; the experiments
(:mod:`memloss_addon.experiments`) are apart and never imported from here.

Example:
    >>> import torch
    >>> from memloss_addon import MemoryWrapper
    >>> model = torch.nn.Linear(4, 3)
    >>> memory = MemoryWrapper(model, num_samples=8, sample_shape=(4,), beta_prime=2.0)
    >>> x = torch.rand(2, 4)
    >>> memory(torch.tensor([0, 1]), x, x.clamp(0, 1), model(x), torch.tensor([0, 2])).item()
    0.0
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from .lazy import lazy_attributes
from .version import __version__

# The names load on first use, so that ``import memloss_addon`` (and the ``memloss`` command's
# --help) does not pay for importing torch until something needs it.
_EXPORTS = {
    "IndexedDataset": ".data",
    "MemoryAheadWarning": ".store.journal",
    "MemoryFileError": ".store.file_format",
    "MemoryWrapper": ".memory",
    "atomic_write": ".store.files",
    "memloss_term": ".loss",
    "memory_kl_rows": ".loss",
}

__all__ = [
    "IndexedDataset",
    "MemoryAheadWarning",
    "MemoryFileError",
    "MemoryWrapper",
    "__version__",
    "atomic_write",
    "memloss_term",
    "memory_kl_rows",
]

if TYPE_CHECKING:
    from .data import IndexedDataset
    from .loss import memloss_term, memory_kl_rows
    from .memory import MemoryWrapper
    from .store.file_format import MemoryFileError
    from .store.files import atomic_write
    from .store.journal import MemoryAheadWarning

__getattr__, __dir__ = lazy_attributes(sys.modules[__name__], _EXPORTS, __all__)
