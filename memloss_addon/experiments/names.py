"""The experiments' string options, each declared once as a ``Literal`` with its tuple of choices.

Type hints, config checks and the ``memloss`` command's ``choices`` all derive from these. The
module imports nothing but ``typing``, so the command's parser can offer the choices (and print its
``--help``) without importing torch.

Example:
    >>> METHOD_NAMES[:2], ATTACK_INITS
    (('pgd_at', 'trades'), ('random', 'memory'))
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "AMP_MODES",
    "ATTACK_INITS",
    "ATTACK_NAMES",
    "AUTOATTACK_PRESETS",
    "DATASET_NAMES",
    "LR_SCHEDULES",
    "METHOD_NAMES",
    "MODEL_NAMES",
    "MODEL_STATES",
    "NORMALIZATION_NAMES",
    "PAD_MODES",
    "REFERENCE_SOURCES",
    "AmpMode",
    "AttackInit",
    "AttackName",
    "AutoAttackPreset",
    "DatasetName",
    "LRSchedule",
    "MethodName",
    "ModelName",
    "ModelState",
    "NormalizationName",
    "PadMode",
    "ReferenceSource",
]

MethodName = Literal["pgd_at", "trades", "mart", "hat", "squeeze", "single_step"]
"""Base objectives, by the names of :mod:`memloss_addon.objectives`."""

LRSchedule = Literal["piecewise", "onecycle"]
"""``"piecewise"``: x0.1 at given fractions of the steps; ``"onecycle"``: one-cycle to the base
rate."""

AttackInit = Literal["random", "memory"]
"""Where each training attack starts: the method's usual (random) start, or the sample's newest
memory example (:meth:`memloss_addon.MemoryWrapper.recall`)."""

ModelName = Literal[
    "digits-mlp",
    "digits-cnn",
    "small-resnet",
    "resnet18",
    "preact-resnet18",
    "wrn-34-10",
    "wrn-28-10",
]
"""The models of :mod:`memloss_addon.experiments.models`: three small ones for CPUs, then the
paper-scale architectures of :mod:`memloss_addon.experiments.architectures` (the same names as its
``ArchitectureName``)."""

NormalizationName = Literal["identity", "cifar10", "cifar10-hat", "cifar100", "svhn"]
"""Input normalizations of the paper-scale architectures, by name (those of
``architectures.NORMALIZATIONS``): ``"identity"`` feeds ``[0, 1]`` inputs unchanged (TRADES,
MART, HAT); the others subtract a mean and divide by a std per channel."""

PadMode = Literal["zeros", "reflect"]
"""How random-crop augmentation pads an image: with zeros (torchvision's ``RandomCrop(32,
padding=4)``) or by reflection (robust_overfitting)."""

AmpMode = Literal["off", "bf16"]
"""Mixed precision of the training forward passes: none, or ``torch.autocast`` to bfloat16."""

ReferenceSource = Literal["trades", "mart", "hat", "robust_overfitting"]
"""Repositories whose published checkpoints ``memloss eval --reference-source`` loads (the
sources of :mod:`memloss_addon.experiments.reference_weights`)."""

DatasetName = Literal["digits", "fake-cifar", "cifar10", "cifar100", "svhn"]
"""The datasets of :mod:`memloss_addon.experiments.datasets`."""

AttackName = Literal["clean", "pgd", "cw", "autoattack"]
"""Accuracies an evaluation can measure (:func:`memloss_addon.experiments.evaluate.evaluate`)."""

AutoAttackPreset = Literal["standard", "fast"]
"""AutoAttack iteration counts by name: the reference's, or ``AutoAttackConfig.fast()``'s."""

ModelState = Literal["last", "best"]
"""Which weights of a checkpoint to use: the last epoch's, or the best by held-out PGD-20."""

METHOD_NAMES: tuple[MethodName, ...] = get_args(MethodName)
LR_SCHEDULES: tuple[LRSchedule, ...] = get_args(LRSchedule)
ATTACK_INITS: tuple[AttackInit, ...] = get_args(AttackInit)
MODEL_NAMES: tuple[ModelName, ...] = get_args(ModelName)
DATASET_NAMES: tuple[DatasetName, ...] = get_args(DatasetName)
ATTACK_NAMES: tuple[AttackName, ...] = get_args(AttackName)
AUTOATTACK_PRESETS: tuple[AutoAttackPreset, ...] = get_args(AutoAttackPreset)
MODEL_STATES: tuple[ModelState, ...] = get_args(ModelState)
NORMALIZATION_NAMES: tuple[NormalizationName, ...] = get_args(NormalizationName)
PAD_MODES: tuple[PadMode, ...] = get_args(PadMode)
AMP_MODES: tuple[AmpMode, ...] = get_args(AmpMode)
REFERENCE_SOURCES: tuple[ReferenceSource, ...] = get_args(ReferenceSource)
