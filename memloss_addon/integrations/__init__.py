"""Support for patching public adversarial-training repositories with MemLoss.

``specs`` holds the patches (anchored edits plus one new file), ``hook`` the runtime object the
patched lines call. Apply a patch with ``memloss patch <name> PATH`` (see
:mod:`memloss_addon.experiments.patching`).
"""

from .hook import HookSettings, TrainingHook, keep_cuda_calls_on_cpu
from .specs import PATCHES, Edit, RepoPatch

__all__ = ["PATCHES", "Edit", "HookSettings", "RepoPatch", "TrainingHook", "keep_cuda_calls_on_cpu"]
