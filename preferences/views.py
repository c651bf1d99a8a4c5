"""Grouping preferences into views (multi-objective composition)."""

from __future__ import annotations

from collections.abc import Sequence

from personajudge.core.errors import PreferenceError

from .library import Library, resolve
from .model import Preference


def build_views(
    preferences: Sequence[str | Preference] = (),
    views: Sequence[Sequence[str | Preference]] | None = None,
    library: Library | None = None,
) -> list[list[Preference]]:
    """The user's views.

    - ``views`` given: each inner list is one view carrying all its preferences
      (``[["concise", "humor"], ["expert"]]``); a name inside a view may also
      be one comma-separated string.
    - otherwise: one view per preference, the paper's two-view setting.
    - no preferences at all: a single view with none.

    Names resolve in ``library`` (default: the built-ins).
    """
    if views:
        out = []
        for i, group in enumerate(views):
            items: list[str | Preference] = []
            for g in group:
                items.extend(s.strip() for s in g.split(",") if s.strip()) if isinstance(g, str) else items.append(g)
            if not items:
                raise PreferenceError(f"view {i + 1} is empty")
            out.append([resolve(x, library) for x in items])
        return out
    prefs = [resolve(p, library) for p in preferences]
    return [[p] for p in prefs] or [[]]
