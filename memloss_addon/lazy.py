"""Package attributes that load on first use, so importing a package costs nothing until needed.

``import memloss_addon`` (and the ``memloss`` command's ``--help``) then imports no torch; a name
is imported from its module the first time it is looked up, and kept.

Example:
    >>> import types
    >>> package = types.ModuleType("demo")
    >>> getattr_, dir_ = lazy_attributes(package, {"sqrt": "math"}, ["sqrt"])
    >>> getattr_("sqrt")(9.0), "sqrt" in dir_()
    (3.0, True)
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

__all__ = ["lazy_attributes"]


def lazy_attributes(
    package: ModuleType, exports: dict[str, str], names: Sequence[str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module ``__getattr__`` and ``__dir__`` of a package whose names load on first use.

    Args:
        package: the package module (``sys.modules[__name__]``).
        exports: each exported name and the module it comes from (relative to the package, or
            absolute).
        names: the package's ``__all__``.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package.__name__), name)
        setattr(package, name, value)  # later lookups skip this function
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(package), *names})

    return __getattr__, __dir__
