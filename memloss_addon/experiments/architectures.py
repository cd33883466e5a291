"""The paper-scale architectures for 32x32 images: ResNet-18, PreAct ResNet-18, WideResNet-34/28-10.

Each one reproduces, layer for layer, a definition of the reference repositories that published
the baselines (parameter counts and published checkpoints therefore match):

=================== ==================================================================
name                reference definition
=================== ==================================================================
``resnet18``        TRADES 6e8e11b ``models/resnet.py`` (``ResNet18``); identical in
                    HAT 3177a4f ``core/models/resnet.py`` and MART 2d83e17 ``resnet.py``
``preact-resnet18`` robust_overfitting c47a25c ``preactresnet.py`` (``PreActResNet18``);
                    identical in HAT ``core/models/preact_resnet.py``
``wrn-34-10``       TRADES ``models/wideresnet.py`` (``WideResNet()``) without its unused
                    ``sub_block1``; identical to robust_overfitting ``wideresnet.py`` and
                    HAT ``core/models/wideresnet.py`` (``wideresnet("wrn-34-10")``)
``wrn-28-10``       HAT ``core/models/wideresnet.py`` (``wideresnet("wrn-28-10")``)
=================== ==================================================================

The code here is written anew: module names differ from the references' (``stem_conv``,
``stages``, ``final_bn``, ``fc``); :mod:`memloss_addon.experiments.reference_weights` maps the
references' state-dict keys onto these.

Differences from the references, none of which changes the function computed for 32x32 inputs:

- **Input normalization inside the model.** Inputs are in ``[0, 1]``; the first module is
  :class:`InputNormalization` with a mean and std per channel (default: CIFAR-10's, as
  robust_overfitting ``utils.py`` lines 17-18 give them) or none (``normalization=None``, the
  identity: TRADES, MART and HAT's default train on unnormalized inputs). Mean and std are
  non-persistent buffers: they follow ``.to()`` but are not in the state dict.
- **Global average pooling** is ``adaptive_avg_pool2d(1)`` where the references pool with a
  fixed window (4 for the ResNets, 8 for the WideResNets), the same for 32x32 inputs; other sizes
  work too.
- **TRADES' ``sub_block1``** (a second copy of the first WideResNet stage that its forward pass
  never calls; 2,102,112 parameters at width 10) is not kept. Loading a TRADES or MART checkpoint
  drops its keys.
- **Width options** for tests: ``base_width`` (ResNets, 64 in the references) and
  ``widen_factor`` (WideResNets, 10), plus any ``depth`` with ``(depth - 4) % 6 == 0``.

Example:
    >>> model = build_architecture("preact-resnet18", num_classes=10)
    >>> model(torch.rand(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> count_parameters(build_architecture("resnet18", num_classes=10, base_width=8))
    176402
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from memloss_addon.checks import positive_int

__all__ = [
    "ARCHITECTURE_NAMES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "NORMALIZATIONS",
    "ArchitectureName",
    "InputNormalization",
    "NormalizationSpec",
    "PreActResNet18",
    "ResNet18",
    "WideResNet",
    "build_architecture",
    "count_parameters",
    "reference_name",
    "resolve_normalization",
]

ArchitectureName = Literal["resnet18", "preact-resnet18", "wrn-34-10", "wrn-28-10"]
"""The paper-scale architectures, named as HAT's ``core/models/__init__.py`` names them."""

ARCHITECTURE_NAMES: tuple[ArchitectureName, ...] = get_args(ArchitectureName)

CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""CIFAR-10's per-channel mean (robust_overfitting c47a25c ``utils.py`` line 17)."""

CIFAR10_STD: tuple[float, float, float] = (0.2471, 0.2435, 0.2616)
"""CIFAR-10's per-channel std (robust_overfitting c47a25c ``utils.py`` line 18)."""

_Pair = tuple[tuple[float, ...], tuple[float, ...]]

NORMALIZATIONS: dict[str, _Pair | None] = {
    # robust_overfitting c47a25c utils.py lines 17-18 (train_cifar.py normalizes with these)
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    # HAT 3177a4f core/data/cifar10.py DATA_DESC (used when HAT's --normalize is true)
    "cifar10-hat": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    # robust_overfitting c47a25c train_cifar100.py lines 20-21
    "cifar100": (
        (0.5070751592371323, 0.48654887331495095, 0.4409178433670343),
        (0.2673342858792401, 0.2564384629170883, 0.27615047132568404),
    ),
    # robust_overfitting c47a25c train_svhn.py lines 19-20
    "svhn": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # TRADES, MART and HAT (--normalize false, its default) feed [0, 1] inputs unchanged
    "identity": None,
}
"""Named input normalizations: ``(mean, std)`` per channel, or ``None`` for the identity."""

NormalizationSpec = str | tuple[Sequence[float], Sequence[float]] | None
"""A name of :data:`NORMALIZATIONS`, a ``(mean, std)`` pair, or ``None`` (the identity)."""


def resolve_normalization(spec: NormalizationSpec) -> _Pair | None:
    """The ``(mean, std)`` pair of ``spec``, or ``None`` for the identity.

    Raises:
        ValueError: An unknown name, mean and std of different lengths, or a std that is not
            positive.
        TypeError: ``spec`` is neither a name, a pair nor ``None``.

    Example:
        >>> resolve_normalization("svhn")
        ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        >>> resolve_normalization("identity") is None, resolve_normalization(None) is None
        (True, True)
    """
    if spec is None:
        return None
    if isinstance(spec, str):
        if spec not in NORMALIZATIONS:
            raise ValueError(
                f"unknown normalization {spec!r}; choose one of {', '.join(NORMALIZATIONS)}"
            )
        return NORMALIZATIONS[spec]
    if not isinstance(spec, (tuple, list)) or len(spec) != 2:
        raise TypeError(f"normalization must be a name, a (mean, std) pair or None, got {spec!r}")
    mean = tuple(float(v) for v in spec[0])
    std = tuple(float(v) for v in spec[1])
    if len(mean) != len(std) or not mean:
        raise ValueError(f"mean and std must have the same positive length, got {spec!r}")
    if any(not s > 0 for s in std):
        raise ValueError(f"std must be positive, got {std!r}")
    return mean, std


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, or the identity; holds no state-dict entries.

    Args:
        normalization: See :data:`NormalizationSpec` (default: ``"cifar10"``).

    Example:
        >>> InputNormalization(((0.5,), (0.25,)))(torch.ones(1, 1, 2, 2)).flatten().tolist()
        [2.0, 2.0, 2.0, 2.0]
        >>> InputNormalization(None).pair is None
        True
    """

    mean: torch.Tensor | None
    std: torch.Tensor | None

    def __init__(self, normalization: NormalizationSpec = "cifar10") -> None:
        super().__init__()
        self.pair = resolve_normalization(normalization)
        if self.pair is None:
            self.register_buffer("mean", None, persistent=False)
            self.register_buffer("std", None, persistent=False)
        else:
            mean, std = self.pair
            self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None or self.std is None:
            return x
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

    def extra_repr(self) -> str:
        if self.pair is None:
            return "identity"
        return f"mean={self.pair[0]}, std={self.pair[1]}"


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


class _Projection(nn.Module):
    """1x1 strided convolution and BatchNorm: the post-activation ResNet's downsampling path."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class _PostActBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU (He et al. 2016, the CIFAR variant)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: _Projection | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = _Projection(in_channels, out_channels, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out)


class _PreActBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus the shortcut (He et al. 2016, identity mappings).

    The shortcut is the identity, or a 1x1 strided convolution of the *activated* input where the
    shape changes. This is also the WideResNet block of the references (``BasicBlock`` with
    ``equalInOut``; its ``dropRate`` is 0 in every reference setting and not offered here).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.shortcut: nn.Conv2d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        residual = x if self.shortcut is None else self.shortcut(activated)
        out = self.conv2(F.relu(self.bn2(self.conv1(activated))))
        return out + residual


def _stage(
    block: type[_PostActBlock] | type[_PreActBlock],
    in_channels: int,
    out_channels: int,
    blocks: int,
    stride: int,
) -> nn.Sequential:
    layers = [block(in_channels, out_channels, stride)]
    layers += [block(out_channels, out_channels, 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 images (TRADES 6e8e11b ``models/resnet.py``, ``ResNet18()``).

    A 3x3 stem (conv, BN, ReLU) and four stages of two post-activation basic blocks with
    ``base_width`` x (1, 2, 4, 8) channels, stages 2-4 halving the resolution, then global
    average pooling and a linear layer. 11,173,962 parameters for 10 classes.

    Args:
        num_classes: Output classes (default: 10).
        normalization: Input normalization, see :data:`NormalizationSpec` (default:
            ``"cifar10"``; ``None`` for the TRADES, MART and HAT settings).
        base_width: Channels of the first stage (default: 64, the reference's).
        in_channels: Input channels (default: 3).

    Example:
        >>> ResNet18(base_width=4)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        normalization: NormalizationSpec = "cifar10",
        base_width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        w = positive_int("base_width", base_width)
        self.normalize = InputNormalization(normalization)
        self.stem_conv = _conv3x3(positive_int("in_channels", in_channels), w)
        self.stem_bn = nn.BatchNorm2d(w)
        widths = (w, 2 * w, 4 * w, 8 * w)
        self.stages = nn.Sequential(
            *(
                _stage(_PostActBlock, widths[max(i - 1, 0)], widths[i], 2, 1 if i == 0 else 2)
                for i in range(4)
            )
        )
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.stem_bn(self.stem_conv(self.normalize(x))))
        out = self.stages(out)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class PreActResNet18(nn.Module):
    """Pre-activation ResNet-18 (robust_overfitting c47a25c ``preactresnet.py``).

    A bare 3x3 stem convolution, four stages of two pre-activation blocks with ``base_width`` x
    (1, 2, 4, 8) channels, then BN, ReLU, global average pooling and a linear layer. 11,172,170
    parameters for 10 classes.

    Args:
        num_classes: Output classes (default: 10).
        normalization: Input normalization (default: ``"cifar10"``, robust_overfitting's).
        base_width: Channels of the first stage (default: 64).
        in_channels: Input channels (default: 3).

    Example:
        >>> PreActResNet18(base_width=4)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        num_classes: int = 10,
        normalization: NormalizationSpec = "cifar10",
        base_width: int = 64,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        w = positive_int("base_width", base_width)
        self.normalize = InputNormalization(normalization)
        self.stem_conv = _conv3x3(positive_int("in_channels", in_channels), w)
        widths = (w, 2 * w, 4 * w, 8 * w)
        self.stages = nn.Sequential(
            *(
                _stage(_PreActBlock, widths[max(i - 1, 0)], widths[i], 2, 1 if i == 0 else 2)
                for i in range(4)
            )
        )
        self.final_bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem_conv(self.normalize(x)))
        out = F.relu(self.final_bn(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


class WideResNet(nn.Module):
    """WideResNet-depth-k (Zagoruyko and Komodakis 2016) as TRADES, robust_overfitting and HAT
    define it (TRADES 6e8e11b ``models/wideresnet.py``, without ``sub_block1``).

    A 3x3 stem convolution with 16 channels, three stages of ``(depth - 4) / 6`` pre-activation
    blocks with 16k, 32k and 64k channels (stages 2 and 3 halve the resolution), then BN, ReLU,
    global average pooling and a linear layer (with bias, initialised to 0). Convolutions are
    initialised from N(0, 2 / (k * k * out_channels)), BatchNorm to (1, 0), as in the references.
    WRN-34-10: 46,160,474 parameters for 10 classes; WRN-28-10: 36,479,194.

    Args:
        depth: Total depth, ``6n + 4`` (default: 34).
        widen_factor: Width multiplier k (default: 10).
        num_classes: Output classes (default: 10).
        normalization: Input normalization (default: ``"cifar10"``; ``None`` for TRADES' and
            HAT's settings).
        in_channels: Input channels (default: 3).

    Raises:
        ValueError: If ``depth`` is not ``6n + 4`` with ``n >= 1``.

    Example:
        >>> WideResNet(depth=10, widen_factor=1)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        normalization: NormalizationSpec = "cifar10",
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        positive_int("num_classes", num_classes)
        k = positive_int("widen_factor", widen_factor)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth!r}")
        blocks = (depth - 4) // 6
        self.normalize = InputNormalization(normalization)
        self.stem_conv = _conv3x3(positive_int("in_channels", in_channels), 16)
        widths = (16, 16 * k, 32 * k, 64 * k)
        self.stages = nn.Sequential(
            *(
                _stage(_PreActBlock, widths[i], widths[i + 1], blocks, 1 if i == 0 else 2)
                for i in range(3)
            )
        )
        self.final_bn = nn.BatchNorm2d(widths[-1])
        self.fc = nn.Linear(widths[-1], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stages(self.stem_conv(self.normalize(x)))
        out = F.relu(self.final_bn(out))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def build_architecture(
    name: ArchitectureName,
    *,
    num_classes: int = 10,
    normalization: NormalizationSpec = "cifar10",
    base_width: int | None = None,
    widen_factor: int | None = None,
    in_channels: int = 3,
) -> nn.Module:
    """Build one of :data:`ARCHITECTURE_NAMES`.

    Args:
        name: ``"resnet18"``, ``"preact-resnet18"``, ``"wrn-34-10"`` or ``"wrn-28-10"``.
        num_classes: Output classes (default: 10).
        normalization: Input normalization (default: ``"cifar10"``).
        base_width: The ResNets' first-stage width (``None``: 64, the reference's).
        widen_factor: The WideResNets' k (``None``: 10, as in the name).
        in_channels: Input channels (default: 3).

    Raises:
        ValueError: An unknown name, or a width option that does not apply to the architecture.

    Example:
        >>> type(build_architecture("wrn-28-10", widen_factor=1)).__name__
        'WideResNet'
    """
    if name in ("resnet18", "preact-resnet18"):
        if widen_factor is not None:
            raise ValueError(f"widen_factor applies to the WideResNets, not to {name!r}")
        cls = ResNet18 if name == "resnet18" else PreActResNet18
        return cls(
            num_classes=num_classes,
            normalization=normalization,
            base_width=64 if base_width is None else base_width,
            in_channels=in_channels,
        )
    match = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if match is not None and name in ARCHITECTURE_NAMES:
        if base_width is not None:
            raise ValueError(
                f"base_width applies to the ResNets, not to {name!r}; use widen_factor"
            )
        return WideResNet(
            depth=int(match.group(1)),
            widen_factor=int(match.group(2)) if widen_factor is None else widen_factor,
            num_classes=num_classes,
            normalization=normalization,
            in_channels=in_channels,
        )
    raise ValueError(
        f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURE_NAMES)}"
    )


def count_parameters(model: nn.Module) -> int:
    """The number of parameters (buffers such as BatchNorm statistics not counted).

    Example:
        >>> count_parameters(nn.Linear(3, 2))
        8
    """
    return sum(p.numel() for p in model.parameters())


# Our state-dict key -> the references' key, per architecture family: ordered (pattern,
# replacement) rules for re.sub, applied in turn. Block internals (conv1, bn1, conv2, bn2) keep
# their names in every reference.
_RESNET_RULES: tuple[tuple[str, str], ...] = (
    (r"^stem_conv\.", "conv1."),
    (r"^stem_bn\.", "bn1."),
    (r"\.shortcut\.conv\.", ".shortcut.0."),
    (r"\.shortcut\.bn\.", ".shortcut.1."),
    (r"^fc\.", "linear."),
)
_PREACT_RULES: tuple[tuple[str, str], ...] = (
    (r"^stem_conv\.", "conv1."),
    (r"\.shortcut\.(weight)$", r".shortcut.0.\1"),
    (r"^final_bn\.", "bn."),
    (r"^fc\.", "linear."),
)
_WRN_RULES: tuple[tuple[str, str], ...] = (
    (r"^stem_conv\.", "conv1."),
    (r"\.shortcut\.(weight)$", r".convShortcut.\1"),
    (r"^final_bn\.", "bn1."),
)


def reference_name(model: nn.Module, key: str) -> str:
    """The references' state-dict key for ``model``'s ``key`` (no ``module.`` prefix).

    Stages are ``layer1``-``layer4`` in the ResNets (TRADES ``models/resnet.py``,
    robust_overfitting ``preactresnet.py``) and ``block1.layer``-``block3.layer`` in the
    WideResNets (TRADES ``models/wideresnet.py``).

    Raises:
        TypeError: ``model`` is not one of this module's architectures.

    Example:
        >>> reference_name(ResNet18(base_width=4), "stages.1.0.shortcut.bn.weight")
        'layer2.0.shortcut.1.weight'
        >>> reference_name(WideResNet(depth=10, widen_factor=1), "stages.2.0.shortcut.weight")
        'block3.layer.0.convShortcut.weight'
    """
    if isinstance(model, ResNet18):
        rules, stage = _RESNET_RULES, r"layer{}."
    elif isinstance(model, PreActResNet18):
        rules, stage = _PREACT_RULES, r"layer{}."
    elif isinstance(model, WideResNet):
        rules, stage = _WRN_RULES, r"block{}.layer."
    else:
        raise TypeError(f"no reference naming for {type(model).__name__}")
    match = re.match(r"^stages\.(\d+)\.", key)
    if match is not None:
        key = stage.format(int(match.group(1)) + 1) + key[match.end() :]
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key
