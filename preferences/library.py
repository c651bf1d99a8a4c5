"""The built-in library of named preferences.

It covers the nine dimensions of the Persona-judge paper's experiments and the
P-Soups dimensions (Jang et al. 2023). The working definitions come from
``data/preference_dimensions.json`` (copied from the project's shared data);
the instructions are this project's own wording. The library is registered
through the ``register_preferences`` hook, so plugins can add names the same
way.

Every built-in preference also carries three question/answer exemplars from
``data/exemplars.json``, written by this project for the ``exemplar`` encoder
(short, varied topics, none taken from an evaluation set). The same file holds
``neutral`` exemplars (plain, unstyled answers) for a view with no preference,
so ``base`` is prompted in the same format as the personalized views, and
``combined`` exemplars for compatible pairs (``concise+friendly``), whose
answers show both preferences at once.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from personajudge.core.config import validation_message
from personajudge.core.errors import PreferenceError, UnknownPreferenceError, selection_hint
from personajudge.core.files import read_text

from .model import Example, Preference

#: name -> (instruction, aliases, dimension key in the data file)
_BUILTINS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "helpful": (
        "Be as helpful as possible: give useful information, resources and concrete suggestions.",
        (),
        "helpful",
    ),
    "harmless": (
        "Be harmless: avoid offensive, discriminatory, dangerous or otherwise harmful content.",
        ("safe",),
        "harmless",
    ),
    "humor": ("Be humorous: keep the tone cheerful, playful and amusing.", ("humorous", "humour", "funny"), "humor"),
    "correct": (
        "Be correct: state only what is factually accurate, and no falsehoods.",
        ("accurate", "factual"),
        "correct",
    ),
    "informative": (
        "Be very informative: cover all the relevant background and details, leaving nothing out.",
        (),
        "P2B_informative",
    ),
    "professional": (
        "Be professional: write in a formal, polished and businesslike tone.",
        ("formal",),
        "professional",
    ),
    "creative": ("Be creative: offer original, imaginative and inventive ideas.", (), "creative"),
    "touching": (
        "Be touching: write with emotional resonance that evokes empathy and feeling.",
        ("emotional",),
        "touching",
    ),
    "vivid": ("Be vivid: use rich, concrete description full of sensory detail.", ("descriptive",), "vivid"),
    "elementary": (
        "Write so that an elementary school student can understand it.",
        ("simple", "eli5"),
        "P1A_elementary",
    ),
    "expert": (
        "Write for an expert: only a PhD student in the field should fully understand it.",
        ("technical",),
        "P1B_expert",
    ),
    "concise": ("Be concise and to the point; never be verbose.", ("brief", "short"), "P2A_concise"),
    "friendly": ("Be friendly, witty and humorous, like a close friend.", (), "P3A_friendly"),
    "unfriendly": ("Answer in an unfriendly manner.", ("rude",), "P3B_unfriendly"),
    "sassy": ("Answer in a sassy manner.", (), "P3C_sassy"),
    "sarcastic": ("Answer in a sarcastic manner.", (), "P3D_sarcastic"),
}


def _dimension_data() -> dict[str, Any]:
    text = resources.files("personajudge.preferences").joinpath("data/preference_dimensions.json").read_text()
    return json.loads(text)


@functools.cache
def _exemplar_data() -> dict[str, Any]:
    text = resources.files("personajudge.preferences").joinpath("data/exemplars.json").read_text(encoding="utf-8")
    data = json.loads(text)
    as_examples = lambda items: tuple(Example.model_validate(x) for x in items)  # noqa: E731
    return {
        "single": {k: as_examples(v) for k, v in data["single"].items()},
        "combined": {k: as_examples(v) for k, v in data["combined"].items()},
    }


def neutral_examples() -> tuple[Example, ...]:
    """Exemplars with plain, unstyled answers: what a view with no preference is shown."""
    return _exemplar_data()["single"]["neutral"]


def combined_examples(names: Sequence[str]) -> tuple[Example, ...] | None:
    """Exemplars written to show all of ``names`` at once (built-in names), or None if there are none.

    Keys in the data file join the names in alphabetical order with ``+``.
    """
    return _exemplar_data()["combined"].get("+".join(sorted(set(names))))


def builtin_examples(name: str) -> tuple[Example, ...]:
    """The built-in exemplars of a built-in preference name (empty for any other name)."""
    return _exemplar_data()["single"].get(name, ()) if name != "neutral" else ()


def builtin_preferences() -> list[Preference]:
    data = _dimension_data()
    dims = {**data["paper_dimensions"], **data["psoups_dimensions"]}
    out = []
    for name, (instruction, aliases, key) in _BUILTINS.items():
        src = "P-Soups" if key.startswith("P") else "Persona-judge paper"
        out.append(
            Preference(
                name=name,
                description=dims[key],
                instruction=instruction,
                aliases=aliases,
                source=src,
                examples=builtin_examples(name),
            )
        )
    return out


#: Name -> preference; the registry of the plugin system is one (built-ins plus plugins').
Library = Mapping[str, Preference]


@functools.cache
def _builtin_library() -> dict[str, Preference]:
    return {p.name: p for p in builtin_preferences()}


def lookup(name: str, library: Library | None = None) -> Preference | None:
    """A named preference by name or alias (case-insensitive on both sides), or None.

    Names are tried before aliases. ``library`` defaults to the built-in
    preferences; the API passes the plugin registry, so names that plugins
    register resolve too (a plugin's ``Pirate`` is found as ``pirate``).
    """
    if not isinstance(name, str):
        raise PreferenceError(f"a preference name is a string, got {type(name).__name__}")
    lib = _builtin_library() if library is None else library
    key = name.strip().lower()
    if key in lib:
        return lib[key]
    for pref in lib.values():
        if pref.name.lower() == key:
            return pref
    for pref in lib.values():
        if any(a.lower() == key for a in pref.aliases):
            return pref
    return None


#: what a typo of a preference name looks like (a name is one ASCII word)
_NAME_LIKE = re.compile(r"[A-Za-z0-9_-]+")
#: punctuation around a word that would otherwise be a name (``concise.``, ``"humor"``)
_AROUND = "".join(c for c in string.punctuation if c not in "-_")
#: what joins names in a string that is no description: ``concise+friendly`` (the README's and
#: ``eval --pair``'s notation for one view of both), ``concise;humor``, ``concise/humor``, ``concise|humor``
_JOINERS = re.compile(r"[,;/|+]")


def _close_names(text: str, lib: Library) -> list[str]:
    names = [p.name for p in lib.values()] + [a for p in lib.values() for a in p.aliases]
    by_lower = {n.lower(): n for n in names}
    return [by_lower[c] for c in difflib.get_close_matches(text.lower(), list(by_lower), n=3, cutoff=0.6)]


def _not_a_description(text: str, lib: Library) -> PreferenceError | None:
    """The error for text that reads as preference *names*, which free text would silently change:
    ``concise,humor`` (two names in one string) and ``concise.`` (a name with punctuation), or None.

    Names joined by other punctuation (``concise;humor``, ``concise+friendly``, ``concise,humor.``)
    are refused alike, with the ways to say one view or two.

    Refused rather than resolved: ``concise.`` could be meant as the one-word description, and a
    list in one string could be meant as one view or as two; the user says which."""
    parts = [x.strip() for x in text.split(",")]
    if len(parts) > 1 and all(parts) and all(lookup(x, lib) is not None for x in parts):
        sep, comma = " --prefer ".join(parts), ",".join(parts)
        listed = ", ".join(repr(x) for x in parts)
        return PreferenceError(
            f"'{text}' lists the preferences {', '.join(parts)} in one string: give them separately, "
            f"one view each (--prefer {sep}; in Python preferences=[{listed}]), or as one view "
            f"(--view {comma}; in Python views=[[{listed}]])"
        )
    joined = [x.strip() for x in _JOINERS.split(text)]
    if len(joined) > 1 and all(joined) and all(lookup(x.strip(_AROUND), lib) is not None for x in joined):
        names = [x.strip(_AROUND) for x in joined]
        comma, listed = ",".join(names), ", ".join(repr(x) for x in names)
        return PreferenceError(
            f"'{text}' reads as the preferences {', '.join(names)} joined by punctuation: as one view give "
            f"--view {comma} (or {'+'.join(names)}; in Python views=[[{listed}]]), or one view each "
            f"--prefer {' --prefer '.join(names)} (preferences=[{listed}]); a description is a sentence"
        )
    if not any(c.isspace() for c in text):
        core = text.strip(_AROUND)
        found = lookup(core, lib) if core and core != text else None
        if found is not None:
            return UnknownPreferenceError(
                f"unknown preference '{text}'; did you mean {core}? (a name has no punctuation around it; "
                "a description with spaces is used as free text)"
            )
    return None


def resolve(
    spec: str | Preference | Mapping[str, Any], library: Library | None = None, *, where: str | None = None
) -> Preference:
    """A built-in name, an alias, a free-text description, or a table -> Preference.

    A single word that is not a known name is an error (with suggestions)
    rather than silently becoming free text: a typo like ``concize`` should not
    quietly turn into the instruction "concize". Only what could be a name
    counts as such a word (ASCII letters, digits, ``-`` and ``_``, as every
    name is): a description in a script written without spaces
    (``简洁明了地回答``) is free text. Known names that only look like a
    description are errors too: ``concise,humor`` (several names in one
    string: one view or two?) and ``concise.`` (a name with punctuation).

    A table (a mapping) is read as a preferences file's entry is (``name``, ``description``,
    ``instruction``, ``weight``, ``examples``; without a ``description`` it adjusts the named
    preference): what a config's ``preferences`` and ``views`` may hold, and what a run's
    ``settings`` report for a preference a file or a caller defined (:meth:`Preference.definition`).
    ``where`` names it in an error (default ``preference table``).

    A free-text preference is named by a slug of its text (``talk-like-a-pirate``); where that slug
    is a name or alias in ``library`` (``"humor !"`` gives ``humor``) it is named by its whole text
    instead, so no label or report passes it off as the registered preference.
    """
    if isinstance(spec, Preference):
        return spec
    if isinstance(spec, Mapping):
        return _from_table(dict(spec), where or "preference table", "table", library)
    if spec is not None and not isinstance(spec, str):
        raise PreferenceError(
            f"a preference is a name, a description, a table or a Preference, got {type(spec).__name__}"
        )
    if spec is None or not spec.strip():
        raise PreferenceError(
            "empty preference: give a built-in name (see `personajudge preferences`) "
            'or a description such as "explain like I\'m five"'
        )
    lib = _builtin_library() if library is None else library
    found = lookup(spec, lib)
    if found is not None:
        return found
    text = spec.strip()
    if _NAME_LIKE.fullmatch(text):
        close = _close_names(text, lib)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownPreferenceError(
            f"unknown preference '{text}'{hint} (list them with `personajudge preferences`; "
            f"a description with spaces is used as free text){selection_hint()}"
        )
    err = _not_a_description(text, lib)
    if err is not None:
        raise err
    pref = Preference.free_text(text)  # a bad one (a lone surrogate) is a one-line PreferenceError
    if lookup(pref.name, lib) is not None:  # the slug of "humor !" is the built-in humor's name
        pref = pref.model_copy(update={"name": text})
    return pref


def load_file(path: str | Path, library: Library | None = None) -> list[Preference]:
    """Preferences from a TOML, JSON or YAML file.

    The file holds a list whose entries are names / descriptions (strings) or
    tables with ``name``, ``description`` and optional ``instruction``,
    ``weight`` and ``examples`` (a list of ``{q = "...", a = "..."}``
    question/answer demonstrations, one line each, for the ``exemplar``
    encoder). A table with a library ``name`` and no ``description`` adjusts
    that preference (its own examples replace the built-in ones). TOML keeps
    the list under ``preferences`` (``[[preferences]]`` tables); a JSON or YAML
    file is the list itself or, so that one layout serves every format, an
    object with the list under ``preferences``.
    """
    p = Path(path).expanduser()  # ``~``, as in a config or a model path
    text = read_text(p, "preferences file", PreferenceError)  # a binary file: one line naming the byte
    suffix = p.suffix.lower()
    try:
        if suffix == ".toml":
            data: Any = tomllib.loads(text)
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
    if isinstance(data, dict):
        data = data.get("preferences")
    if not isinstance(data, list) or not data:
        raise PreferenceError(
            f"preferences file {p} must hold a non-empty list of preferences"
            + (" under the key 'preferences'" if suffix == ".toml" else ", or an object with one under 'preferences'")
        )
    out: list[Preference] = []
    first: dict[str, int] = {}  # lower-cased name -> index of the entry that has it
    for i, item in enumerate(data):
        where = f"preferences file {p}, entry {i + 1}"
        if isinstance(item, str):
            try:
                pref = resolve(item, library)
            except PreferenceError as err:  # the same type (an unknown name stays one), with where it is
                raise type(err)(f"{where}: {err}") from None
        elif isinstance(item, dict):
            pref = _from_table(item, where, str(p), library)
        else:
            raise PreferenceError(f"{where}: expected a string or a table")
        # A view names a file's preference by its name (in any case): two entries of one name would be
        # two views labelled alike, and ``--view NAME`` would silently take one of them.
        j = first.setdefault(pref.name.lower(), i)
        if j != i:
            raise PreferenceError(
                f"preferences file {p}: entries {j + 1} and {i + 1} are both named '{pref.name}' (names match "
                "in any case, an alias counts as its name): give each preference once, with its own name"
            )
        out.append(pref)
    return out


_TABLE_KEYS = ("name", "description", "instruction", "weight", "examples")


def _from_table(item: dict[str, Any], where: str, source: str, library: Library | None) -> Preference:
    """One table of a preferences file -> Preference, with errors that name the entry and the field."""
    unknown = sorted(set(item) - set(_TABLE_KEYS))
    if unknown:
        raise PreferenceError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(_TABLE_KEYS)}")
    examples = item.get("examples", ())
    if not isinstance(examples, list | tuple) or not all(isinstance(x, dict) for x in examples):
        raise PreferenceError(f'{where}: examples must be a list of tables like {{q = "...", a = "..."}}')
    for key in ("name", "description", "instruction"):
        if item.get(key) is not None and not isinstance(item[key], str):
            raise PreferenceError(f"{where}: {key} must be a string, got {type(item[key]).__name__}")
    name, desc = item.get("name"), item.get("description") or ""
    if isinstance(name, str) and "," in name:
        raise PreferenceError(
            f"{where}: the name '{name.strip()}' holds a comma, and --view (a server's views too) splits "
            "names at commas, so no view could name it; give it a name without one"
        )
    if not (isinstance(name, str) and name.strip()) and not desc.strip():
        raise PreferenceError(f"{where}: a preference table needs a name (and a description, for a new preference)")
    known = lookup(name, library) if isinstance(name, str) and name.strip() and not desc else None
    if known is None and not desc and isinstance(name, str) and name.strip():
        close = _close_names(name.strip(), _builtin_library() if library is None else library)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownPreferenceError(
            f"{where}: '{name.strip()}' is no preference name{hint} (a table without a description adjusts "
            f"a named preference; a new one needs a description){selection_hint()}"
        )
    try:
        if known is not None:  # a library preference, adjusted
            update = {k: item[k] for k in ("instruction", "weight", "examples") if k in item}
            return Preference.model_validate({**known.model_dump(), **update, "source": source})
        return Preference.model_validate(
            {
                "name": name or Preference.free_text(desc).name,
                "description": desc,
                "instruction": item.get("instruction") or desc,
                "weight": item.get("weight", 1.0),
                "examples": examples,
                "source": source,
            }
        )
    except PreferenceError:
        raise
    except Exception as err:  # pydantic's ValidationError, as one line naming the field
        raise PreferenceError(f"{where}: {validation_message(err)}") from None
