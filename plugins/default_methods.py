"""Registers the built-in decoding methods through the public hook."""

from personajudge.core.methods import BUILTIN_METHODS

from .hookspecs import hookimpl


@hookimpl
def register_methods(register):
    for cls in BUILTIN_METHODS:
        register(cls)
