"""The plugin manager and the registries it fills.

Built-in plugins are listed in :data:`DEFAULT_PLUGINS` by module name and
loaded through the same hooks as third-party packages found under the
``personajudge`` entry-point group (the pattern of Simon Willison's ``llm``).
No module of the plugin system imports the built-ins: they are discovered by
name, exactly as a third-party plugin is discovered by its entry point.

A plugin can never break the tool: one that fails to import, raises from a
hook, or registers a name that is already taken is skipped with a one-line
:class:`PluginWarning` naming its distribution and entry point; everything
else keeps working. ``PERSONAJUDGE_PLUGINS`` selects third-party plugins:
unset loads all, ``none`` (or an empty string) loads none, ``a,b`` loads only
the entry points or distributions named ``a`` and ``b``.

Registries are built lazily, once per process, under a lock.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from personajudge.core.config import BackendConfig
from personajudge.core.contract import Backend, Tokenizer
from personajudge.core.errors import PersonaJudgeWarning, PluginError, UnknownPluginError
from personajudge.preferences import Encoder, Preference, auto_encoder_name

from . import hookspecs

#: The project's own plugins, registered before any third-party one (so a
#: third-party name collision never shadows a built-in).
DEFAULT_PLUGINS = (
    "personajudge.plugins.builtins",
    "personajudge.evaluation.scorers.length",
    "personajudge.evaluation.scorers.flesch",
    "personajudge.evaluation.scorers.vader",
    "personajudge.evaluation.scorers.reward_model",
    "personajudge.evaluation.scorers.pairwise_judge",
)

ENV_SELECT = "PERSONAJUDGE_PLUGINS"
BUILTIN_ORIGIN = "persona-judge (built-in)"

_lock = threading.RLock()
_pm: pluggy.PluginManager | None = None
_registries: dict[str, Registry] = {}
_sources: dict[str, PluginSource] = {}


class PluginWarning(PersonaJudgeWarning):
    """A plugin was skipped (failed to import, raised, or collided on a name)."""


@dataclass(frozen=True)
class PluginSource:
    """Where a registered plugin object came from (for listings and warnings)."""

    plugin: str  # the name it is registered under in the plugin manager
    distribution: str = ""  # the pip package; empty for objects registered at run time
    version: str = ""
    entry_point: str = ""

    def __str__(self) -> str:
        if not self.distribution:
            return f"'{self.plugin}' (registered at run time)"
        dist = f"{self.distribution} {self.version}".strip()
        return f"{dist}, entry point '{self.entry_point}'" if self.entry_point else dist


def _warn(message: str) -> None:
    warnings.warn(message, PluginWarning, stacklevel=3)


class Registry(Mapping[str, Any]):
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
            raise PluginError(f"{self.kind} '{key}' is already registered by {self.source(key)}")
        self._items[key] = obj
        self._origin[key] = origin

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        try:
            return self._items[name]
        except KeyError:
            raise UnknownPluginError(self.kind, name, list(self._items)) from None

    def __getitem__(self, name: str) -> Any:
        return self._items[name]

    def __iter__(self):
        return iter(sorted(self._items))

    def __len__(self) -> int:
        return len(self._items)

    def names(self) -> list[str]:
        return sorted(self._items)

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        return sorted(self._items.items())

    def origin(self, name: str) -> str:
        return self._origin.get(name, "")

    def source(self, name: str) -> PluginSource:
        plugin = self.origin(name)
        return _sources.get(plugin, PluginSource(plugin))

    def __contains__(self, name: object) -> bool:
        return name in self._items


def _selected(ep: importlib.metadata.EntryPoint, select: str | None) -> bool:
    if select is None:
        return True
    wanted = {s.strip() for s in select.split(",") if s.strip()} - {"none"}
    dist = ep.dist.name if ep.dist is not None else ""
    return ep.name in wanted or dist in wanted


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    select = os.environ.get(ENV_SELECT)
    for ep in importlib.metadata.entry_points(group=hookspecs.PROJECT):
        if not _selected(ep, select) or pm.get_plugin(ep.name) is not None:
            continue
        src = PluginSource(
            ep.name, ep.dist.name if ep.dist else "?", ep.dist.version if ep.dist else "", f"{ep.name} = {ep.value}"
        )
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as err:  # a broken plugin must not take the tool down
            _warn(f"skipped plugin {src}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
            continue
        _sources[ep.name] = src


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded."""
    global _pm
    with _lock:
        if _pm is None:
            pm = pluggy.PluginManager(hookspecs.PROJECT)
            pm.add_hookspecs(hookspecs)
            for mod in DEFAULT_PLUGINS:
                pm.register(importlib.import_module(mod), name=mod)
                _sources[mod] = PluginSource(mod, "persona-judge", _own_version(), "")
            _load_entry_points(pm)
            _pm = pm
        return _pm


def _own_version() -> str:
    try:
        return importlib.metadata.version("persona-judge")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object or module at run time (tests, notebooks)."""
    with _lock:
        pm = get_plugin_manager()
        pm.register(plugin, name=name)
        _registries.clear()


def unregister_plugin(plugin: Any) -> None:
    with _lock:
        pm = get_plugin_manager()
        pm.unregister(plugin)
        _registries.clear()


def _fill(reg: Registry, pm: pluggy.PluginManager, hook_name: str) -> None:
    hook = getattr(pm.hook, hook_name)
    # get_hookimpls() lists in registration order: built-ins first, so they win collisions.
    for impl in hook.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        staged = Registry(reg.kind)
        try:
            impl.function(register=lambda obj, name=None, _o=plugin_name, _r=staged: _r.register(obj, name, origin=_o))
        except Exception as err:
            src = _sources.get(plugin_name, PluginSource(plugin_name))
            _warn(f"skipped the {reg.kind}s of plugin {src}: {type(err).__name__}: {err}")
            continue
        for key, obj in staged.items():
            if key in reg and reg[key] is not obj:
                src = _sources.get(plugin_name, PluginSource(plugin_name))
                _warn(
                    f"skipped {reg.kind} '{key}' of plugin {src}: the name is already registered by {reg.source(key)}"
                )
                continue
            reg.register(obj, key, origin=plugin_name)


def registry(kind: str) -> Registry:
    """The registry of ``kind`` (backend, encoder, method, preference, scorer)."""
    if kind not in hookspecs.KINDS:
        raise ValueError(f"unknown plugin kind {kind!r}")
    with _lock:
        reg = _registries.get(kind)
        if reg is None:
            reg = Registry(kind)
            _fill(reg, get_plugin_manager(), hookspecs.KINDS[kind].__name__)
            _registries[kind] = reg
        return reg


def get_backend_class(name: str) -> type[Backend]:
    return registry("backend").get(name)


def load_backend(config: BackendConfig) -> Backend:
    """Instantiate the configured backend (this loads the model)."""
    return get_backend_class(config.name)(config)


def get_encoder(name: str) -> Any:
    return registry("encoder").get(name)


def resolve_encoder(name: str, tokenizer: Tokenizer, views: list[list[Preference]] | None = None) -> Encoder:
    """The encoder named ``name`` (an instance); ``auto`` picks by the tokenizer and the user's ``views``
    (see :func:`personajudge.preferences.auto_encoder_name`)."""
    if name == "auto":
        name = auto_encoder_name(tokenizer, views)
    enc = get_encoder(name)
    return enc() if isinstance(enc, type) else enc


def get_method(name: str) -> Any:
    return registry("method").get(name)


def preference_library() -> Mapping[str, Preference]:
    """Every named preference: the built-ins plus those plugins register."""
    return registry("preference")


def describe(obj: Any) -> str:
    """The one-line description of a registered object (its ``description`` or docstring's first line)."""
    desc = getattr(obj, "description", None)
    if isinstance(desc, str) and desc:
        return desc
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def list_plugins() -> dict[str, list[dict[str, str]]]:
    """Everything registered, by kind: name, description, plugin, distribution and version."""
    out: dict[str, list[dict[str, str]]] = {}
    for kind in hookspecs.KINDS:
        reg = registry(kind)
        rows = []
        for name, obj in reg.items():
            src = reg.source(name)
            rows.append(
                {
                    "name": name,
                    "description": describe(obj),
                    "plugin": src.plugin,
                    "distribution": src.distribution,
                    "version": src.version,
                    "entry_point": src.entry_point,
                }
            )
        out[kind] = rows
    return out
