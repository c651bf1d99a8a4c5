"""Plugins for tests: a module-like object carrying hook implementations, made in memory."""

from __future__ import annotations

import contextlib
import itertools
import types
from collections.abc import Callable, Iterator

from personajudge.plugins import hookimpl, register_plugin, unregister_plugin

_numbers = itertools.count()


def hook_module(prefix: str = "test_plugin", **hooks) -> types.ModuleType:
    """A module named ``{prefix}_{n}`` (unique) whose attributes are ``hooks``, each a ``@hookimpl``."""
    mod = types.ModuleType(f"{prefix}_{next(_numbers)}")
    for name, fn in hooks.items():
        setattr(mod, name, hookimpl(fn))
    return mod


@contextlib.contextmanager
def registering(prefix: str = "test_plugin") -> Iterator[Callable[..., types.ModuleType]]:
    """``reg(**hooks)`` registers a :func:`hook_module` of ``hooks`` and returns it; every plugin registered
    through it is unregistered when the block ends (a test's fixture: ``with registering() as reg: yield reg``)."""
    done: list[types.ModuleType] = []

    def reg(**hooks) -> types.ModuleType:
        plugin = hook_module(prefix, **hooks)
        register_plugin(plugin)
        done.append(plugin)
        return plugin

    try:
        yield reg
    finally:
        for plugin in done:
            unregister_plugin(plugin)
