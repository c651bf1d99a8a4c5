"""The plugin manager and the registries it fills.

Built-in plugins are listed in :data:`DEFAULT_PLUGINS` by module name and
loaded through the same hooks as third-party packages found under the
``personajudge`` entry-point group (the pattern of Simon Willison's ``llm``).
No module of the plugin system imports the built-ins: they are discovered by
name, exactly as a third-party plugin is discovered by its entry point.

A plugin can never break the tool: one that fails to import (``SystemExit``
included: a ``sys.exit("needs X")`` at import), raises from a hook, or
registers a name that is already taken is skipped with a one-line
:class:`PluginWarning` naming its distribution and entry point; everything
else keeps working (``KeyboardInterrupt`` still interrupts). What a
third-party object raises when it is used (a backend's constructor, an
encoder's ``render`` or ``stop_strings``, a method's ``plan``) is a one-line
:class:`PluginError` naming it and its distribution (see :func:`who`), not a
traceback; the typed errors it raises itself pass through as they are.
A hook implementation whose name is no hook (a typo such as
``register_backend``) would be silently never called, so it is named in a
warning too, and so is a function named as a hook without ``@hookimpl``, and an
installed plugin with no ``@hookimpl`` function at all. Registered objects are checked as they register (a method needs ``plan``
and ``loop``, an encoder ``render``, a backend class ``open``), so a plugin's
mistake is one warning at start-up, not a traceback when a user picks it.
Entry-point names are per distribution: two distributions that both call their
entry point ``plugin`` are both loaded (the second as ``dist:plugin``).
``PERSONAJUDGE_PLUGINS`` selects third-party plugins: unset loads
all, ``none`` (or an empty string) loads none, ``a,b`` loads only the entry
points or distributions named ``a`` and ``b`` (a name that matches none is
warned about, with the installed ones).

:func:`register_plugin` is idempotent for the object already registered (a
notebook cell run twice); a different object under a taken name, a string or
``None``, or an object with no hook implementations is a :class:`PluginError`.
:func:`unregister_plugin` of an object that is not registered does nothing.

Registries are built lazily, once per process, under a lock.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib
import importlib.metadata
import inspect
import os
import re
import threading
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pluggy

from personajudge.core.config import BackendConfig
from personajudge.core.contract import Backend, Session, Tokenizer, check_backend
from personajudge.core.errors import (
    ENV_SELECT,
    PersonaJudgeError,
    PersonaJudgeWarning,
    PluginError,
    UnknownPluginError,
    selection_hint,
)
from personajudge.preferences import Encoder, EncoderOptions, Preference, auto_encoder_name, encoder_options, lookup
from personajudge.preferences.encoders import UserText, checked_render

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
    #: how a plugin registered at run time is named in messages, when its registered name is pluggy's
    #: ``str(id(obj))`` (an instance registered without ``name=``): ``MyPlugin object``
    shown: str = ""

    def __str__(self) -> str:
        if not self.distribution:
            return f"{self.shown or repr(self.plugin)} (registered at run time)"
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
        if self.kind == "preference":  # before the name: a dict has no ``name`` attribute, but is no preference
            _check_preference(obj, origin)
        key = name or getattr(obj, "name", None)
        if not isinstance(key, str) or not key:
            raise PluginError(f"{origin or 'a plugin'} registered a {self.kind} without a name")
        check = _CHECKS.get(self.kind)
        if check is not None:
            check(obj, key)
        if key in self._items and self._items[key] is not obj:
            raise PluginError(f"{self.kind} '{key}' is already registered by {self.source(key)}")
        self._items[key] = obj
        self._origin[key] = origin

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        try:
            return self._items[name]
        except KeyError:
            raise UnknownPluginError(self.kind, name, list(self._items), selection_hint()) from None

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


def _check_method(obj: Any, key: str) -> None:
    """A method is a class the engine instantiates per run with the run's ``method_options``; it needs
    ``plan`` and ``loop`` (``decode`` is optional: without one the engine drives the loop)."""
    if not isinstance(obj, type):
        raise PluginError(
            f"method '{key}' is an instance of {type(obj).__name__}; register the class, not an instance "
            "(each run makes its own, with the run's method_options)"
        )
    missing = [m for m in ("plan", "loop") if not callable(getattr(obj, m, None))]
    if missing:
        raise PluginError(
            f"method '{key}' has no {' or '.join(missing)}(); a method needs plan(views) and loop(request)"
        )
    if getattr(obj, "batchable", None) is False and not callable(getattr(obj, "decode", None)):
        raise PluginError(
            f"method '{key}' says batchable = False but has no decode(session, request) to run alone with"
        )


def _check_backend(obj: Any, key: str) -> None:
    """A backend is a class :func:`load_backend` instantiates with the run's config; one that leaves
    ``open`` (or another abstract method) unimplemented would otherwise fail only when a user picks it, as
    a raw ``TypeError`` traceback from the loader. Refused here, like a method without ``loop``."""
    if not isinstance(obj, type):
        raise PluginError(
            f"backend '{key}' is an instance of {type(obj).__name__}; register the class, not an instance "
            "(load_backend makes it with the run's BackendConfig)"
        )
    missing = sorted(getattr(obj, "__abstractmethods__", ()))
    if not missing and not callable(getattr(obj, "open", None)):
        missing = ["open"]
    if missing:
        raise PluginError(
            f"backend '{key}' (class {obj.__qualname__}) does not implement {', '.join(missing)}; "
            "a backend needs open(n_views) returning a personajudge.Session"
        )


def _check_encoder(obj: Any, key: str) -> None:
    """An encoder needs ``render`` (called for every view of every request: a missing one would be an
    ``AttributeError`` traceback at the first request); ``stop_strings``, when present, must be callable;
    and its declared ``Options`` must be a pydantic model (it is validated as backends' are)."""
    if not callable(getattr(obj, "render", None)):
        raise PluginError(
            f"encoder '{key}' has no render(); an encoder needs "
            "render(view, conversation, tokenizer, *, system=None, options=None) -> (text, add_bos)"
        )
    if getattr(obj, "stop_strings", None) is not None and not callable(obj.stop_strings):
        raise PluginError(f"encoder '{key}': stop_strings must be a method stop_strings(tokenizer, options)")
    spec = getattr(obj, "Options", None)
    if spec is not None and not (isinstance(spec, type) and issubclass(spec, EncoderOptions)):
        # EncoderOptions declares ``stop``, which every encoder takes (a plain model would refuse stop = false)
        raise PluginError(
            f"encoder '{key}': Options must subclass personajudge.preferences.EncoderOptions (a pydantic model "
            "with the option every encoder takes, stop)"
        )


def _check_preference(obj: Any, origin: str) -> None:
    """A preference is a :class:`~personajudge.preferences.Preference` (its aliases, instruction and
    examples are read everywhere; a look-alike object fails later, far from the plugin)."""
    if not isinstance(obj, Preference):
        raise PluginError(
            f"{origin or 'a plugin'} registered a {type(obj).__name__} as a preference; register a "
            "personajudge.Preference(name=..., description=..., instruction=...)"
        )
    # as a preferences file refuses it: --view (a server's views too) splits names at commas
    bad = [n for n in (obj.name, *obj.aliases) if "," in n]
    if bad:
        raise PluginError(
            f"{origin or 'a plugin'} registered the preference name {bad[0]!r}, which holds a comma: --view "
            "splits names at commas, so no view could name it; give it a name without one"
        )


#: what a scorer of each kind implements, one of the two (personajudge.evaluation.scorers' base classes)
_SCORER_METHODS = {"pointwise": ("score", "score_many"), "pairwise": ("compare", "compare_many")}


def _check_scorer(obj: Any, key: str) -> None:
    """A scorer is a class the evaluation harness instantiates with its options, a subclass of
    ``PointwiseScorer`` or ``PairwiseScorer`` (``personajudge.evaluation.scorers``) that implements
    ``score`` or ``compare``. Checked by shape (the plugin layer does not import the harness): one that
    does not fit failed only after ``eval`` had generated every answer, with a traceback or an empty
    ``NotImplementedError``."""
    if not isinstance(obj, type):
        raise PluginError(
            f"scorer '{key}' is an instance of {type(obj).__name__}; register the class, not an instance "
            "(the harness makes it with the run's scorer options)"
        )
    kind = getattr(obj, "kind", None)
    if kind not in _SCORER_METHODS or not callable(getattr(obj, "config_hash_for", None)):
        raise PluginError(
            f"scorer '{key}' (class {obj.__qualname__}) is no scorer: subclass PointwiseScorer or PairwiseScorer "
            "from personajudge.evaluation.scorers"
        )
    one, many = _SCORER_METHODS[kind]
    if all(getattr(getattr(obj, m, None), "unimplemented", False) for m in (one, many)):
        raise PluginError(
            f"scorer '{key}' (class {obj.__qualname__}) implements neither {one} nor {many}; a {kind} scorer "
            f"overrides {one}(...) (or {many} to batch)"
        )


_CHECKS = {"method": _check_method, "encoder": _check_encoder, "backend": _check_backend, "scorer": _check_scorer}


def _holder(reg: Registry, word: str) -> tuple[str, PluginSource] | None:
    """Which registered preference already answers to ``word`` (its name or an alias, in any case, as
    :func:`~personajudge.preferences.lookup` resolves it): what the word is to it, and who registered it."""
    pref = lookup(word, reg)
    if pref is None:
        return None
    key = next(k for k, v in reg.items() if v is pref)
    what = "the name" if word.lower() in (key.lower(), pref.name.lower()) else "an alias"
    return f"{what} of preference '{pref.name}'", reg.source(key)


def _admit_preference(reg: Registry, key: str, pref: Preference, src: PluginSource) -> Preference | None:
    """``pref`` as it may join ``reg``, or None when it may not.

    A preference resolves by name *or* alias, case-insensitively, so a later plugin (every
    third-party one comes after the built-ins) may take neither a registered name nor a registered
    alias: ``short`` would otherwise silently replace the built-in ``concise`` for ``--prefer short``.
    A preference whose name is taken is skipped; an alias that is taken is dropped. One warning each.
    """
    for word in (key, pref.name):
        taken = _holder(reg, word)
        if taken is not None:
            _warn(
                f"skipped preference '{key}' of plugin {src}: the name is already registered by {taken[1]} "
                f"(it is {taken[0]})"
            )
            return None
    keep = []
    for alias in pref.aliases:
        taken = _holder(reg, alias)
        if taken is not None:
            _warn(
                f"dropped alias '{alias}' of preference '{key}' of plugin {src}: it is already registered "
                f"by {taken[1]} (it is {taken[0]})"
            )
        else:
            keep.append(alias)
    if len(keep) == len(pref.aliases):
        return pref
    return pref.model_copy(update={"aliases": tuple(keep)})


def _norm(name: str) -> str:
    """A distribution name as packaging compares them (PEP 503): case, ``-``, ``_`` and ``.`` do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _wanted(select: str) -> set[str]:
    return {s.strip() for s in select.split(",") if s.strip() and s.strip().lower() != "none"}


def _selected(ep: importlib.metadata.EntryPoint, select: str | None) -> bool:
    if select is None:
        return True
    wanted = _wanted(select)
    dist = ep.dist.name if ep.dist is not None else ""
    return ep.name in wanted or (bool(dist) and _norm(dist) in {_norm(w) for w in wanted})


def _one_line(err: BaseException) -> str:
    """An exception as one line (pluggy's validation errors span three)."""
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


def _unknown_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """Hook implementations of ``plugin`` that match no hook specification (pluggy's ``check_pending``, for one
    plugin, without raising: such a function is never called, so it is almost always a misspelt name)."""
    unknown = set()
    for caller in pm.get_hookcallers(plugin) or []:
        if caller.spec is None and any(i.plugin is plugin and not i.optionalhook for i in caller.get_hookimpls()):
            unknown.add(caller.name)
    return sorted(unknown)


def _undecorated_hooks(pm: pluggy.PluginManager, plugin: Any) -> list[str]:
    """Functions of ``plugin`` named as a hook but not marked ``@hookimpl``: pluggy passes them over in
    silence, so the plugin's other hooks work and this one never runs. Looked up statically (no
    ``__getattr__`` answers for names the plugin does not define)."""
    implemented = {caller.name for caller in pm.get_hookcallers(plugin) or []}
    return [
        name
        for name in hookspecs.HOOKS
        if name not in implemented and callable(inspect.getattr_static(plugin, name, None))
    ]


def _warn_unknown_hooks(pm: pluggy.PluginManager, plugin: Any, src: PluginSource | str) -> None:
    for name in _unknown_hooks(pm, plugin):
        close = difflib.get_close_matches(name, hookspecs.HOOKS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else f"; the hooks are {', '.join(hookspecs.HOOKS)}"
        _warn(f"plugin {src} implements '{name}', which is no personajudge hook, so it is never called{hint}")
    for name in _undecorated_hooks(pm, plugin):
        _warn(f"plugin {src} defines '{name}' without @personajudge.hookimpl, so it is never called")


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    select = os.environ.get(ENV_SELECT)
    eps = list(importlib.metadata.entry_points(group=hookspecs.PROJECT))
    if select is not None and not select.strip(" ,"):
        # PERSONAJUDGE_PLUGINS=${X} with X unset: it names nothing, so no plugin loads; say so, since
        # every name a plugin registers then fails as unknown
        _warn(
            f"{ENV_SELECT} is set but names no plugin, so no third-party plugin is loaded (unset it to load "
            "them all; set it to none to load none without this warning)"
        )
    if select is not None:
        available = {ep.name for ep in eps} | {ep.dist.name for ep in eps if ep.dist is not None}
        known = {_norm(a) for a in available}
        missing = sorted(w for w in _wanted(select) if w not in available and _norm(w) not in known)
        if missing:
            _warn(
                f"{ENV_SELECT} names {', '.join(repr(m) for m in missing)}, which no installed plugin provides "
                f"(neither an entry point nor a distribution); installed plugins: {', '.join(sorted(available)) or '(none)'}"
            )
    for ep in eps:
        if not _selected(ep, select):
            continue
        dist = ep.dist.name if ep.dist else "?"
        # Entry-point names are per distribution, and generic ones (``plugin``) collide across them:
        # the second distribution's plugin is registered under ``dist:name`` instead of being dropped.
        key = ep.name if pm.get_plugin(ep.name) is None else f"{dist}:{ep.name}"
        if pm.get_plugin(key) is not None:
            continue
        src = PluginSource(key, dist, ep.dist.version if ep.dist else "", f"{ep.name} = {ep.value}")
        try:
            plugin = ep.load()
            if pm.is_registered(plugin):  # one module behind two entry points: it registers once
                _warn(f"skipped plugin {src}: {_label(plugin)} is already registered by {_source(pm, plugin)}")
                continue
            pm.register(plugin, name=key)
        # a broken plugin must not take the tool down, not even with sys.exit() (KeyboardInterrupt is the user's)
        except (Exception, SystemExit) as err:
            _warn(f"skipped plugin {src}: {type(err).__name__}: {_one_line(err)}")
            continue
        if not pm.get_hookcallers(plugin):  # register_plugin refuses this; an installed plugin is warned about
            pm.unregister(plugin)
            _warn(
                f"skipped plugin {src}: {_label(plugin)} implements no hooks: "
                "decorate its functions with @personajudge.hookimpl"
            )
            continue
        _sources[key] = src
        _warn_unknown_hooks(pm, plugin, src)


def _source(pm: pluggy.PluginManager, plugin: Any) -> PluginSource:
    name = pm.get_name(plugin) or ""
    return _sources.get(name, PluginSource(name))


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
                _warn_unknown_hooks(pm, pm.get_plugin(mod), _sources[mod])
            _load_entry_points(pm)
            _pm = pm
        return _pm


def _own_version() -> str:
    try:
        return importlib.metadata.version("persona-judge")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _label(plugin: Any) -> str:
    if isinstance(plugin, types.ModuleType):
        return f"module '{plugin.__name__}'"
    return f"{type(plugin).__name__} object" if not isinstance(plugin, type) else f"class {plugin.__name__}"


def _check_plugin_object(plugin: Any, what: str) -> None:
    if plugin is None or isinstance(plugin, str | bytes | os.PathLike):
        shown = "None" if plugin is None else f"the {type(plugin).__name__} {str(plugin)!r}"
        raise PluginError(
            f"{what} takes the plugin module or object with @personajudge.hookimpl functions, not {shown} "
            "(import the module first: import my_plugin; pj.register_plugin(my_plugin))"
        )


def _reloaded(pm: pluggy.PluginManager, plugin: Any) -> bool:
    """Whether ``plugin``'s hook functions are no longer those registered: ``importlib.reload`` of a
    plugin module keeps the module object (so it is "already registered") but replaces its functions,
    and pluggy would go on calling the old ones, with the old classes, in silence. Compared as sets of
    functions (a method is bound anew at each lookup: what it binds counts), so a hook implemented under
    another attribute name (``@hookimpl(specname=...)``) is no change."""

    def func(f: Any) -> Any:
        return getattr(f, "__func__", f)

    registered = {
        func(impl.function)
        for caller in pm.get_hookcallers(plugin) or []
        for impl in caller.get_hookimpls()
        if impl.plugin is plugin
    }
    now = {func(getattr(plugin, n)) for n in dir(plugin) if pm.parse_hookimpl_opts(plugin, n) is not None}
    return registered != now


def register_plugin(plugin: Any, name: str | None = None) -> None:
    """Register a plugin object or module at run time (tests, notebooks).

    Registering the object that is already registered (under the same name, or
    with no name given) does nothing, so a notebook cell may run twice -- unless
    its hook functions changed (``importlib.reload(module)``): then the new ones
    replace the old, as a fresh registration would. Any
    other mistake is a one-line :class:`PluginError`: a string or ``None``, a
    name another plugin has, a plugin with no hook implementations, a hook
    implementation whose arguments are not the hook's. A misspelt hook name
    is a :class:`PluginWarning` (the rest of the plugin still works).
    """
    _check_plugin_object(plugin, "register_plugin")
    with _lock:
        pm = get_plugin_manager()
        if pm.is_registered(plugin):
            current = pm.get_name(plugin)
            if name is None or name == current:
                if not _reloaded(pm, plugin):
                    return
                # importlib.reload: the same module object, new functions. Registered afresh, through the
                # checks below; if the new code is refused, the plugin is left unregistered (its old
                # functions are gone from the module) and the registries forget it.
                pm.unregister(plugin)
                _registries.clear()
                name = current
            else:
                raise PluginError(
                    f"{_label(plugin)} is already registered as '{current}'; unregister it first to register it as "
                    f"'{name}'"
                )
        key = name if name is not None else pm.get_canonical_name(plugin)
        other = pm.get_plugin(key)
        if other is not None:
            raise PluginError(
                f"a plugin named '{key}' is already registered ({_label(other)}); "
                "unregister it first, or pass another name="
            )
        try:
            pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as err:
            raise PluginError(f"cannot register {_label(plugin)}: {_one_line(err)}") from None
        if not pm.get_hookcallers(plugin):
            pm.unregister(plugin)
            raise PluginError(
                f"{_label(plugin)} implements no hooks: decorate its functions with @personajudge.hookimpl"
            )
        registered = pm.get_name(plugin) or key
        if name is None and not isinstance(plugin, types.ModuleType | type):
            _sources[registered] = PluginSource(registered, shown=_label(plugin))
        _warn_unknown_hooks(pm, plugin, _source(pm, plugin))
        _registries.clear()


def unregister_plugin(plugin: Any) -> None:
    """Remove a plugin registered with :func:`register_plugin`; one that is not registered (any more) is a no-op."""
    _check_plugin_object(plugin, "unregister_plugin")
    with _lock:
        pm = get_plugin_manager()
        if not pm.is_registered(plugin):
            return
        name = pm.get_name(plugin)
        pm.unregister(plugin)
        if name is not None and not _sources.get(name, PluginSource(name)).distribution:
            _sources.pop(name, None)  # an id may be reused by a later object
        _registries.clear()


def _staging(staged: Registry, plugin_name: str, src: PluginSource) -> Callable[..., None]:
    """The ``register`` a plugin's hook is handed. An object the registry refuses (a backend without
    ``open``, an unnamed encoder) is skipped with one warning naming it, and the hook goes on: raising
    would abort the plugin's own loop, so one bad object would take its well-formed siblings with it."""

    def register(obj: Any, name: str | None = None) -> None:
        try:
            staged.register(obj, name, origin=plugin_name)
        except PluginError as err:
            article = "an" if staged.kind[:1] in "aeiou" else "a"
            _warn(f"skipped {article} {staged.kind} of plugin {src}: {err}")

    return register


def _fill(reg: Registry, pm: pluggy.PluginManager, hook_name: str) -> None:
    hook = getattr(pm.hook, hook_name)
    # get_hookimpls() lists in registration order: built-ins first, so they win collisions.
    for impl in hook.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        src = _sources.get(plugin_name, PluginSource(plugin_name))
        staged = Registry(reg.kind)
        try:
            impl.function(register=_staging(staged, plugin_name, src))
        except (Exception, SystemExit) as err:  # as at import: sys.exit() in a hook skips the plugin's objects
            _warn(f"skipped the {reg.kind}s of plugin {src}: {type(err).__name__}: {_one_line(err)}")
            continue
        for key, obj in staged.items():
            if key in reg and reg[key] is not obj:
                _warn(
                    f"skipped {reg.kind} '{key}' of plugin {src}: the name is already registered by {reg.source(key)}"
                )
                continue
            if reg.kind == "preference" and key not in reg:
                obj = _admit_preference(reg, key, obj, src)
                if obj is None:
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


def check_describe(backend: Any, key: str) -> None:
    """``backend.describe()`` called once as the backend loads: every run's ``settings`` (and the server's
    ``/v1/models``) start with its facts, read after the text is generated, where a plugin's exception or
    a list would lose the result to a traceback."""
    facts = guarded("backend", key, backend, ".describe raised", backend.describe)
    if not isinstance(facts, dict) or not all(isinstance(k, str) for k in facts):
        raise PluginError(
            f"{who('backend', key, backend)}.describe returned {_shown(facts)}; it returns a dict of facts with "
            "str keys, e.g. {'backend': self.name, 'model': ...}"
        )


def load_backend(config: BackendConfig) -> Backend:
    """Instantiate the configured backend (this loads the model).

    Settings the backend does not read (its ``config_fields``) are named in
    one :class:`PersonaJudgeWarning`: a run that silently does less than it
    seems to is the mistake users find last."""
    cls = get_backend_class(config.name)
    fields = getattr(cls, "config_fields", None)
    if fields is not None:
        unused = [
            f"backend.{f}={v!r}"
            for f, v in config.model_dump(exclude={"name", "options"}).items()
            if v is not None and f not in fields
        ]
        if unused:
            warnings.warn(
                f"the {config.name} backend does not use {', '.join(unused)}: ignored",
                PersonaJudgeWarning,
                stacklevel=2,
            )
    backend = guarded("backend", config.name, cls, " failed to load:", lambda: cls(config))
    try:
        check_backend(backend)
        if hasattr(backend, "describe"):
            check_describe(backend, config.name)
    except BaseException:
        with contextlib.suppress(Exception):  # free the weights it loaded; the tokenizer error is the news
            backend.close()
        raise
    return backend


def get_encoder(name: str) -> Any:
    return registry("encoder").get(name)


def resolve_encoder(
    name: str,
    tokenizer: Tokenizer,
    views: list[list[Preference]] | None = None,
    *,
    options: dict[str, Any] | None = None,
) -> Encoder:
    """The encoder named ``name`` (an instance); ``auto`` picks by the tokenizer and the user's ``views``
    (see :func:`personajudge.preferences.auto_encoder_name`).

    With ``options`` (the run's ``encoder_options``), they are checked against the encoder's declared
    ``Options`` first (:func:`personajudge.preferences.encoder_options`): a third-party encoder that
    declares them gets the same one-line :class:`ConfigError` as the built-ins, which check their own."""
    if name == "auto":
        name = auto_encoder_name(tokenizer, views)
    enc = get_encoder(name)
    instance = enc() if isinstance(enc, type) else enc
    if options is not None:
        encoder_options(instance, options)
    return instance


def get_method(name: str) -> Any:
    return registry("method").get(name)


# What a plugin's encoder or method returns enters the core here: checked once, so that a wrong type is a
# PluginError naming the plugin, not a str split into letters or a traceback from the sampler.


def who(kind: str, key: str, obj: Any) -> str:
    """A registered object as a PluginError names it: its name, class and the distribution that registered it
    (whom the user reports the bug to)."""
    cls = obj if isinstance(obj, type) else type(obj)
    reg = registry(kind)
    src = f", from {reg.source(key)}" if key in reg else ""
    return f"{kind} '{key}' ({cls.__qualname__}{src})"


def _shown(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


def _builtin(kind: str, key: str, obj: Any) -> bool:
    """Whether ``obj`` is the project's own ``kind`` registered as ``key`` (an exception from it is a bug
    of this project, which keeps its traceback)."""
    reg = registry(kind)
    if key not in reg or (reg[key] is not obj and reg[key] is not type(obj)):
        return False
    return reg.source(key).distribution == "persona-judge"


def guarded(kind: str, key: str, obj: Any, doing: str, call: Callable[[], Any]) -> Any:
    """``call()``, a call into the plugin object ``obj``: what a third-party plugin raises
    (``SystemExit`` included) becomes one :class:`PluginError` line naming it and its distribution
    (``encoder 'x' (X, from dist 1.0, entry point 'e = m').render raised ValueError: ...``), chained to
    the original for a debugger. The typed errors it raises itself (a ``ConfigError`` for a bad option)
    pass through, and so does ``KeyboardInterrupt``, and any exception of a built-in (a bug, with its traceback)."""
    try:
        return call()
    except PersonaJudgeError:
        raise
    except (Exception, SystemExit) as err:
        if _builtin(kind, key, obj):
            raise
        raise PluginError(f"{who(kind, key, obj)}{doing} {type(err).__name__}: {_one_line(err)}") from err


class _GuardedSession:
    """A third-party backend's session, whose ``forward_many``, ``forward``, ``truncate`` and ``close``
    are :func:`guarded`: an ``IndexError`` deep in someone's forward pass fails that request with one
    :class:`PluginError` naming the backend and its distribution, where it would have been a traceback
    that looks like this project's bug. Everything else (``closed``, ``n_views``, a backend's own
    extras) is the session's own, read through."""

    def __init__(self, key: str, backend: Any, session: Any):
        self._key, self._backend, self._session = key, backend, session

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        return guarded("backend", self._key, self._backend, f"'s session.{what} raised", fn)

    def forward_many(self, calls: Any) -> Any:
        return self._call("forward_many", lambda: self._session.forward_many(calls))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._call("forward", lambda: self._session.forward(*args, **kwargs))

    def truncate(self, view: int, length: int) -> Any:
        return self._call("truncate", lambda: self._session.truncate(view, length))

    def close(self) -> None:
        self._call("close", self._session.close)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)

    def __enter__(self) -> _GuardedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_session(backend: Any, capacity: int) -> Any:
    """``backend.open(capacity)``, for the engine: a registered third-party backend's failures, in opening
    and in the session's calls, are one :class:`PluginError` naming it (:class:`_GuardedSession`).
    The built-in backends' sessions come back as they are (their exceptions are this project's bugs,
    with their tracebacks), and so does the session of a backend object no registry holds."""
    cls = type(backend)
    key = next((k for k, v in registry("backend").items() if v is cls), None)
    if key is None or _builtin("backend", key, backend):
        return backend.open(capacity)
    session = guarded("backend", key, backend, ".open raised", lambda: backend.open(capacity))
    if not isinstance(session, Session):  # the checks and the lengths the engine relies on live in Session
        with contextlib.suppress(Exception):
            getattr(session, "close", lambda: None)()
        raise PluginError(
            f"{who('backend', key, backend)}.open returned {_shown(session)}; it returns a personajudge.Session "
            "(a subclass implementing _forward_many and _truncate)"
        )
    return _GuardedSession(key, backend, session)


def stop_strings_of(encoder: Any, tokenizer: Tokenizer, options: dict[str, Any] | None) -> list[str]:
    """The stop strings ``encoder``'s format implies: a list of non-empty strings, checked (a bare ``"user:"``
    unpacked into the run's stop list would end the answer at any of its letters, in silence)."""
    fn = getattr(encoder, "stop_strings", None)
    if fn is None:
        return []
    name = getattr(encoder, "name", type(encoder).__name__)
    out = guarded("encoder", name, encoder, ".stop_strings raised", lambda: fn(tokenizer, options))
    if not isinstance(out, list | tuple) or not all(isinstance(s, str) and s for s in out):
        raise PluginError(
            f"{who('encoder', name, encoder)}.stop_strings returned {_shown(out)}; "
            "it returns a list of non-empty strings, e.g. ['\\nUser:']"
        )
    return list(out)


def check_encoder_views(encoder: Any, views: list[list[Preference]], options: dict[str, Any] | None) -> None:
    """``encoder.check_views(views, options)`` where the encoder has one (optional): what it refuses about
    the views, found without a model."""
    fn = getattr(encoder, "check_views", None)
    if fn is None:
        return
    name = getattr(encoder, "name", type(encoder).__name__)
    guarded("encoder", name, encoder, ".check_views raised", lambda: fn(views, options))


def render_view(
    encoder: Any,
    view: list[Preference],
    conversation: list[Any],
    tokenizer: Tokenizer,
    *,
    system: str | None,
    options: dict[str, Any] | None,
    user: UserText | None = None,
) -> tuple[str, bool]:
    """``encoder.render`` of one view, checked to be ``(text, add_bos)``: anything else fails at
    ``tokenizer.encode`` or an unpacking far from the plugin. With ``user`` (the :class:`UserText`
    of this ``conversation`` and ``system``), rendered through it, so that ``user.encode`` keeps the
    user's special-token text as text (it may render a second time to find where that text lies)."""
    name = getattr(encoder, "name", type(encoder).__name__)
    shown = who("encoder", name, encoder)

    def once(v: list[Preference], c: list[Any], s: str | None) -> tuple[str, bool]:
        render = functools.partial(encoder.render, v, c, tokenizer, system=s, options=options)
        return checked_render(guarded("encoder", name, encoder, ".render raised", render), shown)

    if user is None:
        return once(view, conversation, system)
    return user.render(once, view, who=shown)


def plan_views(method: Any, name: str, views: list[list[Preference]]) -> list[list[Preference]]:
    """``method.plan(views)``, checked to be a non-empty list of views (lists of preferences): a method that
    plans none would be refused by the session as "a session needs at least one view", without its name."""
    planned = guarded("method", name, method, ".plan raised", lambda: method.plan(views))
    if not isinstance(planned, list | tuple) or not planned or not all(isinstance(v, list | tuple) for v in planned):
        raise PluginError(
            f"{who('method', name, method)}.plan returned {_shown(planned)}; it returns the views it prompts, "
            "a non-empty list of lists of preferences"
        )
    return list(planned)


def preference_library() -> Mapping[str, Preference]:
    """Every named preference: the built-ins plus those plugins register."""
    return registry("preference")


def describe(obj: Any) -> str:
    """The one-line description of a registered object (its ``description`` or docstring's first line),
    on one line and printable: a plugin's newlines or escape sequences would otherwise reach the
    terminal through ``personajudge plugins`` as they are."""
    desc = getattr(obj, "description", None)
    if not (isinstance(desc, str) and desc.strip()):
        doc = (getattr(obj, "__doc__", None) or "").strip()
        desc = doc.splitlines()[0] if doc else ""
    return " ".join("".join(c if c.isprintable() else " " for c in desc).split())


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
