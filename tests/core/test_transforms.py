import numpy as np

from personajudge.core.transforms import SamplingParams, filtered_probs


def test_temperature_only_is_softmax():
    z = np.array([1.0, 2.0, 0.5, -1.0])
    got = filtered_probs(z, SamplingParams(temperature=0.5, top_k=0, top_p=1.0))
    e = np.exp(z / 0.5)
    assert np.allclose(got, e / e.sum())


def test_top_k_keeps_k_largest():
    z = np.array([0.1, 3.0, 2.0, -1.0, 2.5])
    got = filtered_probs(z, SamplingParams(temperature=1.0, top_k=2, top_p=1.0))
    assert set(np.nonzero(got)[0]) == {1, 4}
    assert np.isclose(got.sum(), 1.0)


def test_top_p_keeps_smallest_prefix_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    z = np.log(probs)
    got = filtered_probs(z, SamplingParams(temperature=1.0, top_k=0, top_p=0.78))
    # 0.5 alone is short of 0.78, 0.5 + 0.3 reaches it: keep the first two only
    assert np.allclose(got, [0.5 / 0.8, 0.3 / 0.8, 0, 0])
    got = filtered_probs(z, SamplingParams(temperature=1.0, top_k=0, top_p=0.82))
    assert np.count_nonzero(got) == 3
    # the most likely token is always kept
    assert np.count_nonzero(filtered_probs(z, SamplingParams(1.0, 0, 0.01))) == 1


def test_top_k_then_top_p():
    z = np.log(np.array([0.4, 0.3, 0.2, 0.1]))
    got = filtered_probs(z, SamplingParams(temperature=1.0, top_k=3, top_p=0.7))
    # after top-3 renormalisation: 0.444, 0.333, 0.222 -> keep 0.444 + 0.333
    assert np.count_nonzero(got) == 2 and np.isclose(got[0], 0.4 / 0.7)


def test_greedy_is_one_hot_on_first_argmax():
    z = np.array([[1.0, 3.0, 3.0], [5.0, 0.0, 1.0]])
    got = filtered_probs(z, SamplingParams(temperature=0.0))
    assert np.array_equal(got, [[0, 1, 0], [1, 0, 0]])


def test_batched_rows_are_independent():
    g = np.random.default_rng(0)
    z = g.normal(size=(3, 4, 100))
    params = SamplingParams(0.7, 20, 0.9)
    full = filtered_probs(z, params)
    for i in range(3):
        for j in range(4):
            assert np.allclose(full[i, j], filtered_probs(z[i, j], params))
    assert np.allclose(full.sum(-1), 1.0)


def test_a_temperature_too_small_to_divide_by_is_greedy():
    """1e-320 passes validation (>= 0); dividing logits by it overflowed to inf and NaN.

    Below 1e-5 every filter, the core's sparse paths and every method give
    what temperature 0 gives (mod crashed on an empty support before).
    """
    from personajudge.api import PersonaJudge
    from personajudge.backends.toy import ToyBackend
    from personajudge.core.sparse import candidates, row_candidates

    logits = np.array([[0.5, 3.0, 3.0, -1.0, 2.9]], dtype=np.float32)
    for t in (1e-320, 1e-9):
        tiny = SamplingParams(t, 2, 0.9)
        np.testing.assert_array_equal(filtered_probs(logits, tiny), [[0, 1, 0, 0, 0]])
        assert candidates(logits[0], tiny).ids.tolist() == [1]
        assert row_candidates(logits, tiny).ids.tolist() == [[1]]
    assert not SamplingParams(1e-5).greedy  # the line: 1e-5 itself samples
    with PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=ToyBackend()) as pj:
        for method in ("persona-judge", "persona-judge-base", "mod", "pad", "prompt"):
            kw = dict(preferences=["concise", "humor"], method=method, max_new_tokens=12, seed=3)
            want = pj.generate("Tell me about owls.", temperature=0, **kw)
            for t in (1e-320, 1e-7):
                got = pj.generate("Tell me about owls.", temperature=t, **kw)
                assert (got.tokens, got.finish_reason) == (want.tokens, want.finish_reason), (method, t)
