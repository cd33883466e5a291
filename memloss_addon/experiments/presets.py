"""Named training presets copied from the reference repositories, each setting with its source line.

A preset is a dict of settings for a training run (the keys of :data:`SETTING_KEYS`: the
:class:`~memloss_addon.experiments.train_config.TrainConfig` fields plus ``dataset``,
``nesterov``, ``schedule``, ``normalization``, ``augment``, ``pad_mode`` and the width options)
together with, for every setting, the file and line of the reference it copies
(:class:`Citation`). Each has a ``+memloss`` variant that adds the MemLoss term with beta' 2 and
K 1 and changes nothing else.

=================================== ==========================================================
preset                              reference
=================================== ==========================================================
``trades-wrn-34-10-cifar10``        TRADES 6e8e11b ``train_trades_cifar10.py`` (its defaults)
``trades-resnet18-cifar10``         the same, with the ResNet-18 its line 151 offers
``pgd-at-preact-resnet18-cifar10``  robust_overfitting c47a25c ``train_cifar.py`` (defaults)
``hat-resnet18-cifar10``            HAT 3177a4f ``core/utils/parser.py`` defaults + README
``hat-preact-resnet18-cifar10``     the same with ``--model preact-resnet18``
``hat-resnet18-svhn``               the same with ``--data svhn`` (no augmentation there)
``hat-preact-resnet18-svhn``        both
``mart-resnet18-cifar10``           MART 2d83e17 ``train_resnet.py`` (its defaults)
=================================== ==========================================================

Learning-rate milestones are fractions of the run (as ``TrainConfig.milestones`` takes them):
the step schedules of TRADES and MART drop at epoch boundaries, so their fractions are
``(epoch - 1) / epochs`` of the reference's 1-based drop epochs; overriding ``epochs`` scales
them. The module imports no torch.

Example:
    >>> settings = resolve_preset("trades-wrn-34-10-cifar10+memloss")
    >>> settings["epochs"], settings["eps"], settings["beta"], settings["beta_prime"]
    (76, 0.031, 6.0, 2.0)
    >>> str(get_preset("trades-wrn-34-10-cifar10").sources["epochs"][0])
    'TRADES@6e8e11b train_trades_cifar10.py:20'
    >>> resolve_preset("hat-resnet18-svhn", epochs=2, base_width=8)["epochs"]
    2
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

__all__ = [
    "MEMLOSS_SETTINGS",
    "PRESETS",
    "REFERENCE_REPOSITORIES",
    "SETTING_KEYS",
    "Citation",
    "Preset",
    "dry_run_text",
    "get_preset",
    "list_presets",
    "resolve_preset",
    "train_config_kwargs",
]

REFERENCE_REPOSITORIES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "TRADES": ("yaodongyu/TRADES", "6e8e11b7c281371c2f027ffadfbaea80361f09de"),
        "robust_overfitting": (
            "locuslab/robust_overfitting",
            "c47a25c5e00c8b2bb35488d962c04dd771b7e9af",
        ),
        "HAT": ("imrahulr/hat", "3177a4f827480e97ac8ea4c5c6acab197cf97e66"),
        "MART": ("YisenWang/MART", "2d83e17b381dd2ee52223695e517bf6d5ff09c2c"),
    }
)
"""Short name -> (GitHub ``owner/name``, commit) of each reference repository."""

SETTING_KEYS: tuple[str, ...] = (
    "method",
    "model",
    "dataset",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "schedule",
    "milestones",
    "eps",
    "step_size",
    "steps",
    "beta",
    "hat_h",
    "hat_gamma",
    "helper_epochs",
    "normalization",
    "augment",
    "pad_mode",
    "holdout",
    "memory",
    "beta_prime",
    "depth",
    "base_width",
    "widen_factor",
)
"""Every key a preset may hold or an override may set, in display order."""

MEMLOSS_SETTINGS: Mapping[str, Any] = MappingProxyType(
    {"memory": True, "beta_prime": 2.0, "depth": 1}
)
"""What a ``+memloss`` variant adds: the term with beta' 2 over the previous epoch's example."""

MEMLOSS_SOURCE = "MemLoss (arXiv:2510.09105) as issue 16 asks: beta' 2, K 1"
_MEMLOSS_SUFFIX = "+memloss"


@dataclass(frozen=True)
class Citation:
    """A line of a reference repository that a setting copies.

    Attributes:
        repo: Key of :data:`REFERENCE_REPOSITORIES`.
        path: File in the repository.
        line: 1-based line number at the repository's commit.
        quote: Text that stands on that line (checked by the tests against a local mirror).
    """

    repo: str
    path: str
    line: int
    quote: str

    def __str__(self) -> str:
        return f"{self.repo}@{REFERENCE_REPOSITORIES[self.repo][1][:7]} {self.path}:{self.line}"

    @property
    def url(self) -> str:
        """The line on GitHub at the pinned commit."""
        name, commit = REFERENCE_REPOSITORIES[self.repo]
        return f"https://github.com/{name}/blob/{commit}/{self.path}#L{self.line}"


@dataclass(frozen=True)
class Preset:
    """A named reference setting.

    Attributes:
        name: The preset's name (``+memloss`` variants end so).
        summary: One line on what it reproduces.
        settings: Keys of :data:`SETTING_KEYS` and their values.
        sources: For each setting, the reference lines it copies (the ``+memloss`` keys cite
            nothing; see :data:`MEMLOSS_SOURCE`).
        notes: Where the preset or the library departs from the reference, or what the
            reference leaves open.
    """

    name: str
    summary: str
    settings: Mapping[str, Any]
    sources: Mapping[str, tuple[Citation, ...]]
    notes: tuple[str, ...] = field(default=())


def _c(repo: str, path: str, line: int, quote: str) -> Citation:
    return Citation(repo, path, line, quote)


# ------------------------------------------------------------------------------------------------
# TRADES 6e8e11b, train_trades_cifar10.py (run as the README's "python train_trades_cifar10.py").
_T = "train_trades_cifar10.py"
_TRADES_COMMON: dict[str, tuple[Any, tuple[Citation, ...]]] = {
    "method": ("trades", (_c("TRADES", _T, 81, "loss = trades_loss("),)),
    "dataset": ("cifar10", (_c("TRADES", _T, 67, "datasets.CIFAR10("),)),
    "epochs": (76, (_c("TRADES", _T, 20, "default=76"),)),
    "batch_size": (128, (_c("TRADES", _T, 16, "default=128"),)),
    "lr": (0.1, (_c("TRADES", _T, 24, "default=0.1"),)),
    "momentum": (0.9, (_c("TRADES", _T, 26, "default=0.9"),)),
    "weight_decay": (2e-4, (_c("TRADES", _T, 22, "default=2e-4"),)),
    "nesterov": (False, (_c("TRADES", _T, 153, "optim.SGD(model.parameters(), lr=args.lr"),)),
    "schedule": ("piecewise", (_c("TRADES", _T, 137, "def adjust_learning_rate"),)),
    # x0.1 from epoch 75 (1-based) of 76; its drops at 90 and 100 lie beyond the run.
    "milestones": ((74 / 76,), (_c("TRADES", _T, 140, "if epoch >= 75"),)),
    "eps": (0.031, (_c("TRADES", _T, 30, "default=0.031"),)),
    "step_size": (0.007, (_c("TRADES", _T, 34, "default=0.007"),)),
    "steps": (10, (_c("TRADES", _T, 32, "default=10"),)),
    "beta": (6.0, (_c("TRADES", _T, 36, "default=6.0"),)),
    "normalization": ("identity", (_c("TRADES", "README.md", 158, "[0, 1]"),)),
    "augment": (
        True,
        (
            _c("TRADES", _T, 60, "transforms.RandomCrop(32, padding=4)"),
            _c("TRADES", _T, 61, "transforms.RandomHorizontalFlip()"),
        ),
    ),
    "pad_mode": ("zeros", (_c("TRADES", _T, 60, "RandomCrop(32, padding=4)"),)),
    # No selection: a checkpoint every epoch, the last one is the model.
    "holdout": (0, (_c("TRADES", _T, 170, "torch.save(model.state_dict()"),)),
}

# robust_overfitting c47a25c, train_cifar.py defaults (PGD-AT, PreAct ResNet-18).
_R = "train_cifar.py"
_PGD_AT: dict[str, tuple[Any, tuple[Citation, ...]]] = {
    "method": ("pgd_at", (_c("robust_overfitting", _R, 138, "'--attack', default='pgd'"),)),
    "model": (
        "preact-resnet18",
        (_c("robust_overfitting", _R, 128, "'--model', default='PreActResNet18'"),),
    ),
    "dataset": ("cifar10", (_c("robust_overfitting", _R, 196, "dataset = cifar10("),)),
    "epochs": (200, (_c("robust_overfitting", _R, 133, "'--epochs', default=200"),)),
    "batch_size": (128, (_c("robust_overfitting", _R, 131, "'--batch-size', default=128"),)),
    "lr": (0.1, (_c("robust_overfitting", _R, 135, "'--lr-max', default=0.1"),)),
    "momentum": (0.9, (_c("robust_overfitting", _R, 230, "momentum=0.9"),)),
    "weight_decay": (5e-4, (_c("robust_overfitting", _R, 230, "weight_decay=5e-4"),)),
    "nesterov": (False, (_c("robust_overfitting", _R, 230, "torch.optim.SGD(params"),)),
    "schedule": (
        "piecewise",
        (_c("robust_overfitting", _R, 134, "'--lr-schedule', default='piecewise'"),),
    ),
    "milestones": (
        (0.5, 0.75),
        (
            _c("robust_overfitting", _R, 250, "if t / args.epochs < 0.5"),
            _c("robust_overfitting", _R, 252, "elif t / args.epochs < 0.75"),
        ),
    ),
    "eps": (
        8 / 255,
        (
            _c("robust_overfitting", _R, 139, "'--epsilon', default=8"),
            _c("robust_overfitting", _R, 205, "epsilon = (args.epsilon / 255.)"),
        ),
    ),
    "step_size": (
        2 / 255,
        (
            _c("robust_overfitting", _R, 142, "'--pgd-alpha', default=2"),
            _c("robust_overfitting", _R, 206, "pgd_alpha = (args.pgd_alpha / 255.)"),
        ),
    ),
    "steps": (10, (_c("robust_overfitting", _R, 140, "'--attack-iters', default=10"),)),
    "normalization": (
        "cifar10",
        (
            _c("robust_overfitting", _R, 20, "mu = torch.tensor(cifar10_mean)"),
            _c("robust_overfitting", "utils.py", 17, "cifar10_mean = (0.4914, 0.4822, 0.4465)"),
            _c("robust_overfitting", "utils.py", 18, "cifar10_std = (0.2471, 0.2435, 0.2616)"),
        ),
    ),
    "augment": (True, (_c("robust_overfitting", _R, 183, "[Crop(32, 32), FlipLR()]"),)),
    "pad_mode": (
        "reflect",
        (
            _c("robust_overfitting", _R, 197, "pad(dataset['train']['data'], 4)"),
            _c("robust_overfitting", "utils.py", 27, "mode='reflect'"),
        ),
    ),
    # --val: a held-out split of 1000 training images picks the best epoch.
    "holdout": (
        1000,
        (
            _c("robust_overfitting", "generate_validation.py", 9, "n = 1000"),
            _c("robust_overfitting", _R, 156, "'--val'"),
        ),
    ),
}

# HAT 3177a4f: core/utils/parser.py defaults and the README's two commands.
_P = "core/utils/parser.py"
_HAT_COMMON: dict[str, tuple[Any, tuple[Citation, ...]]] = {
    "method": (
        "hat",
        (
            _c("HAT", "README.md", 59, "--helper-model std-cifar10"),
            _c("HAT", "core/utils/train.py", 125, "self.params.helper_model is not None"),
        ),
    ),
    "epochs": (50, (_c("HAT", "README.md", 58, "--num-adv-epochs 50"),)),
    "helper_epochs": (50, (_c("HAT", "README.md", 47, "--num-std-epochs 50"),)),
    "batch_size": (128, (_c("HAT", _P, 18, "'--batch-size', type=int, default=128"),)),
    "lr": (0.21, (_c("HAT", _P, 45, "'--lr', type=float, default=0.21"),)),
    "momentum": (0.9, (_c("HAT", "core/utils/train.py", 85, "momentum=0.9"),)),
    "weight_decay": (5e-4, (_c("HAT", _P, 46, "'--weight-decay', type=float, default=5e-4"),)),
    "nesterov": (True, (_c("HAT", _P, 48, "'--nesterov', type=str2bool, default=True"),)),
    "schedule": (
        "onecycle",
        (
            _c("HAT", _P, 47, "default='cyclic'"),
            _c("HAT", "core/utils/train.py", 99, "OneCycleLR(self.optimizer"),
        ),
    ),
    "milestones": (None, (_c("HAT", "core/utils/train.py", 99, "pct_start=0.25"),)),
    "eps": (8 / 255, (_c("HAT", _P, 52, "'--attack-eps', type=str2float, default=8/255"),)),
    "step_size": (
        2 / 255,
        (_c("HAT", _P, 53, "'--attack-step', type=str2float, default=2/255"),),
    ),
    "steps": (10, (_c("HAT", _P, 54, "'--attack-iter', type=int, default=10"),)),
    "beta": (2.5, (_c("HAT", "README.md", 60, "--beta 2.5"),)),
    "hat_gamma": (0.5, (_c("HAT", "README.md", 61, "--gamma 0.5"),)),
    "hat_h": (2.0, (_c("HAT", _P, 38, "'--h', default=2.0"),)),
    "normalization": (
        "identity",
        (_c("HAT", _P, 31, "'--normalize', type=str2bool, default=False"),),
    ),
    "pad_mode": ("zeros", (_c("HAT", "core/data/cifar10.py", 27, "RandomCrop(32, padding=4)"),)),
    "holdout": (1024, (_c("HAT", "core/data/__init__.py", 77, "torch.arange(0, 1024)"),)),
}
_HAT_MODELS: dict[str, tuple[Any, tuple[Citation, ...]]] = {
    "resnet18": (
        "resnet18",
        (
            _c("HAT", _P, 30, "default='resnet18'"),
            _c("HAT", "README.md", 57, "--model resnet18"),
        ),
    ),
    "preact-resnet18": (
        "preact-resnet18",
        (_c("HAT", "core/models/__init__.py", 15, "'preact-resnet18'"),),
    ),
}
_HAT_DATA: dict[str, dict[str, tuple[Any, tuple[Citation, ...]]]] = {
    "cifar10": {
        "dataset": ("cifar10", (_c("HAT", "README.md", 56, "--data cifar10"),)),
        "augment": (
            True,
            (
                _c("HAT", _P, 17, "'--augment', type=str2bool, default=True"),
                _c("HAT", "core/data/cifar10.py", 27, "transforms.RandomHorizontalFlip(0.5)"),
            ),
        ),
    },
    "svhn": {
        "dataset": ("svhn", (_c("HAT", "core/data/__init__.py", 16, "'svhn'"),)),
        # load_svhn ignores --augment: no crop, no flip.
        "augment": (
            False,
            (_c("HAT", "core/data/svhn.py", 26, "train_transform = test_transform"),),
        ),
    },
}

# MART 2d83e17, train_resnet.py (the README's "python3 train_resnet.py for ResNet18").
_M = "train_resnet.py"
_MART: dict[str, tuple[Any, tuple[Citation, ...]]] = {
    "method": ("mart", (_c("MART", _M, 92, "loss = mart_loss("),)),
    "model": ("resnet18", (_c("MART", _M, 169, "model = ResNet18()"),)),
    "dataset": ("cifar10", (_c("MART", _M, 78, "torchvision.datasets.CIFAR10("),)),
    "epochs": (120, (_c("MART", _M, 25, "default=120"),)),
    "batch_size": (128, (_c("MART", _M, 21, "default=128"),)),
    "lr": (0.01, (_c("MART", _M, 29, "default=0.01"),)),
    "momentum": (0.9, (_c("MART", _M, 31, "default=0.9"),)),
    "weight_decay": (3.5e-3, (_c("MART", _M, 27, "default=3.5e-3"),)),
    "nesterov": (False, (_c("MART", _M, 171, "optim.SGD(model.parameters(), lr=args.lr"),)),
    "schedule": ("piecewise", (_c("MART", _M, 109, "def adjust_learning_rate"),)),
    # x0.1 from epoch 75, x0.01 from 90, x0.001 from 100 (1-based) of 120.
    "milestones": (
        (74 / 120, 89 / 120, 99 / 120),
        (
            _c("MART", _M, 116, "elif epoch >= 75"),
            _c("MART", _M, 114, "elif epoch >= 90"),
            _c("MART", _M, 112, "if epoch >= 100"),
        ),
    ),
    "eps": (0.031, (_c("MART", _M, 35, "default=0.031"),)),
    "step_size": (0.007, (_c("MART", _M, 39, "default=0.007"),)),
    "steps": (10, (_c("MART", _M, 37, "default=10"),)),
    "beta": (5.0, (_c("MART", _M, 41, "default=5.0"),)),
    "normalization": ("identity", (_c("MART", _M, 73, "transforms.ToTensor()"),)),
    "augment": (
        True,
        (
            _c("MART", _M, 71, "transforms.RandomCrop(32, padding=4)"),
            _c("MART", _M, 72, "transforms.RandomHorizontalFlip()"),
        ),
    ),
    "pad_mode": ("zeros", (_c("MART", _M, 71, "RandomCrop(32, padding=4)"),)),
    "holdout": (0, (_c("MART", _M, 201, "torch.save(model.state_dict()"),)),
}

_HAT_NOTES = (
    "HAT trains its helper (standard training, helper_epochs) with the same optimizer settings "
    "and its own one-cycle schedule before the adversarial epochs.",
    "HAT's one-cycle schedule counts floor(N / batch) + 1 steps per epoch "
    "(core/utils/train.py line 98); a run that holds samples out has fewer.",
    "HAT's train.py keeps the epoch with the best test PGD accuracy (train.py line 196); the "
    "preset picks by PGD on the 1024 held-out training images as HAT's paper and train-wa.py "
    "do.",
)


_DISPLAY = {
    "resnet18": "ResNet-18",
    "preact-resnet18": "PreAct ResNet-18",
    "cifar10": "CIFAR-10",
    "svhn": "SVHN",
}


def _preset(
    name: str,
    summary: str,
    table: Mapping[str, tuple[Any, tuple[Citation, ...]]],
    notes: tuple[str, ...] = (),
) -> Preset:
    return Preset(
        name=name,
        summary=summary,
        settings=MappingProxyType({k: v for k, (v, _) in table.items()}),
        sources=MappingProxyType({k: cites for k, (_, cites) in table.items()}),
        notes=notes,
    )


def _build() -> dict[str, Preset]:
    wrn = (
        "wrn-34-10",
        (
            _c("TRADES", _T, 152, "model = WideResNet()"),
            _c("TRADES", "models/wideresnet.py", 51, "depth=34, num_classes=10, widen_factor=10"),
        ),
    )
    resnet = ("resnet18", (_c("TRADES", _T, 151, "ResNet18() can be also used here"),))
    base = [
        _preset(
            "trades-wrn-34-10-cifar10",
            "TRADES, WideResNet-34-10, CIFAR-10: train_trades_cifar10.py as published",
            {**_TRADES_COMMON, "model": wrn},
        ),
        _preset(
            "trades-resnet18-cifar10",
            "TRADES, ResNet-18, CIFAR-10: train_trades_cifar10.py with the ResNet-18 it offers",
            {**_TRADES_COMMON, "model": resnet},
        ),
        _preset(
            "pgd-at-preact-resnet18-cifar10",
            "PGD-AT (PGD-10), PreAct ResNet-18, CIFAR-10: robust_overfitting's train_cifar.py",
            _PGD_AT,
            (
                "robust_overfitting changes the rate per batch from t = epoch + (i + 1) / "
                "len(batches) (train_cifar.py line 308), so its drops come one step earlier.",
            ),
        ),
    ]
    for data in ("cifar10", "svhn"):
        for model in ("resnet18", "preact-resnet18"):
            notes: tuple[str, ...] = _HAT_NOTES
            if data == "svhn":
                notes = notes + (
                    "The HAT repository gives no SVHN-specific learning rate; the preset keeps "
                    "the parser default 0.21 (the paper's SVHN setting is not checked here).",
                )
            base.append(
                _preset(
                    f"hat-{model}-{data}",
                    f"HAT, {_DISPLAY[model]}, {_DISPLAY[data]}: HAT's parser defaults and README "
                    "commands",
                    {**_HAT_COMMON, "model": _HAT_MODELS[model], **_HAT_DATA[data]},
                    notes,
                )
            )
    base.append(
        _preset(
            "mart-resnet18-cifar10",
            "MART, ResNet-18, CIFAR-10: MART's train_resnet.py as published",
            _MART,
        )
    )
    presets: dict[str, Preset] = {}
    for preset in base:
        plain = dataclasses.replace(
            preset,
            settings=MappingProxyType({**preset.settings, "memory": False}),
            sources=MappingProxyType({**preset.sources, "memory": ()}),
        )
        variant = dataclasses.replace(
            preset,
            name=preset.name + _MEMLOSS_SUFFIX,
            summary=preset.summary + "; + MemLoss (beta' 2, K 1)",
            settings=MappingProxyType({**preset.settings, **MEMLOSS_SETTINGS}),
            sources=MappingProxyType({**preset.sources, **{k: () for k in MEMLOSS_SETTINGS}}),
        )
        presets[plain.name] = plain
        presets[variant.name] = variant
    return presets


PRESETS: Mapping[str, Preset] = MappingProxyType(_build())
"""Every preset by name, base presets each followed by its ``+memloss`` variant."""


def list_presets() -> list[str]:
    """The preset names, each base preset followed by its ``+memloss`` variant.

    Example:
        >>> list_presets()[:2]
        ['trades-wrn-34-10-cifar10', 'trades-wrn-34-10-cifar10+memloss']
    """
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
        ValueError: No preset has that name (the message lists them).
    """
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


def resolve_preset(name: str, **overrides: Any) -> dict[str, Any]:
    """The preset's settings with ``overrides`` applied, in :data:`SETTING_KEYS` order.

    Args:
        name: A preset name (:func:`list_presets`).
        **overrides: Settings to replace or add, e.g. ``epochs=2`` or ``widen_factor=1`` for a
            quick test. A value of ``None`` for a width option means the reference's width.

    Returns:
        A new dict of settings.

    Raises:
        ValueError: An unknown preset or setting, or a width option that does not apply to the
            preset's model.

    Example:
        >>> resolve_preset("mart-resnet18-cifar10", epochs=3)["milestones"][0] == 74 / 120
        True
    """
    preset = get_preset(name)
    unknown = sorted(set(overrides) - set(SETTING_KEYS))
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; a preset takes {', '.join(SETTING_KEYS)}")
    merged = {**preset.settings, **overrides}
    model = str(merged.get("model", ""))
    if merged.get("widen_factor") is not None and not model.startswith("wrn-"):
        raise ValueError(f"widen_factor applies to the WideResNets, not to {model!r}")
    if merged.get("base_width") is not None and model.startswith("wrn-"):
        raise ValueError(f"base_width applies to the ResNets, not to {model!r}; use widen_factor")
    return {key: merged[key] for key in SETTING_KEYS if key in merged}


def train_config_kwargs(settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split resolved settings into ``TrainConfig`` keyword arguments and the rest.

    ``nesterov`` and ``schedule`` go to neither when they equal what ``TrainConfig`` derives from
    the method (its ``METHOD_RECIPES``; ``schedule`` also from ``milestones``): those are
    reproduced already. Whatever remains in the second dict is a setting ``TrainConfig`` cannot
    express: ``dataset`` (the command's ``--dataset``), and a ``nesterov`` or ``schedule`` that
    an override set against the method's recipe.

    Example:
        >>> kwargs, rest = train_config_kwargs(resolve_preset("trades-wrn-34-10-cifar10"))
        >>> kwargs["beta"], kwargs["normalization"], kwargs["augment"], sorted(rest)
        (6.0, 'identity', True, ['dataset'])
    """
    from memloss_addon.experiments.train_config import METHOD_RECIPES, TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    kwargs = {k: v for k, v in settings.items() if k in fields}
    rest = {k: v for k, v in settings.items() if k not in fields}
    method = settings.get("method")
    recipe = next((r for m, r in METHOD_RECIPES.items() if m == method), None)
    if recipe is not None:
        if rest.get("nesterov") == recipe.nesterov:
            rest.pop("nesterov")
        schedule = "piecewise" if settings.get("milestones") is not None else recipe.schedule
        if rest.get("schedule") == schedule:
            rest.pop("schedule")
    for width in ("base_width", "widen_factor"):
        if rest.get(width, 0) is None:
            rest.pop(width)
    return kwargs, rest


def _format_value(key: str, value: Any, epochs: int | None) -> str:
    if key in ("eps", "step_size") and isinstance(value, float):
        in_255 = value * 255
        if abs(in_255 - round(in_255)) < 1e-9:
            return f"{value:.6g} ({round(in_255)}/255)"
        return f"{value:g}"
    if key == "milestones" and value is not None and epochs:
        drops = ", ".join(f"{round(f * epochs) + 1}" for f in value)
        return f"{tuple(round(f, 6) for f in value)} (x0.1 from epoch {drops} of {epochs})"
    return repr(value)


def dry_run_text(name: str, **overrides: Any) -> str:
    """The resolved configuration as text: each setting, its value and the reference line.

    Example:
        >>> print(dry_run_text("trades-wrn-34-10-cifar10").splitlines()[0])  # doctest: +ELLIPSIS
        preset trades-wrn-34-10-cifar10: TRADES, WideResNet-34-10, CIFAR-10: ...
    """
    preset = get_preset(name)
    settings = resolve_preset(name, **overrides)
    epochs = settings.get("epochs")
    lines = [f"preset {preset.name}: {preset.summary}"]
    width = max(len(k) for k in settings)
    for key, value in settings.items():
        text = f"  {key:<{width}} = {_format_value(key, value, epochs)}"
        if key in overrides:
            source = "override"
        elif key in MEMLOSS_SETTINGS and preset.name.endswith(_MEMLOSS_SUFFIX):
            source = MEMLOSS_SOURCE
        elif key == "memory":
            source = "the base method alone; the +memloss variant adds the term"
        else:
            source = "; ".join(str(c) for c in preset.sources.get(key, ())) or "not a setting"
        lines.append(f"{text:<58} # {source}")
    for note in preset.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)
