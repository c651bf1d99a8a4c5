"""The hf backend's static cache and compiled steps (``cache_implementation="static"``, ``compile``).

The static cache exists for CUDA graphs and ``torch.compile``: fixed buffers,
every row in every forward, keys over the full capacity, so a step has one
shape per query length. These tests pin what can be checked without a GPU:

- the logits equal the dynamic cache's, call for call, through prefills,
  single- and multi-token steps, skipped rows and rollbacks;
- a compiled step traces as one whole graph (``fullgraph=True`` under
  dynamo's ``eager`` backend, and inductor's CPU code in the slow test) and
  is traced once per query length, not once per step;
- a compile that fails falls back to eager with one warning, never a failed
  request; the capacity is the context length, so a generation that reaches it
  ends with ``finish_reason="context"``.
"""

from __future__ import annotations

import random
import threading
import warnings

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_hf import build_tiny  # noqa: E402  (tests/helpers)

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.hf import HFBackend  # noqa: E402
from personajudge.cli import main  # noqa: E402
from personajudge.core.batched import judge_rows  # noqa: E402
from personajudge.core.config import BackendConfig  # noqa: E402
from personajudge.core.errors import ConfigError, ContextLengthError, PersonaJudgeWarning  # noqa: E402
from personajudge.core.transforms import SamplingParams  # noqa: E402

pytestmark = pytest.mark.hf

STATIC = {"cache_implementation": "static", "max_cache_len": 96}
#: dynamo traces the step into one graph and runs it as traced (no code generation): fast, and a graph
#: break is an error (fullgraph) that the backend reports as a fallback
TRACED = {"compile": True, "compile_backend": "eager", "max_cache_len": 96}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-static")
    return {arch: build_tiny(root / arch, arch) for arch in ("llama", "gemma3")}


def load(path: str, options: dict | None = None) -> HFBackend:
    return HFBackend(BackendConfig(name="hf", model=path, device="cpu", options=options or {}))


def call_script(seed: int, rows: int = 3, steps: int = 24):
    """A random session script: prefills of different lengths, then steps of 1-3 tokens on random subsets
    of the rows (so rows are skipped and padded), with rollbacks; yields ("forward", calls) / ("truncate", ...)."""
    rnd = random.Random(seed)
    lengths = [0] * rows
    first = []
    for v in range(rows):
        toks = [1] + [rnd.randrange(4, 250) for _ in range(rnd.randrange(3, 30))]
        first.append((v, toks, rnd.randrange(1, 3)))
        lengths[v] = len(toks)
    yield "forward", first
    for _ in range(steps):
        if rnd.random() < 0.2:
            v = rnd.randrange(rows)
            keep = rnd.randrange(1, lengths[v] + 1)
            lengths[v] = keep
            yield "truncate", (v, keep)
            continue
        chosen = sorted(rnd.sample(range(rows), rnd.randrange(1, rows + 1)))
        calls = []
        for v in chosen:
            k = rnd.choice([1, 1, 1, 2, 3])
            calls.append((v, [rnd.randrange(4, 250) for _ in range(k)], rnd.randrange(0, k + 1)))
            lengths[v] += k
        yield "forward", calls


def run_script(backend: HFBackend, seed: int) -> list:
    out = []
    with backend.open(3) as s:
        for kind, arg in call_script(seed):
            if kind == "truncate":
                s.truncate(*arg)
            else:
                out.append([x.clone() for x in s.forward_many(arg)])
    return out


@pytest.mark.parametrize("arch", ["llama", "gemma3"])  # gemma3: sliding and full layers (a mask per kind)
@pytest.mark.parametrize("options", [STATIC, TRACED], ids=["static", "compiled"])
def test_static_logits_equal_the_dynamic_cache(dirs, arch, options):
    dynamic, static = load(dirs[arch]), load(dirs[arch], options)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PersonaJudgeWarning)  # a compile fallback would be a failure here
        for seed in (0, 1):
            want, got = run_script(dynamic, seed), run_script(static, seed)
            assert len(want) == len(got) > 10
            for a, b in zip(want, got):
                for x, y in zip(a, b):
                    assert x.shape == y.shape
                    torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)
    assert static.compile_fallback is None
    assert static.describe()["cache_implementation"] == "static"


def test_a_compiled_step_is_traced_once_per_query_length(dirs):
    from torch._dynamo.utils import counters

    backend = load(dirs["gemma3"], TRACED)
    torch._dynamo.reset()
    counters.clear()
    with backend.open(2) as s:
        s.forward_many([(0, [1, 5, 6, 7, 8], 1), (1, [1, 9, 10], 1)])  # the first forward of a session runs eager
        assert counters["stats"]["unique_graphs"] == 0
        for i in range(30):  # one token on both rows, then one token on one row: the same shape (all rows run)
            s.forward_many([(0, [20 + i], 1), (1, [30 + i], 1)] if i % 2 else [(1, [40 + i], 1)])
        assert counters["stats"]["unique_graphs"] == 1
        for i in range(5):  # three tokens on one row: the query bucket of 4
            s.forward_many([(0, [50 + i, 51, 52], 2)])
        assert counters["stats"]["unique_graphs"] == 2
    assert backend.compile_fallback is None


def test_a_failed_compile_falls_back_to_eager_once(dirs):
    backend = load(dirs["llama"], TRACED)
    reference = load(dirs["llama"])

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler for this\nmachine")

    backend._compiled = broken
    with pytest.warns(PersonaJudgeWarning, match="torch.compile failed, running eager: RuntimeError: no compiler"):
        got = run_script(backend, 3)
    want = run_script(reference, 3)
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)
    assert backend.describe()["compile"].startswith("failed, eager (RuntimeError: no compiler for this machine")
    with warnings.catch_warnings():
        warnings.simplefilter("error", PersonaJudgeWarning)  # warned once: the next session runs eager quietly
        run_script(backend, 4)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generations_equal_the_dynamic_cache(dirs, temperature):
    """Dynamic cache, static cache, and compiled steps with the compiled judge: the same tokens."""
    cfg = {"backend": {"name": "hf"}, "preferences": ["concise", "humor"]}
    outs = []
    for options in ({}, STATIC, TRACED):
        options = {**options, "max_cache_len": 256} if options else options  # char-level prompts: ~110 tokens
        backend = load(dirs["gemma3"], options)
        with PersonaJudge(cfg, backend=backend) as pj:
            rows = pj.generate_batch(
                ["Why is the sky blue?", "Name a fruit.", "hi"], temperature=temperature, max_new_tokens=24, seed=5
            )
            outs.append([r.tokens for r in rows])
        kernel = backend.compile_kernel(judge_rows)
        if options.get("compile"):  # every step of the batch was decided by the traced judge
            assert kernel.fallback is None and kernel.calls >= 24
            assert backend.describe()["compile_judge"] == "torch.compile (eager)"
        else:
            assert kernel is judge_rows and "compile_judge" not in backend.describe()
    assert outs[0] == outs[1] == outs[2]
    assert all(len(t) > 0 for t in outs[0])


def test_a_failed_judge_compile_falls_back_to_eager_once(dirs):
    """The compiled judge failing (no compiler, an unsupported op) costs one warning, never a request."""
    cfg = {"backend": {"name": "hf"}, "preferences": ["concise", "humor"]}
    prompts = ["Why is the sky blue?", "hi"]
    with PersonaJudge(cfg, backend=load(dirs["llama"], STATIC | {"max_cache_len": 256})) as pj:
        want = [r.tokens for r in pj.generate_batch(prompts, max_new_tokens=16, seed=2)]
    backend = load(dirs["llama"], TRACED | {"max_cache_len": 256})
    kernel = backend.compile_kernel(judge_rows)

    def broken(*args):
        raise RuntimeError("no compiler for this\nmachine")

    kernel.compiled = broken
    with PersonaJudge(cfg, backend=backend) as pj:
        with pytest.warns(PersonaJudgeWarning, match="compiling the judge failed, running eager: RuntimeError: no"):
            got = [r.tokens for r in pj.generate_batch(prompts, max_new_tokens=16, seed=2)]
        assert got == want
        assert backend.describe()["compile_judge"] == "failed, eager (RuntimeError: no compiler for this machine)"
        assert backend.compile_fallback is None  # the steps still run compiled
        with warnings.catch_warnings():
            warnings.simplefilter("error", PersonaJudgeWarning)  # warned once
            assert [r.tokens for r in pj.generate_batch(prompts, max_new_tokens=16, seed=2)] == want
    assert kernel.calls == 0 and kernel.compiled is None


def judge_inputs(g, rows: int, vocab: int = 256):
    """Logits rows as a bf16 model gives them (ties common), with a NaN row and a row of ties past the slack."""
    p = torch.from_numpy(g.normal(0, 2.0, size=(rows, vocab)).astype("float32")).bfloat16().float()
    q = p + torch.from_numpy(g.normal(0, 1.0, size=(rows, vocab)).astype("float32")).bfloat16().float()
    if rows > 2:
        p[1, 7] = float("nan")
        q[2, :] = 0.0  # every logit ties with the k-th
    u = torch.from_numpy(g.random((rows, 3)))
    return p, q, u


@pytest.mark.slow
def test_inductor_compiled_judge_is_the_same_function():
    """inductor's generated code for the batched judge (``compile`` on, CPU) decides every row as eager does.

    Bit for bit, over row counts that change (the second makes the shapes
    dynamic), sampling settings with and without top-k, NaN rows and ties
    past the slack (their status codes send them to the exact per-row path).
    Before ``_lookup`` stopped using ``clip``, the second settings broke the graph.
    Dynamo's default recompile limit (8) holds: 12 (settings, rows) pairs
    compile 6 graphs (see the test below).
    """
    import numpy as np

    from personajudge.backends.hf import CompiledKernel
    from personajudge.core.acceptance import NOT_FINITE, TIES_PAST_SLACK

    torch._dynamo.reset()
    kernel = CompiledKernel(torch, judge_rows, "inductor")
    g = np.random.default_rng(11)
    codes = set()
    # the second settings change the support's size, the third has none: recompiles with symbolic shapes
    for params in (SamplingParams(), SamplingParams(0.5, 5, 0.8), SamplingParams(1.0, 0, 0.95)):
        for rows in (1, 5, 8, 3):
            for _ in range(3):
                p, q, u = judge_inputs(g, rows)
                want = judge_rows(p, q, params, u[:, 0], u[:, 1], u[:, 2])
                got = kernel(p, q, params, u[:, 0], u[:, 1], u[:, 2])
                assert torch.equal(got, want), (params, rows)
                codes.update(want[:, 3].tolist())
    assert kernel.calls == 36 and kernel.fallback is None
    assert {NOT_FINITE, TIES_PAST_SLACK} <= codes  # the special rows were exercised


def test_the_compiled_judge_compiles_twice_per_sampling_setting_whatever_the_batch():
    """One graph for one row, one with the row count symbolic for every other: never one per batch size.

    A server's batch grows and shrinks every step; a graph per size would
    recompile for seconds on a GPU and pass dynamo's recompile limit (8)
    within one ramp-up. ``take_along_dim`` (array-api-compat's
    ``take_along_axis`` on torch) fixed the row count under ``torch.compile``;
    the core gathers instead. Dynamo's ``eager`` backend traces exactly
    what inductor would compile, without generating code.
    """
    import numpy as np
    from torch._dynamo.utils import counters

    from personajudge.backends.hf import CompiledKernel

    torch._dynamo.reset()
    counters.clear()
    kernel = CompiledKernel(torch, judge_rows, "eager")
    g = np.random.default_rng(3)
    graphs = []
    with torch._dynamo.config.patch(recompile_limit=8):
        for params in (SamplingParams(), SamplingParams(1.0, 0, 0.95)):
            for rows in (1, 2, 5, 16, 3, 9, 1, 32):
                p, q, u = judge_inputs(g, rows)
                got = kernel(p, q, params, u[:, 0], u[:, 1], u[:, 2])
                assert torch.equal(got, judge_rows(p, q, params, u[:, 0], u[:, 1], u[:, 2]))
            graphs.append(counters["stats"]["unique_graphs"])
    assert graphs == [2, 4] and kernel.calls == 16 and kernel.fallback is None


def test_the_capacity_is_the_context_length(dirs):
    backend = load(dirs["llama"], {"cache_implementation": "static", "max_cache_len": 160})
    assert backend.context_length == 160 and backend.describe()["context_length"] == 160
    with PersonaJudge({"backend": {"name": "hf"}, "preferences": ["concise", "humor"]}, backend=backend) as pj:
        res = pj.generate("[user] hello\n[assistant] ", max_new_tokens=200, seed=0)
        assert res.finish_reason == "context"
        assert max(res.stats.prompt_tokens) + len(res.tokens) <= 160
        with pytest.raises(ContextLengthError, match="160"):
            pj.generate("x" * 200, max_new_tokens=4, seed=0)
    assert load(dirs["llama"], {"cache_implementation": "static"}).context_length == 512  # the model's maximum


@pytest.mark.parametrize(
    "options, needle",
    [
        ({"max_cache_len": 64}, 'max_cache_len needs cache_implementation="static"'),
        ({"cache_implementation": "static", "max_cache_len": 4096}, "exceeds the context length of 512"),
        ({"cache_implementation": "static", "max_cache_len": 8}, "greater than or equal to 16"),
        ({"cache_implementation": "paged"}, "cache_implementation"),
        ({"compile": "fast"}, "compile"),
        ({"compile": True, "device_map": "auto"}, "drop device_map"),
    ],
)
def test_bad_static_options(dirs, options, needle):
    with pytest.raises(ConfigError, match=needle):
        load(dirs["llama"], options)


def test_bad_static_option_at_the_cli_exits_2(dirs, capsys):
    code = main(["generate", "hi", "--backend", "hf", "--model", dirs["llama"], "--backend-option", "compile=fast"])
    err = capsys.readouterr().err
    assert code == 2 and "compile" in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow
def test_inductor_compiled_steps_on_the_cpu(dirs):
    """inductor's generated CPU code (what ``compile=true`` runs on a machine without a GPU) gives the same logits."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backend = load(dirs["llama"], {"compile": True, "max_cache_len": 64})
    want, got = run_script(load(dirs["llama"]), 5), run_script(backend, 5)
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=1e-4, rtol=1e-4)
    assert backend.compile_fallback is None
    assert 1 <= counters["stats"]["unique_graphs"] <= 3  # one per query bucket the script used (1, 2, 4)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("arch", ["gemma3"])  # sliding and full layers; one model keeps the GPU check's compiles few
def test_cuda_graphs_give_the_dynamic_caches_logits(dirs, arch):
    """``compile="reduce-overhead"``: inductor with CUDA graphs replays the step; outputs are copied out.

    Inductor only logs when it skips CUDA graphs (and runs the compiled code without them): its
    ``cudagraph_skips`` counter must not move."""
    from torch._dynamo.utils import counters

    skips = int(counters["inductor"]["cudagraph_skips"])
    cuda = {"compile": "reduce-overhead", "max_cache_len": 96}
    dynamic = HFBackend(BackendConfig(name="hf", model=dirs[arch], device="cuda"))
    graphs = HFBackend(BackendConfig(name="hf", model=dirs[arch], device="cuda", options=cuda))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PersonaJudgeWarning)
        want, got = run_script(dynamic, 0), run_script(graphs, 0)
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=2e-3, rtol=2e-3)
    assert graphs.compile_fallback is None
    assert int(counters["inductor"]["cudagraph_skips"]) == skips  # the graphs were not skipped


def _in_thread(fn, name: str):
    """``fn()`` run in a new thread named ``name``; its result, or its exception raised here."""
    box: dict = {}

    def body():
        try:
            box["out"] = fn()
        except BaseException as err:  # re-raised in the calling thread
            box["err"] = err

    t = threading.Thread(target=body, name=name)
    t.start()
    t.join()
    if "err" in box:
        raise box["err"]
    return box["out"]


def test_a_fresh_thread_gets_cudagraph_trees_state():
    """``cudagraph_thread_ready`` gives a thread that did not import inductor's CUDA-graph trees their state.

    torch before 2.13 asserts (a bare AssertionError) when a CUDA-graph step is first recorded in such a
    thread -- the engine's -- and the compiled step ran eager (seen on an H200 with torch 2.11). Each
    thread gets its own containers, as torch 2.13's ``_initialize_tls`` gives it."""
    import torch._inductor.cudagraph_trees as trees

    from personajudge.backends.hf import cudagraph_thread_ready

    mine = trees.get_container(0)  # this thread imported the module: its own state

    def body():
        before = hasattr(trees.local, "tree_manager_containers")
        cudagraph_thread_ready(torch)
        after = hasattr(trees.local, "tree_manager_containers") and torch._C._is_key_in_tls("tree_manager_locks")
        cudagraph_thread_ready(torch)  # set up once: a second call keeps the same containers
        return before, after, trees.get_container(0)

    before, after, theirs = _in_thread(body, "fresh")
    assert (before, after) == (False, True)
    assert theirs is not mine and trees.get_container(0) is mine


def test_the_engine_thread_is_made_ready_before_each_graph_step(dirs, monkeypatch):
    """With ``compile="reduce-overhead"`` every compiled step prepares the thread it runs on first."""
    import torch._inductor.cudagraph_trees as trees

    from personajudge.backends import hf

    seen = []
    real = hf.cudagraph_thread_ready

    def spy(t):
        real(t)
        seen.append((threading.current_thread().name, hasattr(trees.local, "tree_manager_containers")))

    monkeypatch.setattr(hf, "cudagraph_thread_ready", spy)
    backend = load(dirs["llama"], TRACED | {"compile": "reduce-overhead", "max_cache_len": 256})
    compiled_steps = []
    run_step = backend.run_step

    def counted(*args, **kw):
        compiled_steps.append(kw.get("compiled"))
        return run_step(*args, **kw)

    backend.run_step = counted
    cfg = {"backend": {"name": "hf"}, "preferences": ["concise", "humor"]}
    with PersonaJudge(cfg, backend=backend) as pj:
        assert pj.generate("Why is the sky blue?", max_new_tokens=8, seed=1).stats.tokens == 8
    assert backend.compile_fallback is None
    assert len(seen) == compiled_steps.count(True) > 0
    assert set(seen) == {("personajudge-engine", True)}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_cuda_graphs_record_in_a_thread_that_did_not_import_them(dirs):
    """The engine's case: inductor's CUDA-graph trees imported in this thread, the graphs recorded in another.

    On torch 2.11 this fell back to eager (``AssertionError`` in ``cudagraph_trees.get_obj``) until the
    step prepared its thread (``cudagraph_thread_ready``)."""
    import torch._inductor.cudagraph_trees  # noqa: F401  (imported here, in the main thread)

    cuda = {"compile": "reduce-overhead", "max_cache_len": 96}
    dynamic = HFBackend(BackendConfig(name="hf", model=dirs["llama"], device="cuda"))
    graphs = HFBackend(BackendConfig(name="hf", model=dirs["llama"], device="cuda", options=cuda))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PersonaJudgeWarning)
        want = run_script(dynamic, 1)
        got = _in_thread(lambda: run_script(graphs, 1), "not-the-importer")
    for a, b in zip(want, got):
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, atol=2e-3, rtol=2e-3)
    assert graphs.compile_fallback is None


def test_sampling_runs_under_inference_mode(dirs, monkeypatch):
    """The engine thread enters the backend's ``decoding_context``: torch's inference mode for hf."""
    from personajudge.core import decoding

    seen = []
    original = decoding.device_candidates

    def spy(logits, params, **kw):
        seen.append(torch.is_inference_mode_enabled())
        return original(logits, params, **kw)

    monkeypatch.setattr(decoding, "device_candidates", spy)
    with PersonaJudge({"backend": {"name": "hf"}, "preferences": ["concise"]}, backend=load(dirs["llama"])) as pj:
        pj.generate("hi", method="prompt", max_new_tokens=6, seed=0)
    assert len(seen) >= 6 and all(seen)
    assert not torch.is_inference_mode_enabled()  # only the engine's thread, not the caller's
