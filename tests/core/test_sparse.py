"""The sparse fast path makes the same decisions as the dense algebra."""

import numpy as np
import pytest

from personajudge.core.acceptance import judge_draft, judge_token, prob_of, residual_dist, sample_dist, sample_from
from personajudge.core.sparse import candidates
from personajudge.core.transforms import SamplingParams, filtered_probs

PARAMS = [
    SamplingParams(),
    SamplingParams(1.0, 5, 1.0),
    SamplingParams(0.5, 50, 0.6),
    SamplingParams(0.0),
    SamplingParams(1.0, 0, 0.9),
    SamplingParams(0.8, 0, 1.0),
]


def dense_of(d, n):
    out = np.zeros(n)
    out[np.asarray(d.ids)] = np.asarray(d.probs)
    return out


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_sparse_matches_dense(params):
    g = np.random.default_rng(5)
    n = 3000
    for _ in range(100):
        a = g.normal(0, 2, size=n).astype(np.float32)
        b = a + g.normal(0, 1, size=n).astype(np.float32)
        pd, qd = filtered_probs(a, params), filtered_probs(b, params)
        ps, qs = candidates(a, params), candidates(b, params)
        assert np.all(np.diff(np.asarray(ps.ids)) > 0)  # sorted support
        assert np.allclose(dense_of(ps, n), pd, atol=1e-6) and np.allclose(dense_of(qs, n), qd, atol=1e-6)
        u = g.random(3)
        t = int(sample_from(qd, u[0]))
        assert sample_dist(qs, u[0]) == t
        assert judge_draft(ps, qs, t, u[1], u[2]) == judge_token(pd, qd, t, u[1], u[2])


def test_ties_at_the_top_k_boundary_are_kept_like_the_dense_mask():
    z = np.array([5.0, 3.0, 3.0, 3.0, 1.0], dtype=np.float32)
    params = SamplingParams(1.0, 2, 1.0)
    assert np.allclose(dense_of(candidates(z, params), 5), filtered_probs(z, params))


def test_far_apart_logits_are_found_when_the_guessed_threshold_saves_nothing():
    z = np.full(10_000, -1e4, dtype=np.float32)
    z[[3, 900, 7000]] = [0.0, -500.0, -2000.0]
    d = candidates(z, SamplingParams(1.0, 3, 1.0))
    assert np.asarray(d.ids).tolist() == [3, 900, 7000]


def test_residual_and_lookup():
    p = candidates(np.log(np.array([0.5, 0.3, 0.2, 1e-9])), SamplingParams(1.0, 3, 1.0))
    q = candidates(np.log(np.array([0.1, 0.1, 0.1, 0.7])), SamplingParams(1.0, 3, 1.0))
    assert float(prob_of(q, 0)) > 0 and float(prob_of(p, 3)) == 0.0
    r = residual_dist(p, q)
    assert np.isclose(float(np.sum(r.probs)), 1.0) and float(prob_of(r, 3)) == 0.0
    assert residual_dist(p, p) is p  # zero mass: fall back to p


def test_torch_candidates_match_numpy():
    torch = pytest.importorskip("torch")
    g = np.random.default_rng(2)
    for params in PARAMS:
        a = g.normal(0, 2, size=2000).astype(np.float32)
        dn, dt = candidates(a, params), candidates(torch.from_numpy(a), params)
        assert np.asarray(dn.ids).tolist() == dt.ids.tolist()
        assert np.allclose(np.asarray(dn.probs), dt.probs.numpy(), atol=1e-6)
        assert sample_dist(dn, 0.37) == sample_dist(dt, 0.37)
