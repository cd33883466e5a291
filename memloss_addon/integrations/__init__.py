"""Support for patching public adversarial-training repositories with MemLoss.

``specs`` holds the patches (anchored edits plus the shim files of ours; one patch per repository,
covering one or more training scripts), ``hook`` the runtime object the patched lines call. Apply
a patch with ``memloss patch <name> PATH`` (see :mod:`memloss_addon.experiments.patching`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
