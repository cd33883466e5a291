"""The parts a training run is built from, each made from its :class:`TrainConfig`.

The SGD optimiser and its per-batch learning-rate schedule, the
:class:`~memloss_addon.MemoryWrapper`, the held-out split, the data order of each epoch, the
keyword arguments of the base objective and the memory-started attack's first point.

Shuffling draws from a generator seeded by ``(seed, epoch)``, so the data order never depends on
how many random numbers the attacks drew.

Example:
    >>> from torch import nn
    >>> config = TrainConfig(method="trades", epochs=4)
    >>> optimizer = build_optimizer(nn.Linear(2, 2), config, nesterov=False)
    >>> sorted(build_lr_scheduler(optimizer, "piecewise", total_steps=8).milestones)
    [4, 6]
    >>> sorted(objective_kwargs(config, helper=None))
    ['beta', 'eps', 'step_size', 'steps']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from memloss_addon.data import IndexedDataset
from memloss_addon.experiments.datasets import DatasetSplits
from memloss_addon.experiments.train_config import (
    AUGMENT_PADDING,
    DEFAULT_MILESTONES,
    LRSchedule,
    MethodName,
    TrainConfig,
    milestone_steps,
)
from memloss_addon.memory import MemoryWrapper
from memloss_addon.objectives.pgd import uniform_start
from memloss_addon.store import STORAGE_DTYPES

__all__ = [
    "HOLDOUT_SEED",
    "augmentation_generator",
    "augments_flips",
    "base_objective",
    "build_lr_scheduler",
    "build_memory",
    "build_optimizer",
    "epoch_loader",
    "epoch_order",
    "freeze",
    "holdout_positions",
    "memory_attack_start",
    "objective_kwargs",
    "split_holdout",
]

HOLDOUT_SEED = 0
"""Seed of the held-out split: the same samples are held out whatever the training seed."""


def build_optimizer(model: nn.Module, config: TrainConfig, *, nesterov: bool) -> torch.optim.SGD:
    """SGD over ``model``'s parameters with the config's rate, momentum and weight decay."""
    return torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=config.momentum,
        weight_decay=config.resolved_weight_decay,
        nesterov=nesterov,
    )


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    schedule: LRSchedule,
    total_steps: int,
    *,
    milestones: tuple[float, ...] = DEFAULT_MILESTONES,
) -> torch.optim.lr_scheduler.LRScheduler:
    """The per-batch learning-rate schedule over ``total_steps`` optimiser steps.

    ``"piecewise"``: x0.1 after each fraction of ``milestones`` of the steps
    (:func:`~.train_config.milestone_steps`); ``"onecycle"``: one-cycle peaking at the optimiser's
    rate after :data:`~.train_config.ONECYCLE_WARMUP` of the steps.
    """
    if schedule == "onecycle":
        from memloss_addon.experiments.train_config import ONECYCLE_WARMUP

        max_lr = optimizer.param_groups[0]["lr"]
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=ONECYCLE_WARMUP
        )
    steps = milestone_steps(milestones, total_steps)
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=steps, gamma=0.1)


def build_memory(model: nn.Module, config: TrainConfig, splits: DatasetSplits) -> MemoryWrapper:
    """The memory of ``model`` over ``splits``' training set, with the config's memory options.

    Its weight is ``config.memory_beta_prime``: 0 when the memory only starts attacks or
    diagnoses, so that no term is computed.
    """
    return MemoryWrapper(
        model,
        num_samples=len(splits.train),
        sample_shape=splits.sample_shape,
        beta_prime=config.memory_beta_prime,
        depth=config.depth,
        weighting=config.weighting,
        mode=config.memory_mode,
        dtype=STORAGE_DTYPES[config.memory_dtype],
        device=config.memory_device,
        eps=config.eps,
        bn_mode=config.bn_mode,
        replay_fraction=config.replay_fraction,
        diagnostics=config.diagnostics,
        view_padding=AUGMENT_PADDING if config.memory_aligned else None,
    )


def memory_attack_start(
    memory: MemoryWrapper,
    indices: torch.Tensor,
    x: torch.Tensor,
    *,
    eps: float,
    fallback: Callable[[torch.Tensor, float], torch.Tensor] = uniform_start,
    view: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor | None:
    """The first point of this batch's attack: each sample's newest memory example where it has
    one, and the usual random start where it has none.

    ``init`` replaces an objective's own start for the whole batch, so the rows without a memory
    example need a start from the caller. They get ``fallback(x_rows, eps)``, by default a
    uniform random point of the eps-ball (:func:`memloss_addon.objectives.pgd.uniform_start`,
    PGD-AT's start; TRADES-like methods would start near ``x``), drawn for those rows only.
    When no row has a memory example (the first epoch) the result is ``None``: pass it on as
    ``init`` and the objective starts exactly as it does without the memory.

    Args:
        memory: The run's memory.
        indices: ``(B,)`` dataset indices of the batch.
        x: ``(B, ...)`` clean inputs.
        eps: The attack radius.
        fallback: ``(x_rows, eps) -> start`` for the rows without a memory example.
        view: ``(offsets, flips)`` of the batch's views, for a memory aligned with them.

    Returns:
        ``(B, ...)`` starts for ``init``, or ``None`` when no row has a memory example.

    Example:
        >>> memory = MemoryWrapper(nn.Linear(2, 2), num_samples=4, sample_shape=(2,), eps=0.1)
        >>> x = torch.full((2, 2), 0.5)
        >>> memory_attack_start(memory, torch.tensor([0, 1]), x, eps=0.1) is None
        True
    """
    start, found = memory.recall(indices, x, view=view)
    if not bool(found.any()):
        return None
    if bool(found.all()):
        return start
    missing = (~found).nonzero().squeeze(1)
    return start.index_copy(0, missing, fallback(x.index_select(0, missing), eps).to(start.dtype))


def holdout_positions(labels: Sequence[int] | torch.Tensor, count: int) -> list[int]:
    """``count`` positions, stratified by label, drawn with :data:`HOLDOUT_SEED`; sorted.

    Each class gives ``count * n_class / n`` positions, rounded down, and the remaining ones go to
    the classes with the largest remainders (ties: the smaller label first). Within a class the
    positions are a seeded random choice.

    Raises:
        ValueError: If ``count`` is not below the number of samples.

    Example:
        >>> held = holdout_positions([0] * 6 + [1] * 3, 3)  # two of class 0, one of class 1
        >>> sum(p < 6 for p in held), sum(p >= 6 for p in held)
        (2, 1)
    """
    labels = torch.as_tensor(labels).reshape(-1).long()
    n = labels.numel()
    if not 0 <= count < n:
        raise ValueError(f"holdout must be below the {n} training samples, got {count!r}")
    classes, sizes = torch.unique(labels, sorted=True, return_counts=True)
    quotas = [count * int(size) // n for size in sizes]
    remainders = [count * int(size) % n for size in sizes]
    by_remainder = sorted(range(len(quotas)), key=lambda i: (-remainders[i], i))
    for i in by_remainder[: count - sum(quotas)]:
        quotas[i] += 1
    generator = torch.Generator().manual_seed(HOLDOUT_SEED)
    chosen: list[int] = []
    for label, quota in zip(classes.tolist(), quotas, strict=True):
        members = (labels == label).nonzero().squeeze(1)
        order = torch.randperm(members.numel(), generator=generator)
        chosen.extend(members[order[:quota]].tolist())
    return sorted(chosen)


def split_holdout(splits: DatasetSplits, count: int) -> tuple[DatasetSplits, Dataset[Any] | None]:
    """The splits to train on and the held-out samples (items ``(x, y)``), or ``None`` for 0.

    The held-out samples come from the training set (:func:`holdout_positions`), never from the
    test set. The training set of the returned splits re-indexes the rest ``0 .. n - count - 1``
    for the memory.
    """
    if count == 0:
        return splits, None
    inner = splits.train.dataset
    held = holdout_positions(_labels(inner), count)
    kept = sorted(set(range(len(splits.train))) - set(held))
    train = IndexedDataset(Subset(inner, kept))
    return dataclasses.replace(splits, train=train), Subset(inner, held)


def _labels(dataset: Dataset[Any]) -> torch.Tensor:
    """Every label of a dataset of ``(x, y)`` items, read without loading images when possible."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    for attribute in ("targets", "labels"):  # torchvision's CIFAR and SVHN
        values = getattr(dataset, attribute, None)
        if values is not None:
            return torch.as_tensor(values)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def epoch_loader(splits: DatasetSplits, config: TrainConfig, epoch: int) -> DataLoader:
    """The training batches of ``epoch``, shuffled by a generator seeded with ``(seed, epoch)``.

    The order is reproducible and independent of the attacks' random numbers. A final batch of
    one sample is dropped: it cannot go through train-mode BatchNorm.
    """
    return _shuffled(splits.train, config, epoch)


def _shuffled(dataset: Dataset[Any], config: TrainConfig, epoch: int) -> DataLoader:
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
    n = len(dataset)  # type: ignore[arg-type]
    return DataLoader(
        dataset,
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=n % config.batch_size == 1,
    )


def epoch_order(splits: DatasetSplits, config: TrainConfig, epoch: int) -> torch.Tensor:
    """The positions :func:`epoch_loader` visits in ``epoch``, in its order and without the
    batch it drops, as int64: what a device-resident dataset follows, so that both give the
    same batches. (The same loader over the positions themselves: its generator makes the same
    draws.)

    Example:
        >>> from memloss_addon.experiments.datasets import load_digits
        >>> splits, config = load_digits(), TrainConfig(method="trades", batch_size=100)
        >>> order = epoch_order(splits, config, 3)
        >>> batches = [idx for _, _, idx in epoch_loader(splits, config, 3)]
        >>> torch.equal(order, torch.cat(batches))
        True
    """
    positions = list(range(len(splits.train)))
    return torch.cat([batch.long() for batch in _shuffled(positions, config, epoch)])  # type: ignore[arg-type]


def augmentation_generator(
    config: TrainConfig, epoch: int, device: torch.device | str
) -> torch.Generator:
    """The generator of ``epoch``'s crops and flips, on ``device``, seeded by ``(seed, epoch)``.

    Apart from the data order's and the attacks' streams, so a resumed run draws the same
    augmentation as an uninterrupted one without saving any generator state.
    """
    seed = 2 * (config.seed * 1_000_003 + epoch) + 1
    return torch.Generator(device=device).manual_seed(seed % (1 << 63))


def augments_flips(splits: DatasetSplits) -> bool:
    """Whether the augmentation mirrors the images: not for SVHN, whose digits a mirror changes
    (as :func:`~.datasets.load_dataset` does)."""
    return splits.name != "svhn"


def base_objective(method: MethodName) -> Callable[..., Any]:
    """The function of :mod:`memloss_addon.objectives` that implements ``method``."""
    from memloss_addon import objectives

    return getattr(objectives, method)


def objective_kwargs(config: TrainConfig, *, helper: nn.Module | None) -> dict[str, Any]:
    """The keyword arguments the config's base objective takes (attack and regularizer)."""
    kwargs: dict[str, Any] = {
        "eps": config.eps,
        "step_size": config.resolved_step_size,
        "steps": config.resolved_steps,
    }
    beta = config.resolved_beta
    if config.method in ("trades", "mart", "squeeze"):
        kwargs["beta"] = beta
    elif config.method == "hat":
        kwargs.update(beta=beta, helper=helper, h=config.hat_h, gamma=config.hat_gamma)
    elif config.method == "single_step":
        kwargs["reg_weight"] = beta
    return kwargs


def freeze(model: nn.Module) -> None:
    """Put ``model`` in eval mode and stop gradients to its parameters (HAT's trained helper)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
