"""Hook specifications: how a plugin adds backends, encoders, methods, scorers, preferences.

Each hook receives a ``register`` callable, the pattern of Simon Willison's
``llm``: a plugin calls ``register(...)`` once per thing it provides. The
built-in backends, encoders and methods use exactly these hooks, so a
third-party plugin has the same powers as the project's own code.

A third-party package exposes a module through the ``personajudge`` entry-point
group::

    [project.entry-points.personajudge]
    my_backend = "my_package.plugin"

and implements hooks in it with :data:`hookimpl`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "personajudge"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_backends(register: Callable[..., None]) -> None:
    """Register backend classes: ``register(cls)`` where ``cls.name`` is the backend's name.

    ``cls(config: BackendConfig)`` must load the model and return a
    :class:`personajudge.core.Backend`. Import heavy dependencies inside the
    class, not at module level, so listing plugins stays fast.
    """


@hookspec
def register_encoders(register: Callable[..., None]) -> None:
    """Register preference encoders: ``register(encoder)``, a class (or object) with ``name`` and ``render``.

    An encoder that declares ``Options`` (a :class:`personajudge.preferences.EncoderOptions` subclass, one field per
    option) has ``encoder_options`` checked against it: an unknown or mistyped option is a one-line
    ``ConfigError``. One that declares nothing gets the options unchecked. See
    :class:`personajudge.preferences.encoders.Encoder`.
    """


@hookspec
def register_methods(register: Callable[..., None]) -> None:
    """Register decoding methods: ``register(cls)``, the class (not an instance: each run makes its own
    with the run's ``method_options``), with ``name``, ``plan(views)`` and ``loop(request)``. ``decode(session,
    request)`` is optional (without it the engine drives ``loop`` and batches it with other requests); a
    method that says ``batchable = False`` runs alone and needs one. See :class:`personajudge.core.methods.Method`.
    """


@hookspec
def register_preferences(register: Callable[..., None]) -> None:
    """Register named preferences: ``register(Preference(...))`` adds to the built-in library."""


@hookspec
def register_scorers(register: Callable[..., None]) -> None:
    """Register evaluation scorers: ``register(cls)`` where ``cls.name`` is the scorer's name."""


KINDS: dict[str, Any] = {
    "backend": register_backends,
    "encoder": register_encoders,
    "method": register_methods,
    "preference": register_preferences,
    "scorer": register_scorers,
}

#: The hook names, for the warning about a misspelt one.
HOOKS: tuple[str, ...] = tuple(spec.__name__ for spec in KINDS.values())
