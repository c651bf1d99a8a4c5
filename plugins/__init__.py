"""Plugin system (pluggy), the high-level API and the CLI.

``hookimpl`` is what a third-party plugin decorates its hooks with;
:class:`PersonaJudge` and :func:`generate` are the Python entry points.
"""

from .hookspecs import hookimpl, hookspec
from .manager import get_plugin_manager, list_plugins, register_plugin, registry, unregister_plugin

__all__ = ["hookimpl", "hookspec", "get_plugin_manager", "list_plugins", "register_plugin", "registry",
           "unregister_plugin", "PersonaJudge", "generate"]


def __getattr__(name):  # the API pulls in preferences and backends; load it on first use
    if name in ("PersonaJudge", "generate"):
        from . import api

        return getattr(api, name)
    raise AttributeError(name)
