"""The ``memloss`` command's models: small ones for CPUs and the paper-scale architectures.

The small models (an MLP and a CNN for 8x8 digits, a narrow ResNet for 32x32) all use BatchNorm,
because how the memory's extra forward pass treats BatchNorm statistics (``bn_mode``) is part of
what the command lets users compare. Inputs are expected in ``[0, 1]``; they have no
normalisation layer, so attacks and the memory work in pixel units.

The paper-scale architectures (``resnet18``, ``preact-resnet18``, ``wrn-34-10``, ``wrn-28-10``)
are those of :mod:`~memloss_addon.experiments.architectures`; they normalise their inputs inside
the model, so attacks and the memory still work in pixel units.
"""

from __future__ import annotations

import torch
from torch import nn

from memloss_addon.experiments.architectures import (
    ARCHITECTURE_NAMES,
    ArchitectureName,
    NormalizationSpec,
    build_architecture,
    count_parameters,
)
from memloss_addon.experiments.names import MODEL_NAMES, ModelName

__all__ = [
    "ALL_MODEL_NAMES",
    "MODEL_NAMES",
    "MODEL_REFERENCES",
    "AnyModelName",
    "ModelName",
    "DigitsCNN",
    "DigitsMLP",
    "SmallResNet",
    "build_model",
    "default_model",
    "describe_models",
]

AnyModelName = ModelName | ArchitectureName
"""The small models' names and the paper-scale architectures'."""

ALL_MODEL_NAMES: tuple[str, ...] = tuple(dict.fromkeys((*MODEL_NAMES, *ARCHITECTURE_NAMES)))
"""Every name :func:`build_model` accepts."""

MODEL_REFERENCES: dict[str, str] = {
    "digits-mlp": "this library (8x8 digits)",
    "digits-cnn": "this library (8x8 digits)",
    "small-resnet": "this library (narrow, for CPUs)",
    "resnet18": "TRADES 6e8e11b models/resnet.py (= HAT, MART)",
    "preact-resnet18": "robust_overfitting c47a25c preactresnet.py (= HAT)",
    "wrn-34-10": "TRADES 6e8e11b models/wideresnet.py, no sub_block1 (= robust_overfitting, HAT)",
    "wrn-28-10": "HAT 3177a4f core/models/wideresnet.py",
}
"""Where each model's definition comes from, for ``memloss models``."""


def _conv_bn_relu(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


class DigitsCNN(nn.Module):
    """Two-convolution network for 8x8 images; trains in seconds on a CPU.

    Layout: conv(16) -> max-pool to 4x4 -> conv(32) -> max-pool to 2x2 -> linear(128)
    -> linear(num_classes), each convolution followed by BatchNorm and ReLU (about 23k
    parameters).

    Args:
        in_channels: Input channels (default: 1).
        num_classes: Output classes (default: 10).

    Example:
        >>> DigitsCNN()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, *, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            _conv_bn_relu(in_channels, 16),
            nn.MaxPool2d(2),
            _conv_bn_relu(16, 32),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * 2 * 2, 128),
            nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsMLP(nn.Module):
    """Two hidden layers of 256 units with BatchNorm for 8x8 images; the fastest model here.

    On a CPU one training step costs about a quarter of :class:`DigitsCNN`'s, which is what
    lets ``memloss compare`` train dozens of adversarial models and run AutoAttack on each within
    minutes.

    Args:
        in_features: Input size, e.g. 64 for 1x8x8 images (default: 64).
        num_classes: Output classes (default: 10).
        hidden: Width of the hidden layers (default: 256).

    Example:
        >>> DigitsMLP()(torch.zeros(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, *, in_features: int = 64, num_classes: int = 10, hidden: int = 256) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A narrow ResNet for 32x32 images: a stem and one basic block per stage.

    With the default widths (16, 32, 64) it has about 78k parameters: far from ResNet-18's
    accuracy, but quick enough to time MemLoss on CIFAR-shaped data on a CPU.

    Args:
        in_channels: Input channels (default: 3).
        num_classes: Output classes (default: 10).
        widths: Channels of the three stages; stages 2 and 3 halve the resolution
            (default: ``(16, 32, 64)``).

    Raises:
        ValueError: If ``widths`` does not hold three positive integers.

    Example:
        >>> SmallResNet()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        widths: tuple[int, int, int] = (16, 32, 64),
    ) -> None:
        super().__init__()
        if len(widths) != 3 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be three positive integers, got {widths!r}")
        self.stem = _conv_bn_relu(in_channels, widths[0])
        self.stages = nn.Sequential(
            _BasicBlock(widths[0], widths[0], stride=1),
            _BasicBlock(widths[0], widths[1], stride=2),
            _BasicBlock(widths[1], widths[2], stride=2),
        )
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[2], num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def build_model(
    name: AnyModelName,
    *,
    sample_shape: tuple[int, int, int],
    num_classes: int,
    normalization: NormalizationSpec = "cifar10",
    base_width: int | None = None,
    widen_factor: int | None = None,
) -> nn.Module:
    """Build a model by name.

    Args:
        name: One of :data:`ALL_MODEL_NAMES`: ``"digits-mlp"``, ``"digits-cnn"``,
            ``"small-resnet"``, or a paper-scale architecture (``"resnet18"``,
            ``"preact-resnet18"``, ``"wrn-34-10"``, ``"wrn-28-10"``).
        sample_shape: Shape ``(C, H, W)`` of one input.
        num_classes: Output classes.
        normalization: The paper-scale architectures' input normalization (default:
            ``"cifar10"``; ``None`` or ``"identity"`` for none, as TRADES, MART and HAT train).
            The small models have none and ignore it.
        base_width: The ResNets' first-stage width (``None``: 64, the reference's).
        widen_factor: The WideResNets' width factor (``None``: 10).

    Returns:
        A freshly initialised model (draws from the global torch RNG; seed it first).

    Raises:
        ValueError: If ``name`` is unknown, or a width option does not apply to it.

    Example:
        >>> type(build_model("digits-cnn", sample_shape=(1, 8, 8), num_classes=10)).__name__
        'DigitsCNN'
        >>> build_model("wrn-34-10", sample_shape=(3, 32, 32), num_classes=100,
        ...             widen_factor=1).fc.out_features
        100
    """
    in_channels = sample_shape[0]
    if name in ARCHITECTURE_NAMES:
        return build_architecture(
            name,
            num_classes=num_classes,
            normalization=normalization,
            base_width=base_width,
            widen_factor=widen_factor,
            in_channels=in_channels,
        )
    if base_width is not None or widen_factor is not None:
        raise ValueError(f"width options apply to the paper-scale architectures, not to {name!r}")
    if name == "digits-mlp":
        features = 1
        for size in sample_shape:
            features *= int(size)
        return DigitsMLP(in_features=features, num_classes=num_classes)
    if name == "digits-cnn":
        return DigitsCNN(in_channels=in_channels, num_classes=num_classes)
    if name == "small-resnet":
        return SmallResNet(in_channels=in_channels, num_classes=num_classes)
    raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ALL_MODEL_NAMES)}")


def describe_models(num_classes: int = 10) -> list[tuple[str, int]]:
    """Every model's name and parameter count for ``num_classes`` classes.

    The digits models are counted for 1x8x8 inputs, the others for 3x32x32. Models are built on
    PyTorch's ``meta`` device: nothing is allocated and no random number is drawn.

    Example:
        >>> dict(describe_models())["wrn-34-10"]
        46160474
    """
    counts = []
    for name in ALL_MODEL_NAMES:
        shape = (1, 8, 8) if name.startswith("digits-") else (3, 32, 32)
        with torch.device("meta"):
            model = build_model(name, sample_shape=shape, num_classes=num_classes)  # type: ignore[arg-type]
        counts.append((name, count_parameters(model)))
    return counts


def default_model(sample_shape: tuple[int, int, int]) -> ModelName:
    """The default model for images of ``sample_shape``: the MLP for 8x8, the ResNet otherwise.

    The MLP is the 8x8 default because AutoAttack's cost is dominated by per-iteration overhead,
    which the MLP keeps lowest; the CNN is there for users who want convolutions.

    Example:
        >>> default_model((1, 8, 8)), default_model((3, 32, 32))
        ('digits-mlp', 'small-resnet')
    """
    return "digits-mlp" if tuple(sample_shape[1:]) == (8, 8) else "small-resnet"
