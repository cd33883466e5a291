"""Where the memory lives and how it is encoded: codecs, placements and the slot ring."""

from .codecs import STORAGE_DTYPES, Codec, dtype_name, make_codec
from .local import FORMAT_VERSION, MemoryRead, MemoryStore, estimate_nbytes
from .placement import TensorStore, resolve_device
from .slots import SlotRing

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
