"""The ``memloss models`` and ``memloss presets`` subcommands, self-contained.

The command registers them with one call on its subparsers::

    from memloss_addon.experiments.preset_commands import add_preset_commands
    add_preset_commands(sub)          # sub = parser.add_subparsers(...)

Each subcommand sets ``func`` (what ``memloss``'s ``main`` calls with the parsed arguments; it
returns the exit status) and reports its own errors in one line. Torch is imported only when
``memloss models`` runs; ``memloss presets`` needs none.

Example:
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="memloss")
    >>> add_preset_commands(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["presets", "--dry-run", "mart-resnet18-cifar10", "--set",
    ...                           "epochs=2"])
    >>> args.func(args)  # doctest: +ELLIPSIS
    preset mart-resnet18-cifar10: ...
      epochs        = 2 ... # override
    ...
    0
"""

from __future__ import annotations

import argparse
import ast
import sys
from typing import Any

__all__ = ["add_preset_commands", "parse_setting"]


def parse_setting(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``, the value read as a Python literal where it is one.

    Raises:
        ValueError: No ``=`` or an empty key.

    Example:
        >>> parse_setting("epochs=2"), parse_setting("normalization=identity")
        (('epochs', 2), ('normalization', 'identity'))
        >>> parse_setting("milestones=(0.5, 0.75)")
        ('milestones', (0.5, 0.75))
    """
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ValueError(f"expected KEY=VALUE, got {text!r}")
    raw = raw.strip()
    try:
        value: Any = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = {"true": True, "false": False, "none": None}.get(raw.lower(), raw)
    return key, value


def _error(message: str) -> int:
    print(f"memloss: error: {message}", file=sys.stderr)
    return 1


def _cmd_models(args: argparse.Namespace) -> int:
    from memloss_addon.experiments.models import MODEL_REFERENCES, describe_models

    if args.num_classes < 2:
        return _error(f"--num-classes must be at least 2, got {args.num_classes}")
    rows = describe_models(num_classes=args.num_classes)
    width = max(len(name) for name, _ in rows)
    print(f"{'model':<{width}}  {'parameters':>11}  definition ({args.num_classes} classes)")
    for name, count in rows:
        print(f"{name:<{width}}  {count:>11,}  {MODEL_REFERENCES.get(name, '')}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from memloss_addon.experiments.presets import PRESETS, dry_run_text

    try:
        overrides = dict(parse_setting(item) for item in args.set)
        if args.dry_run is None:
            if overrides:
                return _error("--set needs --dry-run NAME")
            width = max(len(name) for name in PRESETS)
            for name, preset in PRESETS.items():
                print(f"{name:<{width}}  {preset.summary}")
            return 0
        print(dry_run_text(args.dry_run, **overrides))
    except ValueError as err:
        return _error(str(err))
    return 0


def add_preset_commands(subparsers: Any) -> None:
    """Add ``models`` and ``presets`` to ``memloss``'s subparsers.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers`` returned.
    """
    models = subparsers.add_parser(
        "models",
        help="list the models with their parameter counts",
        description="List every model `memloss` can build with its parameter count and where "
        "its definition comes from. Nothing is allocated (PyTorch's meta device).",
    )
    models.add_argument("--num-classes", type=int, default=10, help="classes (default: 10)")
    models.set_defaults(func=_cmd_models)

    presets = subparsers.add_parser(
        "presets",
        help="list the reference presets, or show one resolved",
        description="List the presets copied from the reference repositories (TRADES, "
        "robust_overfitting, HAT, MART), each with a +memloss variant (beta' 2, K 1). "
        "--dry-run NAME prints one resolved, every setting with the file and line it copies.",
    )
    presets.add_argument("--dry-run", metavar="NAME", default=None, help="show this preset")
    presets.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="extend",
        nargs="+",
        default=[],
        help="override settings in the dry run (repeatable), e.g. --set epochs=2 widen_factor=1",
    )
    presets.set_defaults(func=_cmd_presets)
