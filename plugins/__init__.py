"""The plugin system: pluggy hook specifications, the manager and its registries,
and the registrations of the project's own built-ins.

A third-party plugin decorates its hooks with :data:`hookimpl` (also exported
as ``personajudge.hookimpl``) and is found through the ``personajudge``
entry-point group.
"""

from .hookspecs import hookimpl, hookspec
from .manager import (
    PluginWarning,
    get_backend_class,
    get_encoder,
    get_method,
    get_plugin_manager,
    list_plugins,
    load_backend,
    preference_library,
    register_plugin,
    registry,
    resolve_encoder,
    unregister_plugin,
)

__all__ = [
    "hookimpl",
    "hookspec",
    "PluginWarning",
    "get_backend_class",
    "get_encoder",
    "get_method",
    "get_plugin_manager",
    "list_plugins",
    "load_backend",
    "preference_library",
    "register_plugin",
    "registry",
    "resolve_encoder",
    "unregister_plugin",
]
