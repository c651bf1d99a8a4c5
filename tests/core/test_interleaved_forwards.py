"""The interleaved schedule issues one forward per committed token, whatever is accepted.

The speed argument of the README ("Performance", "GPU check") rests on it: a rejection changes which
rows a step asks for, not how many steps there are, and never rolls a cache back. So a persona-judge run
whose drafts are mostly rejected (the GPU run's random 7B weights accepted 0.3 % of them) costs as
many forwards as one that accepts all, and a gap between the step model and a measured run is not the
acceptance rate. Driven here with two views whose filtered distributions overlap by a chosen amount.
"""

from __future__ import annotations

import numpy as np
import pytest

from personajudge.bench.steps import _NoText
from personajudge.core.decoding import DecodeRequest, Forward, Truncate, persona_judge_loop
from personajudge.core.stopping import Emitter
from personajudge.core.transforms import SamplingParams

TOKENS = 400


def _views(overlap: float) -> tuple[np.ndarray, np.ndarray]:
    """Two distributions over 4 tokens with sum(min(p, q)) == overlap, up to 1e-12 (0 < overlap <= 1):
    each puts the rest of its mass on a token the other all but never draws."""
    p = np.array([overlap / 2, overlap / 2, 1 - overlap + 1e-12, 1e-12])
    q = np.array([overlap / 2, overlap / 2, 1e-12, 1 - overlap + 1e-12])
    return p / p.sum(), q / q.sum()


def _run(overlap: float, lam: int) -> tuple[int, int, int, float]:
    """(forwards, truncates, committed tokens, acceptance) of an interleaved run with two views."""
    req = DecodeRequest(
        contexts=[[1, 2], [1, 2]],
        params=SamplingParams(temperature=1.0, top_k=0, top_p=1.0),
        lam=lam,
        rng=np.random.default_rng(0),
        emitter=Emitter(_NoText(), max_new_tokens=TOKENS, eos_token_ids=()),  # type: ignore[arg-type]
        context_length=10**7,
        roles="alternate",
        schedule="interleaved",
    )
    logits = [np.log(d) for d in _views(overlap)]
    loop = persona_judge_loop(req)
    forwards = truncates = 0
    op = next(loop)
    try:
        while True:
            if isinstance(op, Truncate):
                truncates += 1
                op = loop.send(None)
                continue
            assert isinstance(op, Forward)
            forwards += 1
            op = loop.send([np.tile(logits[int(c[0])], (int(c[2]), 1)) for c in op.calls])
    except StopIteration:
        pass
    acc = req.stats.accepted / req.stats.drafted
    return forwards, truncates, len(req.emitter.tokens), acc


@pytest.mark.parametrize("lam", [1, 4])
@pytest.mark.parametrize(("overlap", "acceptance"), [(1.0, (1.0, 1.0)), (0.5, (0.4, 0.6)), (0.01, (0.0, 0.05))])
def test_one_forward_per_committed_token_at_any_acceptance(overlap, acceptance, lam):
    forwards, truncates, tokens, acc = _run(overlap, lam)
    assert acceptance[0] <= acc <= acceptance[1]  # the rejections really happened
    assert tokens == TOKENS
    assert forwards == tokens  # the prompts' forward commits the first token; each later one commits one
    assert truncates == 0
