"""Where the memory lives and how it is encoded: codecs, placements and the slot ring."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from ..lazy import lazy_attributes

if TYPE_CHECKING:
    from .codecs import STORAGE_DTYPES, Codec, dtype_name, make_codec
    from .local import FORMAT_VERSION, MemoryRead, MemoryStore, estimate_nbytes
    from .placement import TensorStore, resolve_device
    from .slots import SlotRing

# The names load on first use (as in memloss_addon/__init__.py), so importing a submodule (the
# patch tool, store.files) does not import torch.
_EXPORTS = {
    "STORAGE_DTYPES": ".codecs",
    "Codec": ".codecs",
    "dtype_name": ".codecs",
    "make_codec": ".codecs",
    "FORMAT_VERSION": ".local",
    "MemoryRead": ".local",
    "MemoryStore": ".local",
    "estimate_nbytes": ".local",
    "TensorStore": ".placement",
    "resolve_device": ".placement",
    "SlotRing": ".slots",
}

__all__ = [
    "FORMAT_VERSION",
    "STORAGE_DTYPES",
    "Codec",
    "MemoryRead",
    "MemoryStore",
    "SlotRing",
    "TensorStore",
    "dtype_name",
    "estimate_nbytes",
    "make_codec",
    "resolve_device",
]

__getattr__, __dir__ = lazy_attributes(sys.modules[__name__], _EXPORTS, __all__)
