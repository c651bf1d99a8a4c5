"""Plugins for tests: a module-like object carrying hook implementations, made in memory."""

from __future__ import annotations

import itertools
import types

from personajudge.plugins import hookimpl

_numbers = itertools.count()


def hook_module(prefix: str = "test_plugin", **hooks) -> types.ModuleType:
    """A module named ``{prefix}_{n}`` (unique) whose attributes are ``hooks``, each a ``@hookimpl``."""
    mod = types.ModuleType(f"{prefix}_{next(_numbers)}")
    for name, fn in hooks.items():
        setattr(mod, name, hookimpl(fn))
    return mod
