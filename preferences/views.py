"""Grouping preferences into views (multi-objective composition)."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

from personajudge.core.errors import PersonaJudgeWarning, PreferenceError

from .library import _NAME_LIKE, Library, _builtin_library, lookup, resolve
from .model import Preference

#: what the user may give for one preference: a name, a description, a table (a preferences file's
#: entry, as a config holds it) or a :class:`Preference`
PreferenceSpec = str | Preference | Mapping[str, Any]


def with_definitions(library: Library | None, preferences: Sequence[PreferenceSpec]) -> Library:
    """``library`` (default: the built-ins) with the :class:`Preference` objects of ``preferences``
    added by name, replacing a library entry of the same name.

    So the preferences a preferences file (or a caller) defines or adjusts are what the names of the
    call mean, in ``--view`` and ``--prefer`` alike: ``--preferences-file prefs.toml --view
    pirate,concise`` finds the file's ``pirate``, and the file's ``concise`` (own examples) wins over
    the built-in there, as it does for ``--prefer concise``. Two objects of one name (in any case)
    that prompt differently are a :class:`PreferenceError`: a name could then mean either.
    """
    defs = [p for p in preferences if isinstance(p, Preference)]
    base = _builtin_library() if library is None else library
    if not defs:
        return base
    by_name = _by_name(defs)
    merged = {k: v for k, v in base.items() if v.name.lower() not in by_name}
    merged.update((p.name, p) for p in by_name.values())
    return merged


def _by_name(defs: Sequence[Preference]) -> dict[str, Preference]:
    """``defs`` by lower-case name; two of one name (in any case) that prompt differently are a
    :class:`PreferenceError`: a name could then mean either."""
    by_name: dict[str, Preference] = {}
    for p in defs:
        other = by_name.setdefault(p.name.lower(), p)
        if _key(other) != _key(p):
            named = f"'{p.name}'" if p.name == other.name else f"'{other.name}' and '{p.name}'"
            raise PreferenceError(
                f"two preferences are named {named} and prompt differently (names match in any case): "
                "a view's name could mean either; give each its own name"
            )
    return by_name


def named_by(specs: Sequence[PreferenceSpec], definitions: Sequence[Preference]) -> list[PreferenceSpec]:
    """``specs`` with every string that one of ``definitions`` names (by name or alias, in any case)
    replaced by that definition: a preferences file used as a dictionary (``--prefer pirate`` next to
    ``--preferences-file``, a server request's ``preferences``, a call's ``Preference`` objects beside
    their names). Anything else stays as it is, to resolve in the library."""
    own = with_definitions({}, definitions)
    return [(lookup(p, own) or p) if isinstance(p, str) else p for p in specs]


def reported(pref: Preference, library: Library | None = None) -> str | dict[str, Any]:
    """How a run's ``settings`` report ``pref``: the simplest value that resolves back to the same prompt
    in ``library`` (default: the built-ins) alone, so a config built from the settings repeats the run.

    - a registered preference (or one equal to it in all that decides its prompt): its name;
    - a free-text preference: its text (``"humor !"``, not the slug ``humor`` it might be named by);
    - anything a preferences file or a caller defined or adjusted (a ``pirate``; a ``concise`` with its
      own examples, instruction or weight): its full :meth:`~Preference.definition`, a table that
      ``RunConfig.preferences`` and ``views`` (and a preferences file) accept.
    """
    lib = _builtin_library() if library is None else library
    named = lookup(pref.name, lib)
    if named is not None and _key(named) == _key(pref):
        return pref.name
    try:
        again: Preference | None = resolve(pref.description, lib)
    except PreferenceError:  # a description that is an unknown word, say: it is no free text
        again = None
    if again is not None and _key(again) == _key(pref):
        return pref.description
    return pref.definition()


def build_views(
    preferences: Sequence[PreferenceSpec] = (),
    views: Sequence[Sequence[PreferenceSpec]] | None = None,
    library: Library | None = None,
) -> list[list[Preference]]:
    """The user's views.

    - ``views`` given: each inner list is one view carrying all its preferences
      (``[["concise", "humor"], ["expert"]]``); names inside a view may also
      be one comma-separated string (``"concise,humor"``: split only when every
      piece could be a name, so a description with a comma stays one preference). The :class:`Preference` objects among
      ``preferences`` (a preferences file's) define names the views may use
      (see :func:`with_definitions`).
    - otherwise: one view per preference, the paper's two-view setting.
    - no preferences at all: a single view with none.

    Names resolve in ``library`` (default: the built-ins) with the :class:`Preference` objects among
    ``preferences`` (see :func:`with_definitions`), in either case. A table (a mapping) is read as a
    preferences file's entry (see :func:`~personajudge.preferences.resolve`).
    """
    lib = with_definitions(library, preferences)
    defined = [p for p in preferences if isinstance(p, Preference)]
    if views:
        out = []
        for i, group in enumerate(views):
            items: list[PreferenceSpec] = []
            for g in group:
                items.extend(view_names(g, lib) if isinstance(g, str) else [g])
            if not items:
                raise PreferenceError(f"view {i + 1} is empty")
            view = [resolve(x, lib, where=f"views[{i}][{j}]") for j, x in enumerate(items)]
            defined += [r for x, r in zip(items, view) if isinstance(x, Mapping)]
            out.append(view)
        # a table defines a preference as a Preference object (a file's entry) does: one name, one meaning
        _by_name(defined)
        return out
    prefs = [resolve(p, lib, where=f"preferences[{i}]") for i, p in enumerate(preferences)]
    _by_name([*defined, *(r for x, r in zip(preferences, prefs) if isinstance(x, Mapping))])
    return [[p] for p in prefs] or [[]]


def view_names(text: str, lib: Library) -> list[str]:
    """One string of a view: ``"concise,humor"`` is two names (so is ``"concise+humor"``, the
    README's and ``eval --pair``'s notation for one view of both), but ``"answer briefly, with humour"``
    is one free-text description (the CLI's ``--view`` goes through here too, with ``lib`` holding a
    preferences file's names). It is split at its commas when every piece could be a name (a
    registered one, or one word, which then resolves to a name or fails with a did-you-mean);
    a comma inside a sentence would otherwise cut it into two preferences."""
    if text.strip() and lookup(text, lib) is not None:  # a name as a whole (a file's "pro+con")
        return [text.strip()]
    pieces = [s.strip() for s in text.split(",") if s.strip()]
    if not pieces:  # only commas and spaces: nothing (an empty view is refused by name)
        return []
    names: list[str] = []
    for piece in pieces:  # concise+friendly: one view of both, as eval --pair reads it
        plus = [x.strip() for x in piece.split("+")]
        if lookup(piece, lib) is None and len(plus) > 1 and all(plus):
            names += plus
        else:
            names.append(piece)
    if len(names) > 1 and all(lookup(s, lib) is not None or _NAME_LIKE.fullmatch(s) for s in names):
        return names
    return [text.strip()]


def _key(p: Preference) -> tuple[Any, ...]:
    """What decides the prompt of ``p`` (its :meth:`~Preference.definition`; not its aliases or
    source): two preferences of one name whose examples or weight differ prompt differently."""
    return (p.name, p.description, p.instruction, p.weight, p.examples)


def duplicates(views: Sequence[Sequence[Preference]]) -> str | None:
    """What repeats in ``views``, in one line, or None: a preference twice in one view (its
    instruction and exemplars shown twice; an alias counts as its name) and views that carry the
    same preferences (whatever their order), which judge each other as one view would. Preferences
    are the same when all that decides their prompt is (name, description, instruction, weight and
    examples): a file's ``concise`` with its own examples is not the built-in ``concise``."""
    found = []
    for i, view in enumerate(views):
        keys = [_key(p) for p in view]
        twice = sorted({k[0] for k in keys if keys.count(k) > 1})
        if twice:
            found.append(f"view {i + 1} lists {', '.join(twice)} twice (an alias counts as its name)")
    seen: dict[frozenset[tuple[Any, ...]], int] = {}
    for i, view in enumerate(views):
        key = frozenset(_key(p) for p in view)
        if key in seen:
            names = ", ".join(p.name for p in view) or "no preference"
            found.append(f"views {seen[key] + 1} and {i + 1} carry the same preferences ({names})")
        else:
            seen[key] = i
    if not found:
        return None
    return "; ".join(found) + ": a repeat adds nothing (give each preference once, and distinct views)"


def warn_duplicates(views: Sequence[Sequence[Preference]], stacklevel: int = 2) -> None:
    """One :class:`PersonaJudgeWarning` naming every repeat in ``views`` (see :func:`duplicates`)."""
    msg = duplicates(views)
    if msg is not None:
        warnings.warn(msg, PersonaJudgeWarning, stacklevel=stacklevel + 1)
