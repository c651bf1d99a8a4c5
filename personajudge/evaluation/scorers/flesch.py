"""``flesch``: Flesch-Kincaid grade level of the response (textstat).

Lower grades read as more elementary, higher as more expert. Empty responses
score NaN (excluded from means and win rates, and counted in the report).

Syllables: textstat >= 0.7.4 looks English words up in NLTK's CMU
pronouncing dictionary and *downloads* it on first use, which fails offline and
makes results depend on the machine. By default (``syllables="pyphen"``) this
scorer uses textstat's own pyphen hyphenation fallback for every word instead:
the same numbers on every machine, no network. ``syllables="cmudict"`` keeps
textstat's lookup (install the NLTK ``cmudict`` corpus first).
"""

from __future__ import annotations

import math
from typing import Literal

from personajudge.plugins import hookimpl

from .base import PointwiseScorer, ScorerOptions, missing_dependency

_mode = {"syllables": "pyphen"}
_patched = False


def _textstat(syllables: str):
    global _patched
    try:
        import textstat
    except ImportError:
        raise missing_dependency("flesch", "textstat") from None
    try:
        from textstat.backend.counts import _count_syllables as cs  # textstat >= 0.7.4
    except ImportError:  # older textstat: pyphen only, nothing to patch
        return textstat
    if not _patched:
        original = cs.get_cmudict

        def get_cmudict(lang):
            return None if _mode["syllables"] == "pyphen" else original(lang)

        cs.get_cmudict = get_cmudict
        _patched = True
    if _mode["syllables"] != syllables:
        _mode["syllables"] = syllables
        if hasattr(cs.count_syllables, "cache_clear"):
            cs.count_syllables.cache_clear()
    return textstat


class FleschOptions(ScorerOptions):
    syllables: Literal["pyphen", "cmudict"] = "pyphen"


class FleschScorer(PointwiseScorer):
    requires = (("textstat", "eval"),)
    name = "flesch"
    description = "Flesch-Kincaid grade level, textstat (lower = more elementary, higher = more expert)."
    Options = FleschOptions
    options: FleschOptions

    def __init__(self, **options):
        super().__init__(**options)
        self._ts = _textstat(self.options.syllables)

    def score(self, prompt: str, response: str) -> float:
        if not response.split():
            return math.nan
        _textstat(self.options.syllables)
        return float(self._ts.flesch_kincaid_grade(response))


@hookimpl
def register_scorers(register):
    register(FleschScorer)
