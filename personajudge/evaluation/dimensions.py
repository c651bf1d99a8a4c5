"""Which scorer measures which preference dimension, and in which direction.

A win rate needs, for a preference dimension such as ``concise``, a scorer and
a direction ("lower length is more concise"). The defaults are the measurable
proxies of the P-Soups dimensions:

==============  ========  =========
dimension       scorer    better
==============  ========  =========
concise         length    lower
informative     length    higher
friendly        vader     higher
unfriendly      vader     lower
elementary      flesch    lower
expert          flesch    higher
==============  ========  =========

``--dimension NAME=SCORER:higher|lower`` adds one (SCORER is a scorer alias of
the run, e.g. a reward model: ``--dimension helpful=rm:higher``). Pairwise
scorers (``pairwise-judge``) judge every dimension directly and need no entry.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .errors import EvalError

Direction = Literal["higher", "lower"]


class DimensionScorer(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    dimension: str
    scorer: str
    direction: Direction

    @property
    def arrow(self) -> str:
        return "↑" if self.direction == "higher" else "↓"


DEFAULT_DIMENSIONS: tuple[DimensionScorer, ...] = tuple(
    DimensionScorer(dimension=d, scorer=s, direction=dr)  # type: ignore[arg-type]
    for d, s, dr in (
        ("concise", "length", "lower"),
        ("informative", "length", "higher"),
        ("friendly", "vader", "higher"),
        ("unfriendly", "vader", "lower"),
        ("elementary", "flesch", "lower"),
        ("expert", "flesch", "higher"),
    )
)


def parse_dimension(spec: str) -> DimensionScorer:
    """``NAME=SCORER:higher|lower`` -> DimensionScorer."""
    try:
        name, rest = spec.split("=", 1)
        scorer, direction = rest.rsplit(":", 1)
    except ValueError:
        raise EvalError(f"--dimension expects NAME=SCORER:higher|lower, got {spec!r}") from None
    name, scorer, direction = name.strip(), scorer.strip(), direction.strip().lower()
    if direction not in ("higher", "lower"):
        raise EvalError(f"--dimension {spec!r}: direction must be 'higher' or 'lower'")
    if not name or not scorer:
        raise EvalError(f"--dimension expects NAME=SCORER:higher|lower, got {spec!r}")
    return DimensionScorer(dimension=name, scorer=scorer, direction=direction)  # type: ignore[arg-type]


def dimension_table(
    extra: list[DimensionScorer], aliases: dict[str, str], names: Iterable[str] | None = None
) -> list[DimensionScorer]:
    """Defaults plus ``extra``, keeping the entries whose scorer is in the run.

    ``aliases`` maps each scorer alias of the run to its registered name: a
    default entry for ``length`` applies to every alias whose scorer is
    ``length``. User entries name aliases and override defaults for the same
    (dimension, scorer). ``names``: the run's dimension names; a user entry for
    another one (a typo, or a slug that got a hash suffix) is an error, as a
    scorer not in the run is: it would measure nothing, in silence.
    """
    known = list(dict.fromkeys(names)) if names is not None else None
    for d in extra:
        if known is not None and d.dimension not in known:
            near = difflib.get_close_matches(d.dimension, known, n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise EvalError(
                f"--dimension {d.dimension}={d.scorer}:{d.direction}: this run has no dimension "
                f"{d.dimension!r}; {hint}its dimensions are {', '.join(known) or 'none'}"
            )
    out: dict[tuple[str, str], DimensionScorer] = {}
    for d in DEFAULT_DIMENSIONS:
        for alias, name in aliases.items():
            if name == d.scorer:
                out[(d.dimension, alias)] = DimensionScorer(dimension=d.dimension, scorer=alias, direction=d.direction)
    for d in extra:
        if d.scorer not in aliases:
            raise EvalError(
                f"--dimension {d.dimension}={d.scorer}:{d.direction}: '{d.scorer}' is not one of "
                f"this run's scorers ({', '.join(aliases) or 'none'}); add it to --scorers"
            )
        out[(d.dimension, d.scorer)] = d
    return list(out.values())
