"""Load published TRADES, MART, HAT and robust_overfitting checkpoints into our architectures.

Each source saves its model its own way; :func:`load_reference_state_dict` undoes it, then renames
the references' keys onto ours (:func:`~memloss_addon.experiments.architectures.reference_name`):

====================== ======================================================================
source                 what its checkpoints hold
====================== ======================================================================
``trades``             ``model.state_dict()`` of the bare model (TRADES 6e8e11b
                       ``train_trades_cifar10.py`` line 170): ``models/resnet.py`` or
                       ``models/wideresnet.py`` keys, the latter with ``sub_block1.*``, dropped
``mart``               the same layout (MART 2d83e17 ``train_resnet.py`` line 201;
                       ``wideresnet.py`` also has ``sub_block1``)
``robust_overfitting`` ``nn.DataParallel`` keys, ``module.`` + ``preactresnet.py`` or
                       ``wideresnet.py`` keys (c47a25c ``train_cifar.py`` line 215), plain or
                       inside ``{"state_dict": ...}`` (``model_best.pth``, ``model_val.pth``,
                       lines 422-448)
``hat``                ``{"model_state_dict": ...}`` (3177a4f ``core/utils/train.py`` line 305)
                       of ``DataParallel(Sequential(backbone))``: ``module.0.`` + backbone keys,
                       or ``module.1.`` when trained with ``--normalize true`` (index 0 is then
                       the stateless normalization; ``core/models/__init__.py`` lines 60-64)
====================== ======================================================================

The input normalization is not in any of these state dicts, so the model must be built with the
one the checkpoint was trained with: ``normalization=None`` for TRADES, MART and HAT's default,
the dataset's for robust_overfitting (``"cifar10"``, ``"cifar100"``, ``"svhn"``) and
``"cifar10-hat"`` for HAT's ``module.1.`` checkpoints. The loader refuses an identity model for a
checkpoint trained on normalized inputs and the other way round.

Example:
    >>> from memloss_addon.experiments.architectures import ResNet18
    >>> model = ResNet18(base_width=4, normalization=None)
    >>> reference = to_reference_state_dict(model)
    >>> sorted(reference)[:2]
    ['bn1.bias', 'bn1.num_batches_tracked']
    >>> load_reference_state_dict(model, {"model_state_dict": {
    ...     "module.0." + k: v for k, v in reference.items()}}, source="hat").dropped
    ()
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, cast, get_args

import torch
from torch import nn

from memloss_addon.experiments.architectures import (
    PreActResNet18,
    ResNet18,
    WideResNet,
    reference_name,
)

__all__ = [
    "REFERENCE_SOURCES",
    "LoadedReference",
    "ReferenceSource",
    "convert_reference_state_dict",
    "load_reference_checkpoint",
    "load_reference_state_dict",
    "to_reference_state_dict",
]

ReferenceSource = Literal["trades", "mart", "hat", "robust_overfitting"]
REFERENCE_SOURCES: tuple[ReferenceSource, ...] = get_args(ReferenceSource)

# The architectures each source defines (and so can have published weights for).
_ARCHITECTURES: dict[str, tuple[type[nn.Module], ...]] = {
    "trades": (ResNet18, WideResNet),
    "mart": (ResNet18, WideResNet),
    "hat": (ResNet18, PreActResNet18, WideResNet),
    "robust_overfitting": (PreActResNet18, WideResNet),
}
# TRADES' and MART's WideResNet build a block their forward pass never calls.
_UNUSED_PREFIXES: dict[str, tuple[str, ...]] = {
    "trades": ("sub_block1.",),
    "mart": ("sub_block1.",),
}
# Keys older torch versions did not write; our model's own values are kept when absent.
_OPTIONAL_SUFFIX = "num_batches_tracked"


class LoadedReference(NamedTuple):
    """What :func:`load_reference_state_dict` did besides loading.

    Attributes:
        dropped: Reference keys left out on purpose (TRADES' ``sub_block1``).
        kept: Our keys the checkpoint lacked and that kept the model's values
            (``num_batches_tracked`` of checkpoints written before torch 0.4.1).
        normalized: Whether the checkpoint was trained on normalized inputs (``None``: the
            layout does not say).
    """

    dropped: tuple[str, ...]
    kept: tuple[str, ...]
    normalized: bool | None


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    for wrapper in ("model_state_dict", "state_dict"):
        inner = state.get(wrapper)
        if isinstance(inner, Mapping):
            return inner
    return state


def _strip(keys: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in keys.items()}


def convert_reference_state_dict(
    model: nn.Module, state: Mapping[str, Any], *, source: ReferenceSource
) -> tuple[dict[str, torch.Tensor], LoadedReference]:
    """Rename a reference checkpoint's state dict onto ``model``'s keys, checking every shape.

    Args:
        model: One of :mod:`~memloss_addon.experiments.architectures`' models, of the same
            depth, width and class count as the checkpoint's.
        state: The checkpoint as ``torch.load`` returns it (wrappers and ``module.`` prefixes
            are undone here).
        source: One of :data:`REFERENCE_SOURCES`.

    Returns:
        ``(state_dict, report)``: a state dict with exactly ``model``'s keys except those in
        ``report.kept``, and what was dropped.

    Raises:
        ValueError: An unknown source, an architecture the source does not define, a key that
            has no place in ``model``, a missing key, or a shape that differs.
        TypeError: ``model`` is not one of our architectures.
    """
    if source not in REFERENCE_SOURCES:
        raise ValueError(f"unknown source {source!r}; choose one of {', '.join(REFERENCE_SOURCES)}")
    if not isinstance(model, (ResNet18, PreActResNet18, WideResNet)):
        raise TypeError(f"no reference layout for {type(model).__name__}")
    if not isinstance(model, _ARCHITECTURES[source]):
        raise ValueError(f"{source} defines no {type(model).__name__}; nothing of it can load")
    keys = dict(_unwrap(state))
    if keys and all(k.startswith("module.") for k in keys):  # nn.DataParallel
        keys = _strip(keys, "module.")
    normalized: bool | None = None
    if source == "hat" and keys:
        for index in ("0.", "1."):
            if all(k.startswith(index) for k in keys):
                keys, normalized = _strip(keys, index), index == "1."
    elif source in ("trades", "mart"):
        normalized = False
    elif source == "robust_overfitting":
        normalized = True
    unused = _UNUSED_PREFIXES.get(source, ()) if isinstance(model, WideResNet) else ()
    dropped = tuple(sorted(k for k in keys if k.startswith(unused)))
    ours = model.state_dict()
    by_reference = {reference_name(model, k): k for k in ours}
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in keys.items():
        if key in dropped:
            continue
        target = by_reference.get(key)
        if target is None:
            unknown.append(key)
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key!r} holds {type(value).__name__}, not a tensor")
        if value.shape != ours[target].shape:
            raise ValueError(
                f"{key!r} has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(ours[target].shape)} in the model ({target!r}): build the model with "
                "the checkpoint's depth, width and number of classes"
            )
        converted[target] = value
    missing = [k for k in ours if k not in converted]
    kept = tuple(k for k in missing if k.endswith(_OPTIONAL_SUFFIX))
    missing = [k for k in missing if k not in kept]
    if unknown or missing:
        shown = 5
        raise ValueError(
            f"the {source} checkpoint does not fit {type(model).__name__}: "
            f"{len(unknown)} unexpected key(s) {unknown[:shown]}, {len(missing)} missing "
            f"({[reference_name(model, k) for k in missing[:shown]]} in the reference's names)"
        )
    return converted, LoadedReference(dropped=dropped, kept=kept, normalized=normalized)


def load_reference_state_dict(
    model: nn.Module,
    state: Mapping[str, Any],
    *,
    source: ReferenceSource,
    check_normalization: bool = True,
) -> LoadedReference:
    """Load a TRADES, MART, HAT or robust_overfitting checkpoint into ``model`` (in place).

    Args:
        model: One of our architectures, built with the checkpoint's depth, width, class count
            and input normalization.
        state: The checkpoint as ``torch.load`` returns it.
        source: One of :data:`REFERENCE_SOURCES`.
        check_normalization: Refuse a model whose input normalization contradicts the
            checkpoint's (identity for TRADES, MART and HAT's ``module.0.`` layout; a
            normalization for robust_overfitting and HAT's ``module.1.``). Default: ``True``.

    Returns:
        What was dropped or kept (:class:`LoadedReference`).

    Raises:
        ValueError: See :func:`convert_reference_state_dict`, or a contradicting normalization.
    """
    converted, report = convert_reference_state_dict(model, state, source=source)
    if check_normalization and report.normalized is not None:
        pair = cast("ResNet18 | PreActResNet18 | WideResNet", model).normalize.pair
        if report.normalized and pair is None:
            hint = '"cifar10-hat"' if source == "hat" else 'the dataset\'s ("cifar10", ...)'
            raise ValueError(
                f"this {source} checkpoint was trained on normalized inputs but the model has "
                f"none: build it with normalization={hint}"
            )
        if not report.normalized and pair is not None:
            raise ValueError(
                f"this {source} checkpoint was trained on unnormalized [0, 1] inputs but the "
                f"model normalizes with {pair}: build it with normalization=None"
            )
    for key in report.kept:
        converted[key] = model.state_dict()[key]
    model.load_state_dict(converted, strict=True)
    return report


def load_reference_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    source: ReferenceSource,
    check_normalization: bool = True,
) -> LoadedReference:
    """:func:`load_reference_state_dict` of a file, read with ``weights_only=True`` on the CPU."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"{os.fspath(path)!r} holds {type(state).__name__}, not a state dict")
    return load_reference_state_dict(
        model, state, source=source, check_normalization=check_normalization
    )


def to_reference_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict under the references' bare key names (no wrapper, no prefix).

    Example:
        >>> from memloss_addon.experiments.architectures import PreActResNet18
        >>> "layer2.0.shortcut.0.weight" in to_reference_state_dict(PreActResNet18(base_width=2))
        True
    """
    return {reference_name(model, k): v for k, v in model.state_dict().items()}
