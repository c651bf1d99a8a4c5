"""The plugin manager and the registries it fills.

Built-in plugins are listed in :data:`DEFAULT_PLUGINS` and loaded through the
same hooks as third-party packages found under the ``personajudge``
entry-point group. Registries are built lazily, once per process.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

import pluggy

from personajudge.core.errors import PluginError, UnknownPluginError

from . import hookspecs

DEFAULT_PLUGINS = (
    "personajudge.backends.toy",
    "personajudge.backends.llama_cpp",
    "personajudge.backends.hf",
    "personajudge.preferences.library",
    "personajudge.preferences.encoders",
    "personajudge.plugins.default_methods",
    "personajudge.plugins.evaluation.scorers.length",
    "personajudge.plugins.evaluation.scorers.flesch",
    "personajudge.plugins.evaluation.scorers.vader",
    "personajudge.plugins.evaluation.scorers.reward_model",
    "personajudge.plugins.evaluation.scorers.pairwise_judge",
)

_lock = threading.Lock()
_pm: pluggy.PluginManager | None = None
_registries: dict[str, "Registry"] = {}


class Registry:
    """Name -> object for one kind of plugin, with helpful errors."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Any] = {}
        self._origin: dict[str, str] = {}

    def register(self, obj: Any, name: str | None = None, *, origin: str = "") -> None:
        key = name or getattr(obj, "name", None)
        if not isinstance(key, str) or not key:
            raise PluginError(f"{origin or 'a plugin'} registered a {self.kind} without a name")
        if key in self._items and self._items[key] is not obj:
            raise PluginError(
                f"{self.kind} '{key}' is registered twice (by {self._origin[key]} and {origin or 'another plugin'})")
        self._items[key] = obj
        self._origin[key] = origin

    def get(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownPluginError(self.kind, name, list(self._items)) from None

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, Any]]:
        return sorted(self._items.items())

    def origin(self, name: str) -> str:
        return self._origin.get(name, "")

    def __contains__(self, name: str) -> bool:
        return name in self._items


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            for mod in DEFAULT_PLUGINS:
                pm.register(importlib.import_module(mod), name=mod)
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
            _pm = pm
        return _pm


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object or module at run time (tests, notebooks)."""
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    _registries.clear()


def unregister_plugin(plugin: Any) -> None:
    pm = get_plugin_manager()
    pm.unregister(plugin)
    _registries.clear()


def registry(kind: str) -> Registry:
    """The registry of ``kind`` (backend, encoder, method, preference, scorer)."""
    if kind not in hookspecs.KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}")
    reg = _registries.get(kind)
    if reg is None:
        pm = get_plugin_manager()
        reg = Registry(kind)
        hook = getattr(pm.hook, hookspecs.KINDS[kind].__name__)
        for impl in reversed(hook.get_hookimpls()):
            origin = pm.get_name(impl.plugin) or repr(impl.plugin)
            impl.function(register=lambda obj, name=None, _o=origin: reg.register(obj, name, origin=_o))
        _registries[kind] = reg
    return reg


def get_backend_class(name: str) -> Any:
    return registry("backend").get(name)


def get_encoder(name: str) -> Any:
    return registry("encoder").get(name)


def get_method(name: str) -> Any:
    return registry("method").get(name)


def list_plugins() -> dict[str, list[dict[str, str]]]:
    """Everything registered, by kind, with a one-line description and origin."""
    out: dict[str, list[dict[str, str]]] = {}
    for kind in hookspecs.KINDS:
        reg = registry(kind)
        rows = []
        for name, obj in reg.items():
            desc = getattr(obj, "description", "") or (obj.__doc__ or "").strip().splitlines()[0:1]
            if isinstance(desc, list):
                desc = desc[0] if desc else ""
            rows.append({"name": name, "description": str(desc), "plugin": reg.origin(name)})
        out[kind] = rows
    return out
