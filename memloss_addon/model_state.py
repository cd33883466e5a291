"""Context managers that run a model in a chosen mode and leave every flag exactly as found.

The one place for module-state guards: training flags (:func:`preserved_training_flags`,
:func:`eval_mode`), normalization statistics (:func:`frozen_running_stats`,
:func:`batchnorm_mode`) and parameter gradients (:func:`frozen_parameters`). Each records what it
touches and puts it back in a ``finally`` block, so the model is left as found even when the
block raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from torch import nn
from torch.nn.modules.batchnorm import _NormBase

from .checks import check_choice
from .options import BN_MODES, BNMode

__all__ = [
    "batchnorm_mode",
    "eval_mode",
    "frozen_parameters",
    "frozen_running_stats",
    "preserved_training_flags",
]


@contextmanager
def preserved_training_flags(model: nn.Module) -> Iterator[None]:
    """Restores the ``training`` flag of the model and of every submodule on exit.

    ``model.train()`` would set every submodule to train mode and undo a user's per-module freeze;
    this restores each flag one by one.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> _ = net[1].eval()
        >>> with preserved_training_flags(net):
        ...     _ = net.train()
        >>> [m.training for m in net.modules()]
        [True, True, False]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    flags = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Puts ``model`` and all its submodules in eval mode; restores every flag on exit.

    Example:
        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
        >>> with eval_mode(net):
        ...     net[1].training
        False
        >>> net[1].training
        True
    """
    with preserved_training_flags(model):
        model.eval()
        yield


@contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    """Switches off ``requires_grad`` on all parameters of ``model``; restores each flag on exit.

    Gradients with respect to the inputs still flow. Attacks run inside this block cannot touch
    the parameters' ``.grad`` (so an evaluation between ``backward()`` and ``step()`` is harmless)
    and skip the work of computing parameter gradients.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with frozen_parameters(net):
        ...     net.weight.requires_grad
        False
        >>> net.weight.requires_grad
        True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    flags = [(param, param.requires_grad) for param in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


@contextmanager
def batchnorm_mode(model: nn.Module, mode: BNMode) -> Iterator[None]:
    """Runs ``model`` with a normalization policy for one extra forward pass.

    Args:
        model: the model.
        mode: ``"train"`` leaves the model as it is (in a training step: batch statistics, running
            statistics updated, as in the clean and adversarial passes); ``"frozen"`` makes the
            normalization layers that are in train mode use batch statistics without updating their
            running statistics; ``"eval"`` puts the whole model in eval mode.

    Every module's ``training`` flag and ``track_running_stats`` attribute is restored on exit.

    Example:
        >>> import torch
        >>> net = nn.BatchNorm1d(2)
        >>> with batchnorm_mode(net, "frozen"):
        ...     _ = net(torch.randn(4, 2))
        >>> net.running_mean.tolist(), int(net.num_batches_tracked), net.track_running_stats
        ([0.0, 0.0], 0, True)
    """
    check_choice("bn_mode", mode, BN_MODES)
    if mode == "train":  # nothing changes, so nothing to record and restore
        yield
        return
    with preserved_training_flags(model):
        if mode == "eval":
            model.eval()
        with frozen_running_stats(model) if mode == "frozen" else nullcontext():
            yield


@contextmanager
def frozen_running_stats(model: nn.Module) -> Iterator[None]:
    """Keeps normalization running statistics untouched, leaving every train/eval flag alone.

    Each normalization layer in train mode gets ``track_running_stats = False`` (restored on
    exit): it then normalizes with the batch's statistics and leaves ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` alone. Layers in eval mode already use, and never
    update, their running statistics.

    Example:
        >>> import torch
        >>> bn = nn.BatchNorm1d(2)
        >>> with frozen_running_stats(bn):
        ...     _ = bn(torch.randn(4, 2))
        >>> int(bn.num_batches_tracked), bn.track_running_stats
        (0, True)
    """
    touched = [
        (module, module.track_running_stats)
        for module in model.modules()
        if isinstance(module, _NormBase) and module.training
    ]
    try:
        for module, _ in touched:
            module.track_running_stats = False
        yield
    finally:
        for module, tracked in touched:
            module.track_running_stats = tracked
