"""The add-on's string options, each declared once as a ``Literal`` with its tuple of choices.

Type hints, argument checks and command-line ``choices`` all derive from these, so an option is
added or renamed in one place.

Example:
    >>> WEIGHTINGS, STORAGE_DTYPE_NAMES[-1]
    (('difficulty', 'none'), 'int8')
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "BN_MODES",
    "DISTRIBUTIONS",
    "MODES",
    "STORAGE_DTYPE_NAMES",
    "WEIGHTINGS",
    "BNMode",
    "Distribution",
    "Mode",
    "StorageDtypeName",
    "Weighting",
]

Weighting = Literal["difficulty", "none"]
"""Row weight of the term: ``1 - p_y`` of the memory example, or 1."""

BNMode = Literal["train", "frozen", "eval"]
"""Normalization in the memory forward pass (:func:`memloss_addon.model_state.batchnorm_mode`)."""

Mode = Literal["example", "perturbation"]
"""What a slot holds: the adversarial example, or its perturbation of the clean input."""

Distribution = Literal["sharded", "replicated"]
"""How a memory is spread over ``torch.distributed`` ranks."""

StorageDtypeName = Literal["float32", "float16", "bfloat16", "uint8", "int8"]
"""Storage dtypes by the names used in state dicts, files and command lines."""

WEIGHTINGS: tuple[Weighting, ...] = get_args(Weighting)
BN_MODES: tuple[BNMode, ...] = get_args(BNMode)
MODES: tuple[Mode, ...] = get_args(Mode)
DISTRIBUTIONS: tuple[Distribution, ...] = get_args(Distribution)
STORAGE_DTYPE_NAMES: tuple[StorageDtypeName, ...] = get_args(StorageDtypeName)
