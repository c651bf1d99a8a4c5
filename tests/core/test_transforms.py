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
