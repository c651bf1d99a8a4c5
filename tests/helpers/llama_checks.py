"""Greedy cross-checks on llama.cpp that cannot pass vacuously.

llama.cpp's CPU kernels change logits slightly with the batch shape, so two
greedy runs of one prompt in different batches may part at a near-tie. These
helpers allow exactly that and nothing else: the runs must agree for
``MIN_AGREE`` tokens, and where they part, the two chosen tokens' logits
(teacher-forced in one single-sequence evaluation) must lie within ``TIE_EPS``.
"""

import numpy as np

MIN_AGREE = 8
TIE_EPS = 0.5


def forced_logits(backend, context, tokens):
    """Logits before each of ``tokens``, teacher-forced after ``context`` in one single-sequence evaluation."""
    if not tokens:
        return np.zeros((0, backend.tokenizer.vocab_size))
    with backend.open(1) as s:
        return np.asarray(s.forward(0, list(context) + list(tokens[:-1]), len(tokens)), dtype=np.float64)


def assert_same_until_tie(a, b, logit_lists, min_agree=MIN_AGREE):
    """``a == b``, except that they may part at a proven near-tie after at least ``min_agree`` tokens.

    At the first position where they differ, each of ``logit_lists`` (the teacher-forced logits of a
    view that could have decided that token) must give the two chosen tokens logits within
    ``TIE_EPS``: a legitimately different greedy choice under batch-shape noise, not a bug. Returns
    the number of leading tokens that agree.
    """
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            assert i >= min_agree, f"diverged after only {i} tokens (< {min_agree}): {a[: i + 1]} vs {b[: i + 1]}"
            gaps = [abs(float(ls[i][a[i]] - ls[i][b[i]])) for ls in logit_lists if i < len(ls)]
            assert gaps and min(gaps) <= TIE_EPS, (
                f"diverged at token {i} where the two choices' logits differ by {min(gaps):.3f} > {TIE_EPS}"
            )
            return i
    assert len(a) == len(b), f"one stopped early: {len(a)} vs {len(b)} tokens"
    assert n >= min_agree, f"only {n} tokens to compare"
    return n
