"""What ``memloss train`` trains: a preset, ``--set`` and the options typed, resolved into one run.

The order, each replacing the one before: TrainConfig's defaults; the command's own defaults
(:data:`~.cli_parser.TRAIN_COMMAND_DEFAULTS`: digits, MemLoss on) or, with ``--preset NAME``,
the preset's settings (:func:`~.presets.resolve_preset`); ``--set KEY=VALUE``; the options typed.
The command's training options default to ``None``, which is how a typed option is told from one
left out. The module imports no torch (``--dry-run`` of a preset names every setting's source
without it; building the config checks the values and imports torch).

Example:
    >>> from memloss_addon.experiments.cli_parser import build_parser
    >>> args = build_parser().parse_args(
    ...     ["train", "--preset", "trades-wrn-34-10-cifar10", "--epochs", "2", "--device", "cuda"]
    ... )
    >>> request = resolve_train_request(args)
    >>> request.dataset, request.values["epochs"], request.values["eps"], request.values["device"]
    ('cifar10', 2, 0.031, 'cuda')
    >>> sorted(request.typed)
    ['device', 'epochs']
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from memloss_addon.experiments.cli_parser import DIAGNOSTICS_CURVE_SAMPLES, TRAIN_COMMAND_DEFAULTS
from memloss_addon.experiments.names import DATASET_NAMES, DatasetName
from memloss_addon.experiments.train_config import EXECUTION_FIELDS, TrainConfig

__all__ = [
    "TrainRequest",
    "default_eps",
    "dry_run_lines",
    "execution_overrides",
    "resolve_train_request",
    "typed_options",
]

_CONFIG_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrainConfig))


def default_eps(dataset: str) -> float:
    """The command's eps without a preset: 0.15 on digits (robust accuracy near 65%, where methods
    can differ), 8/255 (CIFAR's) otherwise."""
    return 0.15 if dataset == "digits" else 8 / 255


@dataclass(frozen=True)
class TrainRequest:
    """A resolved ``memloss train``.

    Attributes:
        values: TrainConfig keyword arguments.
        dataset: The dataset to load.
        preset: The preset's name, or ``None``.
        preset_overrides: The preset settings replaced by ``--set`` or typed options.
        typed: The options typed (TrainConfig fields and ``dataset``) with their values.
        sets: What ``--set`` gave.
    """

    values: dict[str, Any]
    dataset: DatasetName
    preset: str | None = None
    preset_overrides: dict[str, Any] = field(default_factory=dict)
    typed: dict[str, Any] = field(default_factory=dict)
    sets: dict[str, Any] = field(default_factory=dict)

    def config(self) -> TrainConfig:
        """The TrainConfig (imports torch to check the values).

        Raises:
            TypeError, ValueError: A value of the wrong type or out of range.
        """
        return TrainConfig(**self.values)


def typed_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training options given on the command line: TrainConfig fields and ``dataset``."""
    typed = {
        name: value
        for name, value in vars(args).items()
        if (name in _CONFIG_FIELDS or name == "dataset") and value is not None
    }
    if "milestones" in typed:
        typed["milestones"] = tuple(typed["milestones"])
    return typed


def execution_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The typed options a resumed run may change (:data:`~.train_config.EXECUTION_FIELDS`)."""
    return {k: v for k, v in typed_options(args).items() if k in EXECUTION_FIELDS}


def resolve_train_request(args: argparse.Namespace) -> TrainRequest:
    """Resolve the parsed ``memloss train`` arguments into what to train.

    Raises:
        ValueError: An unknown preset or setting, a setting that does not apply (e.g.
            ``widen_factor`` of a ResNet), no ``--method`` without a preset, or a ``nesterov`` or
            ``schedule`` that the method's recipe cannot give.
    """
    from memloss_addon.experiments.preset_commands import parse_setting
    from memloss_addon.experiments.presets import (
        SETTING_KEYS,
        resolve_preset,
        train_config_kwargs,
    )

    typed = typed_options(args)
    sets = dict(parse_setting(item) for item in getattr(args, "set", None) or [])
    if "milestones" in sets and isinstance(sets["milestones"], list):
        sets["milestones"] = tuple(sets["milestones"])
    known = set(_CONFIG_FIELDS) | set(SETTING_KEYS)
    unknown = sorted(set(sets) - known)
    if unknown:
        choices = ", ".join(sorted(known))
        raise ValueError(f"unknown setting(s) {unknown} in --set; choose among: {choices}")
    merged = {**sets, **typed}
    if args.preset is None:
        inexpressible = sorted(set(merged) - set(_CONFIG_FIELDS) - {"dataset"})
        if inexpressible:
            raise ValueError(
                f"{', '.join(inexpressible)} follow(s) from the method's recipe; set them "
                "through a --preset that has them"
            )
        values = {**TRAIN_COMMAND_DEFAULTS, **merged}
        dataset = str(values.pop("dataset"))
        if "method" not in values:
            raise ValueError("--method is required (or pass --preset NAME or --resume CHECKPOINT)")
        values.setdefault("eps", default_eps(dataset))
        overrides: dict[str, Any] = {}
    else:
        overrides = {k: v for k, v in merged.items() if k in SETTING_KEYS}
        settings = resolve_preset(args.preset, **overrides)
        values, rest = train_config_kwargs(settings)
        dataset = str(rest.pop("dataset"))
        if rest:
            method = values["method"]
            raise ValueError(
                f"{', '.join(f'{k}={v!r}' for k, v in rest.items())} is not what {method} trains "
                f"with here (nesterov and the schedule follow from the method)"
            )
        values.update({k: v for k, v in merged.items() if k not in SETTING_KEYS})
    if dataset not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASET_NAMES)}")
    name = next(d for d in DATASET_NAMES if d == dataset)
    if values.get("curve_samples") is None and values.get("diagnostics"):
        values["curve_samples"] = DIAGNOSTICS_CURVE_SAMPLES
    return TrainRequest(
        values=values,
        dataset=name,
        preset=args.preset,
        preset_overrides=overrides,
        typed=typed,
        sets=sets,
    )


def dry_run_lines(request: TrainRequest, config: TrainConfig, *, data_dir: str) -> list[str]:
    """The resolved configuration as text: the preset's settings with their sources (when a
    preset is given), then every other field of the run with where its value comes from."""
    from memloss_addon.experiments.presets import SETTING_KEYS, dry_run_text

    lines: list[str] = []
    shown: set[str] = set()
    if request.preset is not None:
        lines.extend(dry_run_text(request.preset, **request.preset_overrides).splitlines())
        shown = set(SETTING_KEYS)
        lines.append("the run's other settings:")
    else:
        lines.append(f"dataset {request.dataset}, no preset:")
    values = config.to_dict()
    names = [k for k in values if k not in shown]
    width = max(len(k) for k in names)
    for key in names:
        if key in request.typed:
            source = "typed"
        elif key in request.sets:
            source = "--set"
        elif key in TRAIN_COMMAND_DEFAULTS or (key == "eps" and request.preset is None):
            source = "the command's default"
        else:
            source = "default"
        text = f"  {key:<{width}} = {values[key]!r}"
        lines.append(f"{text:<58} # {source}")
    lines.append(
        f"data: {request.dataset}"
        + (f" from {data_dir}" if request.dataset in ("cifar10", "cifar100", "svhn") else "")
        + f"; training set on the device: {config.resolved_device_data}"
    )
    return lines
