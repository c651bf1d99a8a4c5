"""PAD's routed session (its reward view on another model): the two models must share one tokenizer,
and a mismatch is one ConfigError naming both vocabularies, whichever model is the larger.

Before, a main model larger than the reward model failed at its first forward with the reward
session's range check ("token ids must be in 0..32; view 0 got 244822"), which names neither model.
"""

import numpy as np
import pytest

from personajudge.backends.toy import ToyBackend
from personajudge.core.contract import Session
from personajudge.core.errors import ConfigError
from personajudge.core.routed import RoutedSession


class Wide(Session):
    """Zero logits of ``width`` columns; ``vocab_size`` declared or not (None: the check is the logits')."""

    def __init__(self, width: int, declared: bool = True):
        super().__init__(1, 64, width if declared else None)
        self.width = width

    def _forward_many(self, calls):
        return [np.zeros((c.n_logits, self.width), dtype=np.float32) for c in calls]

    def _truncate(self, view, length):
        pass


def toy(n_views=2):
    return ToyBackend().open(n_views)


@pytest.mark.parametrize("main_is_larger", [True, False])
def test_a_vocabulary_mismatch_is_refused_as_the_session_is_built(main_is_larger):
    small = toy()
    big = Wide(262144)
    main, other = (big, toy(1)) if main_is_larger else (small, big)
    with pytest.raises(ConfigError) as info:
        RoutedSession(main, other, routed=[1] if not main_is_larger else [0])
    reward, model = (33, 262144) if main_is_larger else (262144, 33)
    assert str(info.value) == (
        f"the reward model's vocabulary ({reward} entries) differs from the model's ({model}); "
        "PAD needs both to share one tokenizer"
    )


def test_a_session_that_declares_no_vocabulary_is_checked_by_its_logits():
    routed = RoutedSession(toy(), Wide(40, declared=False), routed=[1])
    with pytest.raises(ConfigError, match=r"vocabulary \(40 entries\) differs from the model's \(33\)"):
        routed.forward_many([(0, [1, 2], 1), (1, [1, 2], 1)])


def test_one_vocabulary_routes_each_view_to_its_model():
    main, other = toy(), toy(1)
    routed = RoutedSession(main, other, routed=[1])
    out = routed.forward_many([(0, [1, 2, 3], 1), (1, [4, 5], 2)])
    assert [o.shape for o in out] == [(1, 33), (2, 33)]
    assert main._ctx[0] == [1, 2, 3] and main._ctx[1] == [] and other._ctx[0] == [4, 5]
