"""``vader``: VADER compound sentiment of the response, in [-1, 1] (vaderSentiment).

Higher is friendlier/more positive, lower more hostile. An empty response
scores 0 (neutral), as VADER itself does.
"""

from __future__ import annotations

from personajudge.plugins import hookimpl

from .base import PointwiseScorer, missing_dependency


class VaderScorer(PointwiseScorer):
    requires = (("vaderSentiment", "eval"),)
    name = "vader"
    description = "VADER compound sentiment in [-1, 1] (higher = friendlier, lower = more hostile)."

    def __init__(self, **options):
        super().__init__(**options)
        try:
            from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
        except ImportError:
            raise missing_dependency("vader", "vaderSentiment") from None
        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, prompt: str, response: str) -> float:
        return float(self._analyzer.polarity_scores(response)["compound"])


@hookimpl
def register_scorers(register):
    register(VaderScorer)
