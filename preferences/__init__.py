"""Preferences: objects, the built-in library, encoders and view composition."""

from .encoders import Encoder, encode, normalize_conversation, resolve_encoder
from .library import builtin_preferences, load_file, lookup, resolve
from .model import Preference, compose
from .views import build_views

__all__ = ["Encoder", "encode", "normalize_conversation", "resolve_encoder", "builtin_preferences", "load_file",
           "lookup", "resolve", "Preference", "compose", "build_views"]
