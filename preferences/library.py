"""The built-in library of named preferences.

It covers the nine dimensions of the Persona-judge paper's experiments and the
P-Soups dimensions (Jang et al. 2023). The working definitions come from
``data/preference_dimensions.json`` (copied from the project's shared data);
the instructions are this project's own wording. The library is registered
through the ``register_preferences`` hook, so plugins can add names the same
way.
"""

from __future__ import annotations

import difflib
import functools
import json
import tomllib
from importlib import resources
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from personajudge.core.errors import PreferenceError

from .model import Preference

#: name -> (instruction, aliases, dimension key in the data file)
_BUILTINS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "helpful": ("Be as helpful as possible: give useful information, resources and concrete suggestions.",
                (), "helpful"),
    "harmless": ("Be harmless: avoid offensive, discriminatory, dangerous or otherwise harmful content.",
                 ("safe",), "harmless"),
    "humor": ("Be humorous: keep the tone cheerful, playful and amusing.",
              ("humorous", "humour", "funny"), "humor"),
    "correct": ("Be correct: state only what is factually accurate, and no falsehoods.",
                ("accurate", "factual"), "correct"),
    "informative": ("Be very informative: cover all the relevant background and details, leaving nothing out.",
                    (), "P2B_informative"),
    "professional": ("Be professional: write in a formal, polished and businesslike tone.",
                     ("formal",), "professional"),
    "creative": ("Be creative: offer original, imaginative and inventive ideas.", (), "creative"),
    "touching": ("Be touching: write with emotional resonance that evokes empathy and feeling.",
                 ("emotional",), "touching"),
    "vivid": ("Be vivid: use rich, concrete description full of sensory detail.", ("descriptive",), "vivid"),
    "elementary": ("Write so that an elementary school student can understand it.",
                   ("simple", "eli5"), "P1A_elementary"),
    "expert": ("Write for an expert: only a PhD student in the field should fully understand it.",
               ("technical",), "P1B_expert"),
    "concise": ("Be concise and to the point; never be verbose.", ("brief", "short"), "P2A_concise"),
    "friendly": ("Be friendly, witty and humorous, like a close friend.", (), "P3A_friendly"),
    "unfriendly": ("Answer in an unfriendly manner.", ("rude",), "P3B_unfriendly"),
    "sassy": ("Answer in a sassy manner.", (), "P3C_sassy"),
    "sarcastic": ("Answer in a sarcastic manner.", (), "P3D_sarcastic"),
}


def _dimension_data() -> dict[str, Any]:
    text = resources.files("personajudge.preferences").joinpath("data/preference_dimensions.json").read_text()
    return json.loads(text)


def builtin_preferences() -> list[Preference]:
    data = _dimension_data()
    dims = {**data["paper_dimensions"], **data["psoups_dimensions"]}
    out = []
    for name, (instruction, aliases, key) in _BUILTINS.items():
        src = "P-Soups" if key.startswith("P") else "Persona-judge paper"
        out.append(Preference(name=name, description=dims[key], instruction=instruction, aliases=aliases,
                              source=src))
    return out


#: Name -> preference; the registry of the plugin system is one (built-ins plus plugins').
Library = Mapping[str, Preference]


@functools.cache
def _builtin_library() -> dict[str, Preference]:
    return {p.name: p for p in builtin_preferences()}


def lookup(name: str, library: Library | None = None) -> Preference | None:
    """A named preference by name or alias (case-insensitive), or None.

    ``library`` defaults to the built-in preferences; the API passes the
    plugin registry, so names that plugins register resolve too.
    """
    lib = _builtin_library() if library is None else library
    key = name.strip().lower()
    if key in lib:
        return lib[key]
    for pref in lib.values():
        if key in pref.aliases:
            return pref
    return None


def resolve(spec: str | Preference, library: Library | None = None) -> Preference:
    """A built-in name, an alias, or a free-text description -> Preference.

    A single word that is not a known name is an error (with suggestions)
    rather than silently becoming free text: a typo like ``concize`` should not
    quietly turn into the instruction "concize".
    """
    if isinstance(spec, Preference):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise PreferenceError("empty preference: give a built-in name (see `personajudge preferences`) "
                              "or a description such as \"explain like I'm five\"")
    lib = _builtin_library() if library is None else library
    found = lookup(spec, lib)
    if found is not None:
        return found
    text = spec.strip()
    if len(text.split()) == 1:
        names = list(lib) + [a for p in lib.values() for a in p.aliases]
        close = difflib.get_close_matches(text.lower(), names, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise PreferenceError(f"unknown preference '{text}'{hint} (list them with `personajudge preferences`; "
                              "a description with spaces is used as free text)")
    return Preference.free_text(text)


def load_file(path: str | Path, library: Library | None = None) -> list[Preference]:
    """Preferences from a TOML, JSON or YAML file.

    The file holds a list whose entries are names / descriptions (strings) or
    tables with ``name``, ``description`` and optional ``instruction`` and
    ``weight``. TOML keeps the list under ``preferences``.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise PreferenceError(f"cannot read preferences file {p}: {err.strerror or err}") from None
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text).get("preferences")
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise PreferenceError("reading YAML needs PyYAML: pip install pyyaml") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except PreferenceError:
        raise
    except Exception as err:  # each parser has its own error type
        raise PreferenceError(f"preferences file {p} does not parse: {str(err).splitlines()[0]}") from None
    if not isinstance(data, list) or not data:
        raise PreferenceError(f"preferences file {p} must hold a non-empty list of preferences"
                              + (" under the key 'preferences'" if suffix == ".toml" else ""))
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(resolve(item, library))
        elif isinstance(item, dict):
            try:
                desc = item.get("description") or ""
                out.append(Preference(name=item.get("name") or Preference.free_text(desc).name, description=desc,
                                      instruction=item.get("instruction") or desc,
                                      weight=item.get("weight", 1.0), source=str(p)))
            except Exception as err:
                raise PreferenceError(f"preferences file {p}, entry {i + 1}: "
                                      f"{str(err).splitlines()[-1].strip()}") from None
        else:
            raise PreferenceError(f"preferences file {p}, entry {i + 1}: expected a string or a table")
    return out
