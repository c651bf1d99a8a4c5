"""Fixes from the third hf audit (``/work/notes/audit_hf3.md``).

- A: keys and values a request leaves in its KV rows (NaN from a float16 overflow, here a NaN embedding
  row) are zeroed when the rows are truncated, so they cannot reach a later request through the masked
  slots its attention still computes with (NaN + -inf and 0 x NaN are NaN): default and static cache,
  engine busy and idle, through the public API;
- B: a script that never calls ``close()`` exits with status 0 (no "terminate called without an active
  exception", SIGABRT): at exit every engine is stopped and its thread joined before finalization;
- C: the bench's ``plain`` baseline (``model.generate``) on NaN logits is a typed ``NumericalError``,
  greedy too, and a one-line error (exit 2) at the CLI;
- D: the host-read counter sees ``np.asarray``, formatting, one-argument ``torch.where``, a CPU
  ``.to``/``copy_``; the static cache's step is one read by it;
- E: a NaN row of ``generate_batch`` fails alone, named; in a JSONL batch the others are written and the
  error names the input's ``file:line``;
- F: ``threads`` is process-wide in torch: a second backend with another count warns, and ``describe()``
  reports the count in force.

The "NaN model" is the tiny Llama with the input embedding of ``"Z"`` (id 65) set to NaN: any context
holding a ``Z`` has NaN keys, values and logits from there on, as a float16 overflow on one prompt would.
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from cli_lines import run_main  # noqa: E402  (tests/helpers)
from host_reads import HostReads  # noqa: E402
from tiny_hf import build_tiny  # noqa: E402

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.hf import HFBackend  # noqa: E402
from personajudge.core.config import BackendConfig  # noqa: E402
from personajudge.core.errors import NumericalError, PersonaJudgeWarning  # noqa: E402
from personajudge.core.result import GenerationResult  # noqa: E402

pytestmark = pytest.mark.hf

Z = 65  # "Z" in the tiny models' character tokenizer
CLEAN = "Why is the sky blue?"
POISON = "Z " + "Why is the sky blue? " * 6  # longer than CLEAN: its NaN slots lie past CLEAN's length
LONG = "Tell me everything about the sea and the ships on it, " * 2
KW = dict(preferences=["concise", "humor"], encoder="plain", top_k=20)
STATIC = {"cache_implementation": "static", "max_cache_len": 256}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(clean folder, NaN folder): the tiny Llama, and the same with the embedding row of ``Z`` NaN."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    root = tmp_path_factory.mktemp("hf3")
    clean = build_tiny(root / "llama", "llama")
    model = LlamaForCausalLM.from_pretrained(clean)
    with torch.no_grad():
        model.get_input_embeddings().weight[Z] = math.nan
    model.save_pretrained(root / "nan")
    AutoTokenizer.from_pretrained(clean).save_pretrained(root / "nan")
    return clean, str(root / "nan")


def _load(path: str, **options) -> HFBackend:
    return HFBackend(BackendConfig(name="hf", model=path, device="cpu", threads=1, options=options))


def _pj(path: str, max_batch: int = 8, **options) -> PersonaJudge:
    return PersonaJudge({"backend": {"name": "hf"}}, backend=_load(path, **options), max_batch=max_batch)


# ----------------------------------------------------------------------------- A: stale NaN in the KV rows


@pytest.mark.parametrize("options", [{}, STATIC], ids=["dynamic", "static"])
def test_a_failed_request_leaves_no_nan_for_the_next_one_engine_idle(models, options):
    """Idle: with the static cache the next session gets the failed one's buffers (before: every later
    request failed with NumericalError, for good). The dynamic cache reopens its session when idle, so
    that case passed before too: it is the control."""
    with _pj(models[1], **options) as pj:
        want = pj.generate(CLEAN, seed=1, max_new_tokens=12, **KW).tokens  # fresh buffers: the request alone
        with pytest.raises(NumericalError):
            pj.generate(POISON, seed=1, max_new_tokens=12, **KW)
        for _ in range(2):
            assert pj.generate(CLEAN, seed=1, max_new_tokens=12, **KW).tokens == want


@pytest.mark.parametrize("options", [{}, STATIC], ids=["dynamic", "static"])
def test_a_failed_request_leaves_no_nan_for_the_next_one_engine_busy(models, options):
    """Busy: with max_batch=2 the poisoned row and a long one run first; the poisoned one fails at its
    first step, and the clean rows after it join the same open session on the slots it left. Before,
    they failed with NumericalError (the dynamic cache cuts keys at the longest row of the call, the
    long one's, so the clean row's attention covered the stale slots; the static one covers all)."""
    with _pj(models[1], max_batch=2, **options) as pj:
        alone = [pj.generate(p, seed=s, max_new_tokens=12, **KW).tokens for p, s in ((CLEAN, 1), ("Hello there", 2))]
        with pytest.raises(NumericalError) as info:
            pj.generate_batch([POISON, LONG, CLEAN, "Hello there"], seeds=[0, 5, 1, 2], max_new_tokens=12, **KW)
        rows = info.value.rows
        assert isinstance(rows[0], NumericalError)
        assert all(isinstance(r, GenerationResult) for r in rows[1:]), rows
        assert [rows[2].tokens, rows[3].tokens] == alone


@pytest.mark.parametrize("options", [{}, STATIC], ids=["dynamic", "static"])
def test_truncating_a_row_zeroes_the_slots_it_drops(models, options):
    """The session level: after NaN was written into a row, truncating it (to 0, as the engine does when
    a request leaves; or to a length inside it, a rollback) leaves no NaN in its buffers past that length,
    the static trash slot included, and the other rows keep theirs. Before: ``_truncate`` did nothing."""
    b = _load(models[1], **options)
    tok = b.tokenizer
    with b.open(3) as s:
        zz = tok.encode("Zz")
        s.forward_many([(0, tok.encode("ab Z cd"), 1), (1, tok.encode("Z efgh"), 1), (2, zz, 1)])
        keys = [layer.keys for layer in s._cache.layers] + [layer.values for layer in s._cache.layers]
        assert all(not torch.isfinite(k[r]).all() for k in keys for r in range(3))  # the premise: NaN in the rows
        s.truncate(0, 0)
        s.truncate(1, 0)
        n = len(zz) - 1
        s.truncate(2, n)  # a rollback: "Z" kept, "z" dropped
        # the last slot is the trash slot of left-pad tokens: the static cache attends (masked) over it,
        # the dynamic one never does (its keys are cut at the longest row, at most the capacity)
        end = None if options else -1
        for k in keys:
            assert torch.isfinite(k[0, :, :end]).all() and torch.isfinite(k[1, :, :end]).all()
            assert torch.isfinite(k[2, :, n:end]).all() and not torch.isfinite(k[2, :, :n]).all()
    b.close()


# ----------------------------------------------------------------------------- B: exit without close()

RECIPE = """
import personajudge as pj

HF = {{"backend": {{"name": "hf", "model": {model!r}, "threads": 1}}}}
res = pj.generate("Why is the sky blue?", preferences=["concise", "humor"], seed=1, config=HF)  # one shot
print(res.text, res.stats.acceptance_rate, res.as_dict()["settings"]["encoder"])  # the --json form

model = pj.PersonaJudge(HF)  # load once, generate many times
for piece in model.stream("Tell me about owls.", preferences=["friendly", "concise"]):
    print(piece, end="", flush=True)
res = model.generate("Why is the sky blue?", preferences=["concise", "humor"], seed=1)
print(res.stats.acceptance_rate, res.stats.tokens_per_s)

# several preferences in one view, a conversation, other settings
res = model.generate(
    [
        {{"role": "user", "content": "Name a colour."}},
        {{"role": "assistant", "content": "Blue."}},
        {{"role": "user", "content": "Why that one?"}},
    ],
    views=[["concise", "humor"], ["expert"]],
    temperature=0,
    max_new_tokens=64,
    on_text=lambda s: print(s, end="", flush=True),
)

# many prompts as one batch
results = model.generate_batch(["prompt one", "prompt two"], preferences=["concise", "humor"], seed=0)
print("done", len(results))
"""


def test_the_python_recipe_without_close_exits_cleanly(models, tmp_path):
    """README's Python recipe on the hf backend (the tiny model), no ``close()``: exit 0 every time.
    Before, 4 of 5 runs ended in SIGABRT (-6, "terminate called without an active exception"): the
    engine thread freed its idle session's tensors while the interpreter finalized, and was ended
    inside torch. Bounded: 4 runs of a few seconds each."""
    script = tmp_path / "recipe.py"
    script.write_text(RECIPE.format(model=models[0]))
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    for _ in range(4):
        p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0 and "terminate called" not in p.stderr, (p.returncode, p.stderr[-2000:])
        assert p.stdout.rstrip().endswith("done 2")


def test_every_engine_thread_has_ended_when_the_exit_hooks_run(tmp_path):
    """Backend-neutral (toy): an exit hook registered before personajudge is imported runs after its hook
    (LIFO) and sees no engine thread alive. Before, the idle engine thread was still waiting then."""
    script = tmp_path / "exit.py"
    script.write_text(
        textwrap.dedent(
            """
            import atexit, threading
            atexit.register(lambda: print("alive", sum(t.name == "personajudge-engine" and t.is_alive()
                                                         for t in threading.enumerate())))
            import personajudge as pj
            a = pj.PersonaJudge({"backend": {"name": "toy"}})
            b = pj.PersonaJudge({"backend": {"name": "toy"}})
            a.generate("hi", preferences=["concise", "humor"], max_new_tokens=4, seed=0)
            b.generate_batch(["x", "y"], preferences=["concise", "humor"], max_new_tokens=4, seed=0)
            print("started", sum(t.name == "personajudge-engine" for t in threading.enumerate()))
            """
        )
    )
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "started 2" in p.stdout and "alive 0" in p.stdout, p.stdout


# ----------------------------------------------------------------------------- C: the bench's plain baseline


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampling"])
def test_native_generate_on_nan_logits_is_a_numerical_error(models, temperature):
    """Before: greedy returned the argmax of NaN rows (timed as a baseline), sampling raised torch's
    RuntimeError ("probability tensor contains either inf, nan or element < 0")."""
    b = _load(models[1])
    ids = b.tokenizer.encode("Zebras")
    with pytest.raises(NumericalError, match="NaN or infinite"):
        b.native_generate(ids, temperature=temperature, top_k=20, top_p=1.0, max_new_tokens=6, seed=0)
    b.close()


def test_native_generate_on_finite_logits_is_model_generate(models):
    """The check replaces only non-finite rows: on a clean model greedy ``native_generate`` is plain
    greedy ``model.generate`` token for token."""
    b = _load(models[0])
    ids = b.tokenizer.encode("Why is the sky blue?")
    got = b.native_generate(ids, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=12, seed=0)
    x = torch.tensor([ids])
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = b.model.generate(
            x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12, min_length=0, pad_token_id=0
        )
    want = out[0, len(ids) :].tolist()
    eos = next((i for i, t in enumerate(want) if t in b.tokenizer.eos_token_ids), len(want))
    assert got == want[:eos] and len(got) > 0
    b.close()


@pytest.mark.parametrize("temperature", ["0", "0.8"], ids=["greedy", "sampling"])
def test_bench_plain_on_nan_logits_is_one_line_exit_2(models, capsys, temperature):
    argv = ["bench", "--backend", "hf", "--model", models[1], "--threads", "1", "--prompt", "Zebras"]
    argv += ["--methods", "plain", "--max-new-tokens", "4", "--repeats", "1", "--no-memory", "--no-steps"]
    code, _, err = run_main([*argv, "--temperature", temperature], capsys)
    assert code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert ": error: " in last and "NaN or infinite" in last and "model.generate" in last, err


# ----------------------------------------------------------------------------- D: the host-read counter


def test_the_counter_sees_the_other_forms_of_a_read():
    """Each of these reads device data on CUDA; the counter was blind to every one of them."""
    t, s = torch.arange(5.0), torch.tensor(3.0)
    forms = {
        "np.asarray": lambda: np.asarray(t),
        "np.array": lambda: np.array(t),
        "format": lambda: f"{s:.3f}",
        "repr": lambda: repr(s),
        "copy_ into a host buffer": lambda: torch.empty(5).copy_(t),
        "to(torch.device('cpu'))": lambda: t.to(torch.device("cpu")),
        "to(device='cpu')": lambda: t.to(device="cpu"),
        "one-argument where": lambda: torch.where(t > 1),
        "bool-mask assignment": lambda: t.clone().__setitem__(t > 1, 0.0),
        "bincount": lambda: torch.bincount(t.long()),
    }
    for name, fn in forms.items():
        with HostReads() as c:
            fn()
        assert c.count == 1, (name, c.names)


def test_the_counter_leaves_what_does_not_read():
    """Negative control: device-side work, a non-blocking copy, and three-argument where are no reads."""
    t = torch.arange(5.0)
    buf = torch.empty(5)
    with HostReads() as c:
        t + 1, torch.where(t > 1, t, 0.0), t.topk(2), t[1:], t.to(torch.float64)
        buf.copy_(t, non_blocking=True)
        t.to("cpu", non_blocking=True)
    assert c.count == 0, c.names


def test_one_host_read_per_step_with_the_static_cache(models):
    """Static cache, 3 rows of different prompt lengths that finish at different steps: exactly one read
    per step, counted around the whole step (forward, judge, slot release included). Before, its pinned
    input buffer's ``.numpy()`` view (made per query length) counted as a read."""
    from personajudge.core.batched import BatchedJudge
    from personajudge.core.decoding import DecodeRequest, StepDriver
    from personajudge.core.result import Stats
    from personajudge.core.stopping import Emitter
    from personajudge.core.transforms import SamplingParams

    b = _load(models[0], **STATIC)
    tok = b.tokenizer
    session = b.open(6)
    driver, judge = StepDriver(session), BatchedJudge()
    for i, (text, n) in enumerate([("Why?", 20), ("Tell me a long story about owls", 9), ("Hello there", 14)]):
        req = DecodeRequest(
            contexts=[tok.encode(f"view {v}: {text}") for v in range(2)],
            params=SamplingParams(0.7, 20, 0.9),
            lam=3,
            rng=np.random.default_rng(i),
            emitter=Emitter(tok, max_new_tokens=n),
            context_length=b.context_length,
            stats=Stats(),
        )
        driver.add_row(i, judge, req, [2 * i, 2 * i + 1])
    reads = []
    while len(driver):
        with HostReads() as c:
            _, failed = driver.step()
        assert not failed
        reads.append((c.count, dict(c.names)))
    session.close()
    b.close()
    assert len(reads) >= 10 and all(n == 1 for n, _ in reads), reads


# ----------------------------------------------------------------------------- E: a NaN row in a batch


def test_a_nan_row_of_generate_batch_fails_alone_and_is_named(models):
    """Before: the call raised the first row's NumericalError without its row, and the others were lost."""
    with _pj(models[1]) as pj:
        prompts = [CLEAN, "Why is the Zky blue?", "Hello there"]
        alone = [pj.generate(p, seed=s, max_new_tokens=10, **KW).tokens for p, s in ((CLEAN, 3), ("Hello there", 5))]
        with pytest.raises(NumericalError) as info:
            pj.generate_batch(prompts, seeds=[3, 4, 5], max_new_tokens=10, **KW)
    err = info.value
    assert err.row == 1 and str(err).startswith("prompts[1]: ") and "NaN or infinite" in str(err)
    assert isinstance(err.rows[1], NumericalError)
    assert [err.rows[0].tokens, err.rows[2].tokens] == alone


def test_a_nan_line_of_a_jsonl_batch_is_named_and_the_others_are_kept(models, tmp_path, capsys):
    """Before: exit 2 with no line named and, with --batch-size 3, no row kept. Now the other rows of its
    chunk and of later chunks are written; the error names the line; a rerun redoes only that row."""
    src = tmp_path / "in.jsonl"
    lines = [CLEAN, "Why is the Zky blue?", "Hello there", "Good morning"]
    src.write_text("".join(json.dumps({"prompt": p, "seed": 3 + i}) + "\n" for i, p in enumerate(lines)))
    out = tmp_path / "out.jsonl"
    argv = ["generate", "--input", str(src), "--output", str(out), "--batch-size", "3", "--backend", "hf"]
    argv += ["--model", models[1], "--threads", "1", "--max-new-tokens", "6", "--prefer", "concise"]
    argv += ["--prefer", "humor", "--encoder", "plain", "--top-k", "20"]
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert f"{src.name}:2: " in err.strip().splitlines()[-1] and "NaN or infinite" in err, err
    partial = tmp_path / "out.jsonl.partial"
    rows = [json.loads(x) for x in partial.read_text().splitlines()[1:]]
    assert sorted(r["id"] for r in rows) == [1, 3, 4] and not out.exists()
    code, _, err = run_main(argv, capsys)  # a rerun: the three rows are kept, the NaN line fails again
    assert code == 2 and f"{src.name}:2: " in err and "3 of 4" in err, err


# ----------------------------------------------------------------------------- F: threads


def test_a_second_thread_count_warns_and_describe_reports_the_count_in_force(models):
    a = _load(models[0])
    assert a.describe()["threads"] == 1
    with pytest.warns(PersonaJudgeWarning, match=r"threads=2 changes torch's process-wide thread count.*threads=1"):
        b = HFBackend(BackendConfig(name="hf", model=models[0], device="cpu", threads=2))
    try:
        assert torch.get_num_threads() == 2
        assert a.describe()["threads"] == 2 == b.describe()["threads"]  # a runs on 2 now, and says so
    finally:
        torch.set_num_threads(1)
    assert a.describe()["threads"] == 1
    b.close()
    del b
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PersonaJudgeWarning)
        _load(models[0]).close()  # the same count as the live one's (b is gone): no warning
    a.close()
