"""Runs an upstream training script on a CPU-only machine with small stand-ins.

Only what the machine lacks is replaced, the same way for the patched and the unpatched run:

- ``--fake-data``: torchvision's CIFAR-10/100 and SVHN integrity checks accept the stand-ins
  written by ``make_fake_cifar10.py`` (their files cannot match the real checksums, and there is
  no network);
- ``--tiny-model REPO``: the repository's model (a WideResNet, ResNet-18 or PreAct ResNet-18, far
  too slow for a shared CPU) is swapped for a small convolutional network with BatchNorm;
- ``--cuda-to-cpu``: for the *unpatched* scripts only, ``.cuda()`` and ``.to("cuda")`` stay on the
  CPU (the patched scripts run on the CPU without it);
- ``--pandas-append``: ``DataFrame.append`` (removed in pandas 2, used by HAT) as ``pd.concat``;
- ``--stub MODULE``: an importable placeholder for a package the training path never uses
  (HAT imports ``robustness`` for ImageNet-100 and ``autoattack`` for APGD at start-up);
- ``--stop-after-epochs N``: ends the run after N epochs, for scripts whose epoch count also
  selects their learning-rate schedule (ST-AT accepts only 80 or 120);
- ``--progress-bar``: a stand-in for the ``progress`` package's ``Bar`` (used by AWP's TRADES
  script) that prints each step's suffix (its running loss) on a line of its own;
- ``--accuracy-reshape``: AWP's TRADES script's ``utils.accuracy`` with ``.reshape(-1)`` where it
  calls ``.view(-1)`` on a non-contiguous tensor, which current PyTorch refuses (same values).

Usage: python run_with_standins.py [options] -- SCRIPT [SCRIPT ARGS...]
(run from the repository checkout; SCRIPT's folder goes first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import runpy
import sys
import types
from typing import Any

import torch
from torch import nn


class TinyNet(nn.Module):
    """Two strided convolutions with BatchNorm, global pooling and a linear head."""

    def __init__(self, num_classes: int = 10, **_: Any) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _tiny(*_: Any, num_classes: int = 10, **__: Any) -> TinyNet:
    return TinyNet(num_classes=num_classes)


def _tiny_hat(name: str, normalize: bool, info: dict, device: torch.device) -> TinyNet:
    return TinyNet(num_classes=info["num_classes"]).to(device)


# module, attribute, replacement: read by the scripts' ``from ... import *`` / ``import``.
_MODEL_SWAPS = {
    "trades": [("models.wideresnet", "WideResNet", _tiny)],
    "mart": [("wideresnet", "WideResNet", _tiny), ("resnet", "ResNet18", _tiny)],
    "st": [("models.resnet", "ResNet18", _tiny)],
    "hat": [("core.models", "create_model", _tiny_hat)],
    # robust_overfitting and AWP's AT script (run from AT_AWP/): the PreAct ResNet-18.
    "preact": [("preactresnet", "PreActResNet18", _tiny)],
    # AWP's TRADES script (run from trades_AWP/): models.WideResNet34 by its --arch default.
    "awp-trades": [("models", "WideResNet34", _tiny)],
}


def _accept_fake_data() -> None:
    from torchvision.datasets import cifar, svhn, utils

    # SVHN's download() goes through download_url, which checks the file in datasets.utils.
    for module in (cifar, svhn, utils):
        module.check_integrity = lambda *args, **kwargs: True  # type: ignore[attr-defined]


def _swap_models(repo: str) -> None:
    for module_name, attribute, replacement in _MODEL_SWAPS[repo]:
        module = importlib.import_module(module_name)
        setattr(module, attribute, replacement)


def _cuda_to_cpu() -> None:
    def cpu(device: Any) -> Any:
        if isinstance(device, torch.device | str) and torch.device(device).type == "cuda":
            return torch.device("cpu")
        return device

    tensor_to, module_to = torch.Tensor.to, nn.Module.to

    def tensor_to_cpu(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple(cpu(arg) for arg in args)
        if "device" in kwargs:
            kwargs["device"] = cpu(kwargs["device"])
        return tensor_to(self, *args, **kwargs)

    def module_to_cpu(self: nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
        args = tuple(cpu(arg) for arg in args)
        if "device" in kwargs:
            kwargs["device"] = cpu(kwargs["device"])
        return module_to(self, *args, **kwargs)

    torch.Tensor.to = tensor_to_cpu  # type: ignore[method-assign]
    nn.Module.to = module_to_cpu  # type: ignore[method-assign]
    torch.Tensor.cuda = lambda self, *args, **kwargs: self  # type: ignore[method-assign]


def _pandas_append() -> None:
    import pandas as pd

    def append(self: pd.DataFrame, other: pd.DataFrame, ignore_index: bool = False):
        return pd.concat([self, other], ignore_index=ignore_index)

    pd.DataFrame.append = append  # type: ignore[attr-defined]


def _stub(module_name: str) -> None:
    class Unavailable:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError(f"{module_name} is a stand-in; this code path needs the package")

    parts = module_name.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        module = sys.modules.setdefault(name, types.ModuleType(name))
        if depth > 1:
            setattr(sys.modules[".".join(parts[: depth - 1])], parts[depth - 1], module)
    sys.modules[module_name].__getattr__ = lambda attribute: Unavailable  # type: ignore[attr-defined]


def _progress_bar() -> None:
    class Bar:
        """Prints ``message suffix`` at every ``next()``; times are left out (constant)."""

        elapsed_td = eta_td = "-"

        def __init__(self, message: str = "", max: int = 100, **_: Any) -> None:
            self.message, self.max, self.index, self.suffix = message, max, 0, ""

        def next(self) -> None:
            self.index += 1
            print(f"{self.message} {self.suffix}", flush=True)

        def finish(self) -> None:
            pass

    package = sys.modules.setdefault("progress", types.ModuleType("progress"))
    module = types.ModuleType("progress.bar")
    module.Bar = Bar  # type: ignore[attr-defined]
    package.bar = module  # type: ignore[attr-defined]
    sys.modules["progress.bar"] = module


def _accuracy_reshape() -> None:
    utils = importlib.import_module("utils")

    def accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple = (1,)) -> list:
        _, pred = output.topk(max(topk), 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0).mul_(100.0 / target.size(0)) for k in topk]

    utils.accuracy = accuracy


def _stop_after(epochs: int, module_name: str, function_name: str) -> None:
    module = importlib.import_module(module_name)
    original = getattr(module, function_name)

    def guarded(*args: Any, **kwargs: Any) -> Any:
        epoch = kwargs.get("epoch", args[2] if len(args) > 2 else None)
        if epoch is not None and epoch > epochs:
            raise SystemExit(0)
        return original(*args, **kwargs)

    setattr(module, function_name, guarded)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fake-data", action="store_true")
    parser.add_argument("--tiny-model", choices=sorted(_MODEL_SWAPS))
    parser.add_argument("--cuda-to-cpu", action="store_true")
    parser.add_argument("--pandas-append", action="store_true")
    parser.add_argument("--stub", action="append", default=[], metavar="MODULE")
    parser.add_argument(
        "--stop-after-epochs",
        type=int,
        default=None,
        help="ST-AT only: stop when adjust_learning_rate sees a later epoch",
    )
    parser.add_argument("--progress-bar", action="store_true")
    parser.add_argument("--accuracy-reshape", action="store_true")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()

    script = os.path.abspath(args.script)
    sys.path.insert(0, os.path.dirname(script))
    if args.fake_data:
        _accept_fake_data()
    if args.cuda_to_cpu:
        _cuda_to_cpu()
    if args.pandas_append:
        _pandas_append()
    for module_name in args.stub:
        _stub(module_name)
    if args.progress_bar:
        _progress_bar()
    if args.accuracy_reshape:
        _accuracy_reshape()
    if args.tiny_model:
        _swap_models(args.tiny_model)
    if args.stop_after_epochs is not None:
        _stop_after(args.stop_after_epochs, "utils", "adjust_learning_rate")
    sys.argv = [script, *args.script_args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
