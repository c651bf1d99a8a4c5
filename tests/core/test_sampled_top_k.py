"""The numpy top-k guesses its threshold from a strided sample; the guess changes its speed, never its answer.

The other sparse tests use vocabularies of a few thousand, below the size at
which the sample is taken, so these rows have 65,536 entries (the embedded
model has 262,144) and include the shapes that defeat the guess: the top
entries on the sampled ids, ties at the k-th value, rows mostly -inf, NaN.
The answers are compared with a plain partition of the whole row and with
torch's ``topk`` (an independent implementation), row by row.
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from personajudge.core.errors import NumericalError
from personajudge.core.sparse import _STRIDE, _np_above_guess, _top_k_ids, candidates, row_candidates
from personajudge.core.transforms import SamplingParams, filtered_probs

V = 65_536


def rows_of_every_shape(g: np.random.Generator) -> list[np.ndarray]:
    normal = g.normal(0, 2, V).astype(np.float32)
    heavy = g.standard_cauchy(V).astype(np.float32)  # a few entries far above the rest, like a trained LM head
    ties = (np.round(g.normal(0, 2, V) * 2) / 2).astype(np.float32)  # coarse values: ties at the k-th are common
    on_sample = g.normal(0, 1, V).astype(np.float32)
    on_sample[::_STRIDE][:200] += 50.0  # the top entries all sit on the sampled ids: the guess is too high
    mostly_masked = np.full(V, -np.inf, dtype=np.float32)
    mostly_masked[g.choice(V, 30, replace=False)] = g.normal(0, 1, 30)  # fewer finite entries than k + slack
    flat = np.zeros(V, dtype=np.float32)  # every entry tied
    return [normal, heavy, ties, on_sample, mostly_masked, flat]


def exact_top_k_ids(z: np.ndarray, k: int) -> np.ndarray:
    """The definition: every entry >= the k-th largest, from a partition of the whole row."""
    return np.flatnonzero(z >= np.partition(z, V - k)[V - k])


@pytest.mark.parametrize("k", [1, 20, 50, 700])
def test_the_ids_are_those_of_a_whole_row_partition(k):
    for z in rows_of_every_shape(np.random.default_rng(k)):
        assert np.array_equal(_top_k_ids(np, z, k), exact_top_k_ids(z, k))


def test_the_guess_keeps_the_partition_small_and_gives_up_when_it_must():
    g = np.random.default_rng(3)
    normal, heavy, ties, on_sample, mostly_masked, flat = rows_of_every_shape(g)
    got = _np_above_guess(np.stack([normal, heavy, ties, on_sample, mostly_masked, flat]), 40)
    for cand in got[:3]:  # about j * _STRIDE entries reach the guess, not the whole row
        assert cand is not None and 40 <= cand.size < V // 20
    assert got[3] is None  # fewer than k entries reach a guess made of the planted ones
    assert got[4] is not None and got[4].size == V  # the guess is -inf: nothing saved, nothing lost
    assert got[5] is not None and got[5].size == V
    nan_row = normal.copy()
    nan_row[::_STRIDE] = np.nan  # the guess is NaN, which no entry reaches
    assert _np_above_guess(nan_row[None, :], 40) == [None]
    small = g.normal(0, 1, (2, 2000)).astype(np.float32)
    assert _np_above_guess(small, 40) == [None, None]  # too few to sample: partition outright


@pytest.mark.parametrize(
    "params", [SamplingParams(), SamplingParams(1.0, 50, 0.6), SamplingParams(1.0, 3, 1.0)], ids=str
)
def test_candidates_equal_the_dense_filter(params):
    for z in rows_of_every_shape(np.random.default_rng(11))[:5]:  # the flat row's top-p support is all of V
        d = candidates(z, params)
        dense = np.zeros(V)
        dense[np.asarray(d.ids)] = np.asarray(d.probs)
        assert np.allclose(dense, filtered_probs(z, params), atol=1e-7)


@pytest.mark.parametrize("slack", [None, 0, 5])
def test_numpy_rows_equal_torch_rows(slack):
    torch = pytest.importorskip("torch")
    z = np.stack(rows_of_every_shape(np.random.default_rng(7)))
    for params in (SamplingParams(), SamplingParams(1.0, 5, 1.0)):
        a, b = row_candidates(z, params, slack=slack), row_candidates(torch.from_numpy(z), params, slack=slack)
        assert np.array_equal(np.asarray(a.status), b.status.numpy())
        for r in range(len(z)):
            if int(a.status[r]) != 0:
                continue  # ties past the slack: the exact path decides the row, on either library
            # which of several ids tied below the k-th value fill the slack is either library's choice;
            # they carry probability 0, so the supports compare by their nonzero entries
            pa, pb = np.asarray(a.probs[r]), b.probs[r].numpy()
            ia, ib = np.asarray(a.ids[r])[pa > 0], b.ids[r].numpy()[pb > 0]
            assert np.array_equal(ia, ib)
            assert np.allclose(pa[pa > 0], pb[pb > 0], rtol=1e-12, atol=0)


def test_a_nan_row_is_flagged_in_rows_and_raised_alone():
    z = np.stack(rows_of_every_shape(np.random.default_rng(9))[:2])
    z[1, 12345] = np.nan
    rows = row_candidates(z, SamplingParams())
    assert np.asarray(rows.status).tolist() == [0, 2]
    with pytest.raises(NumericalError):
        candidates(z[1], SamplingParams())


@given(
    n=st.integers(6_000, 20_000),
    k=st.integers(1, 60),
    levels=st.integers(1, 400),  # few levels: many ties
    masked=st.floats(0.0, 0.999),
    planted=st.integers(0, 80),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_row_gets_the_ids_of_a_whole_row_partition(n, k, levels, masked, planted, seed):
    g = np.random.default_rng(seed)
    z = (g.integers(0, levels, n) / levels * 8).astype(np.float32)
    z[g.random(n) < masked] = -np.inf
    z[::_STRIDE][:planted] = 100.0  # entries on the sampled ids above all the rest
    rows = row_candidates(z[None, :], SamplingParams(1.0, k, 1.0))
    if not np.isfinite(z.max()):  # every entry masked
        assert int(rows.status[0]) == 2
        with pytest.raises(NumericalError):
            _top_k_ids(np, z, k)
        return
    exact = np.flatnonzero(z >= np.partition(z, n - k)[n - k])
    assert np.array_equal(_top_k_ids(np, z, k), exact)
    # the batched face: a support of 2k ids holds the same entries, or says the ties ran past it
    if exact.size >= 2 * k:
        assert int(rows.status[0]) == 1
    else:
        assert int(rows.status[0]) == 0
        assert np.array_equal(np.asarray(rows.ids[0])[np.asarray(rows.probs[0]) > 0], exact)
