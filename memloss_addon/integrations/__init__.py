"""Support for patching public adversarial-training repositories with MemLoss.

``specs`` holds the patches (anchored edits plus the shim files of ours; one patch per repository,
covering one or more training scripts), ``hook`` the runtime object the patched lines call. Apply
a patch with ``memloss patch <name> PATH`` (see :mod:`memloss_addon.experiments.patching`).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:
    from .hook import HookSettings, TrainingHook, keep_cuda_calls_on_cpu
    from .specs import PATCHES, Edit, RepoPatch

# The names load on first use (as in memloss_addon/__init__.py), so importing a submodule (the
# patch tool, store.files) does not import torch.
_EXPORTS = {
    "HookSettings": ".hook",
    "TrainingHook": ".hook",
    "keep_cuda_calls_on_cpu": ".hook",
    "PATCHES": ".specs",
    "Edit": ".specs",
    "RepoPatch": ".specs",
}

__all__ = [
    "PATCHES",
    "Edit",
    "HookSettings",
    "RepoPatch",
    "TrainingHook",
    "keep_cuda_calls_on_cpu",
]

__getattr__, __dir__ = lazy_attributes(sys.modules[__name__], _EXPORTS, __all__)
