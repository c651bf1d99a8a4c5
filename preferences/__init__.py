"""Preferences: objects, the built-in library, encoders and view composition."""

from .encoders import (
    BUILTIN_ENCODERS,
    Encoder,
    EncoderOptions,
    auto_encoder_name,
    encode,
    encoder_options,
    normalize_conversation,
)
from .library import Library, builtin_preferences, load_file, lookup, resolve
from .model import Example, Preference, compose
from .views import (
    PreferenceSpec,
    build_views,
    duplicates,
    named_by,
    reported,
    view_names,
    warn_duplicates,
    with_definitions,
)

__all__ = [
    "BUILTIN_ENCODERS",
    "Encoder",
    "EncoderOptions",
    "encoder_options",
    "auto_encoder_name",
    "encode",
    "normalize_conversation",
    "Library",
    "builtin_preferences",
    "load_file",
    "lookup",
    "resolve",
    "Example",
    "Preference",
    "compose",
    "build_views",
    "view_names",
    "named_by",
    "duplicates",
    "warn_duplicates",
    "with_definitions",
    "reported",
    "PreferenceSpec",
]
