"""The token loop's device discipline: host reads per committed token, one top-k tie rule, NaN logits.

On a GPU every read of a device value to the host (``int(t)``, ``bool(t)``,
``t.tolist()``, boolean compaction, ``nonzero``) waits for all queued kernels,
so a decoding step that reads a dozen times runs a dozen times slower than its
kernels. No GPU runs in CI, so the budget is checked here on the CPU by
counting, through a ``TorchFunctionMode``, every torch call that would make the
host wait for device data on CUDA. The algorithm needs one read per step (the
draft token, the accept flag and the emitted token, read together), which with
the interleaved schedule is one per committed token; the budget is that.
On CUDA, ``test_cuda_step_has_no_sync_outside_the_one_read`` runs a step under
``torch.cuda.set_sync_debug_mode("error")`` for the syncs a Python-level count
cannot see (inside kernels' launch code).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from host_reads import HostReads  # noqa: E402  (tests/helpers)

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.core import decoding  # noqa: E402
from personajudge.core.acceptance import (  # noqa: E402
    TIES_PAST_SLACK,
    draft_and_judge,
    judge_arrays,
    judge_draft,
    read_ints,
    sample_dist,
    sample_token,
)
from personajudge.core.errors import NumericalError  # noqa: E402
from personajudge.core.sparse import candidates, device_candidates, uniforms  # noqa: E402
from personajudge.core.transforms import SamplingParams, filtered_probs  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
PARAMS = [
    SamplingParams(),
    SamplingParams(1.0, 5, 1.0),
    SamplingParams(0.5, 50, 0.6),
    SamplingParams(0.0),
    SamplingParams(1.0, 0, 0.9),
    SamplingParams(0.8, 0, 1.0),
]


def dense_of(d, n: int) -> np.ndarray:
    out = np.zeros(n)
    ids, probs = np.asarray(d.ids), np.asarray(d.probs, dtype=np.float64)
    np.add.at(out, ids, probs)
    return out


def bf16_logits(g: np.random.Generator, n: int, scale: float = 2.0) -> np.ndarray:
    """Logits rounded to bfloat16, as a bf16 model's LM head gives them: ties are common."""
    return torch.from_numpy(g.normal(0, scale, size=n).astype(np.float32)).bfloat16().float().numpy()


# ----------------------------------------------------------------------------- the counter itself


def test_the_counter_sees_each_kind_of_read():
    t = torch.tensor([1.0, 2.0, 3.0])
    with HostReads() as c:
        bool(t[0] > 1), int(t[1]), float(t[2]), t.tolist(), t[0].item(), t.nonzero(), t[t > 1], t[torch.tensor(1)]
        t + 1, t[1:], t.topk(2), torch.searchsorted(t, t[:1])  # none of these read
    assert c.count == 8, c.names


# ----------------------------------------------------------------------------- one tie rule everywhere


def test_ties_at_the_kth_value_are_kept_on_torch_like_numpy_and_dense():
    z = np.array([5.0, 3.0, 1.0, 3.0, 3.0, 0.5, 3.0], dtype=np.float32)
    params = SamplingParams(1.0, 2, 1.0)
    want = filtered_probs(z, params)
    assert np.count_nonzero(want) == 5  # the max and all four tied 3.0s
    roomy = device_candidates(torch.from_numpy(z), params, slack=5)
    assert read_ints(roomy.status) == [0]
    for d in (candidates(z, params), candidates(torch.from_numpy(z), params), roomy):
        assert np.allclose(dense_of(d, len(z)), want)
    assert candidates(torch.from_numpy(z), params).ids.tolist() == np.asarray(candidates(z, params).ids).tolist()


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_device_candidates_equal_the_exact_support_on_bf16_logits(params):
    g = np.random.default_rng(7)
    for _ in range(40):
        z = bf16_logits(g, 3000)
        exact = candidates(z, params)
        dev = device_candidates(torch.from_numpy(z), params)
        (code,) = read_ints(dev.status)
        if code == 0:
            assert np.allclose(dense_of(dev, 3000), dense_of(exact, 3000), atol=1e-12)
        u = float(g.random())
        assert sample_dist(dev, u) == sample_dist(exact, u)


def test_ties_past_the_slack_fall_back_to_the_exact_support():
    """60 logits tied at the k-th value, a slack of 5: the status says so and the exact support decides."""
    z = np.full(1000, -3.0, dtype=np.float32)
    z[:3] = [4.0, 3.5, 3.0]
    z[100:160] = 1.0  # k = 5: the k-th value is 1.0, tied 60 times
    params = SamplingParams(1.0, 5, 1.0)
    dev = device_candidates(torch.from_numpy(z), params, slack=5)
    assert read_ints(dev.status) == [TIES_PAST_SLACK]
    exact = candidates(z, params)
    assert len(exact.ids) == 63
    g = np.random.default_rng(0)
    drawn = set()
    for u in g.random(400):
        tok = sample_dist(dev, float(u))
        assert tok == sample_dist(exact, float(u))
        drawn.add(tok)
    assert max(drawn) > 105  # tokens beyond the fixed-size support were drawn: the exact support decided


@pytest.mark.parametrize("params", PARAMS, ids=str)
def test_draft_and_judge_makes_the_host_paths_decisions(params):
    """The one-read step equals sampling t then ``judge_draft`` on the exact supports, uniform for uniform."""
    g = np.random.default_rng(11)
    for _ in range(60):
        a = bf16_logits(g, 500)
        b = a + bf16_logits(g, 500, 1.0)
        u = g.random(3)
        pe, qe = candidates(a, params), candidates(b, params)
        t = sample_dist(qe, u[0])
        want = (t, *judge_draft(pe, qe, t, u[1], u[2]))
        ud = uniforms(torch.zeros(1), u)
        pd, qd = device_candidates(torch.from_numpy(a), params), device_candidates(torch.from_numpy(b), params)
        t2, ok, emit = draft_and_judge(pd, qd, ud[0], ud[1], ud[2])
        assert (t2, ok, emit if not ok else -1) == want


# ----------------------------------------------------------------------------- NaN and inf


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(0.0), SamplingParams(1.0, 0, 0.9)], ids=str)
def test_nan_or_inf_logits_raise_a_numerical_error(bad, params):
    z = np.random.default_rng(0).normal(size=300).astype(np.float32)
    z[17] = bad
    zt = torch.from_numpy(z)
    with pytest.raises(NumericalError, match="NaN or infinite"):
        candidates(z, params)
    with pytest.raises(NumericalError):
        candidates(zt, params)
    with pytest.raises(NumericalError):
        sample_dist(device_candidates(zt, params), 0.5)
    good = device_candidates(torch.from_numpy(np.zeros(300, dtype=np.float32)), params)
    with pytest.raises(NumericalError):
        draft_and_judge(device_candidates(zt, params), good, 0.3, 0.3, 0.3)
    with pytest.raises(NumericalError):
        filtered_probs(z, params)
    with pytest.raises(NumericalError):
        filtered_probs(zt, params)


def test_minus_inf_logits_are_fine():
    z = np.full(50, -math.inf, dtype=np.float32)
    z[[3, 9]] = [1.0, 0.0]
    for params in (SamplingParams(), SamplingParams(0.0), SamplingParams(1.0, 0, 1.0)):
        assert sample_dist(device_candidates(torch.from_numpy(z), params), 0.2) == 3
        assert sample_dist(candidates(z, params), 0.2) == 3


# ----------------------------------------------------------------------------- reads per committed token


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_hf import build_tiny_backend

    backend = build_tiny_backend(tmp_path_factory.mktemp("host-syncs"), "llama")
    yield backend
    backend.close()


PROMPTS = [
    "[user] Be concise.\n[user] Why is the sky blue?\n[assistant] ",
    "[user] Be funny.\n[user] Why is the sky blue?\n[assistant] ",
    "[user] Be an expert.\n[user] Why is the sky blue?\n[assistant] ",
]


def _count(
    backend,
    *,
    views: int = 2,
    method: str = "persona-judge",
    temperature: float = 0.7,
    top_k: int = 20,
    schedule: str = "interleaved",
):
    """Run a decoding loop on this thread (a ``TorchFunctionMode`` is per thread) and count its reads."""
    from personajudge.core.decoding import DecodeRequest, drive, persona_judge_loop, plain_loop
    from personajudge.core.result import Stats
    from personajudge.core.stopping import Emitter

    tok = backend.tokenizer
    contexts = [tok.encode(p) for p in PROMPTS[:views]]
    req = DecodeRequest(
        contexts=contexts,
        params=SamplingParams(temperature, top_k, 0.9),
        lam=4,
        rng=np.random.default_rng(3),
        emitter=Emitter(tok, max_new_tokens=40),
        context_length=backend.context_length,
        schedule=schedule,
        stats=Stats(),
    )
    loop = plain_loop(req) if method == "plain" else persona_judge_loop(req)
    with backend.open(views) as session, HostReads() as c:
        drive(session, loop)
    return c, req.stats, len(req.emitter.tokens)


@pytest.mark.parametrize("kw", [{}, {"temperature": 0.0}, {"top_k": 0}, {"method": "plain"}, {"views": 3}], ids=str)
def test_one_host_read_per_committed_token(tiny, kw):
    c, stats, n = _count(tiny, **kw)
    assert n >= 20
    if not kw or "views" in kw or "top_k" in kw:
        assert stats.drafted > stats.accepted  # rejections happened: the costlier path ran too
    # One read per committed token, plus one for a token that ended the run without being committed (EOS).
    assert c.count <= n + 1, (c.count, n, c.names)
    assert c.count >= n  # every committed token was read once: the counter is not blind to the loop


def test_the_budget_test_has_power(tiny, monkeypatch):
    """Negative control: the host-side support (``candidates``) in the loop breaks the budget."""
    monkeypatch.setattr(decoding, "device_candidates", candidates)
    c, _, n = _count(tiny)
    assert c.count > 2 * n, (c.count, n)


def test_nan_logits_in_a_run_are_a_typed_error(tmp_path):
    from tiny_hf import build_tiny_backend

    backend = build_tiny_backend(tmp_path, "llama")
    with torch.no_grad():
        backend.model.get_output_embeddings().weight[5, 0] = math.nan
    with PersonaJudge({"backend": {"name": "hf"}, "preferences": ["concise", "humor"]}, backend=backend) as pj:
        for kw in ({}, {"method": "prompt"}, {"temperature": 0.0}, {"schedule": "windowed"}):
            with pytest.raises(NumericalError, match="NaN or infinite"):
                pj.generate("hi", seed=0, max_new_tokens=8, **kw)


# ----------------------------------------------------------------------------- CUDA


class GraphCalls:
    """Counts what inductor's CUDA-graph trees do while entered: recordings, replays, eager warm-up runs.

    The tree manager is wrapped at the class (its instances are per thread), and inductor's
    ``cudagraph_skips`` counter read before and after: a step that silently ran without graphs shows
    as no replays, or as a skip."""

    def __enter__(self):
        from torch._dynamo.utils import counters
        from torch._inductor.cudagraph_trees import CUDAGraphTreeManager

        self.counters, self.cls = counters, CUDAGraphTreeManager
        self.skips0 = int(counters["inductor"]["cudagraph_skips"])
        self.counts = {"record_function": 0, "execute_node": 0, "run_eager": 0}
        self.orig = {name: CUDAGraphTreeManager.__dict__[name] for name in self.counts}
        for name, fn in self.orig.items():

            def wrapper(mgr, *a, _fn=fn, _name=name, **kw):
                self.counts[_name] += 1
                return _fn(mgr, *a, **kw)

            setattr(CUDAGraphTreeManager, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, fn in self.orig.items():
            setattr(self.cls, name, fn)
        self.skips = int(self.counters["inductor"]["cudagraph_skips"]) - self.skips0


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize(
    "options",
    [{}, {"cache_implementation": "static", "max_cache_len": 64}, {"compile": "reduce-overhead", "max_cache_len": 64}],
    ids=["dynamic", "static", "cuda-graphs"],
)
def test_cuda_step_has_no_sync_outside_the_one_read(tmp_path, options):
    """A two-view step (forward, both filtered supports, draft, judge) queues without a sync; then one read.

    With CUDA graphs the checked steps must be replays: inductor's graph trees run a function eagerly
    on its first call (warm-up) and record it on the second, and recording synchronizes. So three
    single-token steps run before the check (warm-up, record, a first replay), and the test asserts
    that the checked steps were replayed with nothing recorded, skipped or fallen back to eager: a
    sync in the check would otherwise end in ``run_step``'s fallback to eager, and pass unseen."""
    from tiny_hf import build_tiny_backend

    graphs = "compile" in options
    backend = build_tiny_backend(tmp_path, "gemma3", device="cuda", options=options)
    params = SamplingParams()
    u = np.random.default_rng(0).random(9)
    with backend.open(2) as s:
        outs = s.forward_many([(0, [1, 40, 41, 42], 1), (1, [1, 50, 51], 1)])
        for tok in (43, 44, 45):  # q=1 steps: warm-up, recording and a first replay, all outside the check
            outs = s.forward_many([(0, [tok], 1), (1, [tok + 10], 1)])
        torch.cuda.synchronize()
        with GraphCalls() if graphs else contextlib.nullcontext() as calls:
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    ud = uniforms(outs[0], u)
                    q, p = device_candidates(outs[0][-1], params), device_candidates(outs[1][-1], params)
                    t = sample_token(q, ud[0])
                    ok, emit = judge_arrays(p, q, t, ud[4], ud[8])
                    outs = s.forward_many([(0, [60], 1), (1, [61], 1)])
            finally:
                torch.cuda.set_sync_debug_mode(0)
        t, ok, emit = read_ints(t, ok, emit)
    assert 0 <= t < 256 and 0 <= emit < 256
    if graphs:
        assert backend.compile_fallback is None  # no step in the check fell back to eager
        assert calls.counts["execute_node"] >= 3 and calls.skips == 0, (calls.counts, calls.skips)
        assert calls.counts["record_function"] == 0 and calls.counts["run_eager"] == 0, calls.counts
    backend.close()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize(
    "options",
    [{}, {"compile": "reduce-overhead", "max_cache_len": 128}],
    ids=["dynamic", "cuda-graphs"],
)
def test_cuda_batched_step_synchronizes_once(tmp_path, options):
    """The batched judge over 4 requests: one synchronizing read per step, counted by torch's sync debug mode.

    With compiled steps the judge is compiled too (inductor's kernels): they must not synchronize either."""
    import warnings

    from tiny_hf import build_tiny_backend

    from personajudge.core.batched import BatchedJudge, judge_rows
    from personajudge.core.decoding import DecodeRequest, StepDriver
    from personajudge.core.result import Stats
    from personajudge.core.stopping import Emitter

    backend = build_tiny_backend(tmp_path, "gemma3", device="cuda", options=options)
    tok = backend.tokenizer
    session = backend.open(8)
    kernel = backend.compile_kernel(judge_rows)
    driver, judge = StepDriver(session), BatchedJudge(kernel)
    for i in range(4):
        req = DecodeRequest(
            contexts=[tok.encode(p) for p in PROMPTS[:2]],
            params=SamplingParams(),
            lam=4,
            rng=np.random.default_rng(i),
            emitter=Emitter(tok, max_new_tokens=10_000),
            context_length=backend.context_length,
            roles="alternate",
            schedule="interleaved",
            stats=Stats(),
        )
        driver.add_row(i, judge, req, [2 * i, 2 * i + 1])
    for _ in range(3):  # prompts, and the compiled steps' capture, outside the count
        driver.step()
    torch.cuda.synchronize()
    steps = 8
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                assert driver.step() == ([], {})
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    assert 1 <= len(syncs) <= steps, [str(w.message)[:120] for w in syncs[:5]]
    if options:
        assert kernel.fallback is None and kernel.calls >= steps
        assert backend.compile_fallback is None  # the steps too: a sync in a capture would have made them eager
    session.close()
    backend.close()
