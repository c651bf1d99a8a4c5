"""``generate_batch`` loses no row's result when another row fails with an error that is not NaN logits.

Each row is its own request in the engine, and a forward that cannot run for one row fails that row
alone (``StepDriver`` retries the batch request by request). The call used to raise that row's error
at once and cancel the others, so every finished or half-finished row was lost. Now it waits for every
row and raises the error itself (its type kept) with ``.row`` and ``.rows``, as it does for NaN rows.
"""

import json

import pytest
from poison_backend import PoisonError, PoisonToy  # tests/helpers

from personajudge.api import PersonaJudge
from personajudge.backends.toy import ToyBackend
from personajudge.batch import read_records, run_jsonl

PROMPTS = ["tell me about owls", "poison apple", "how do bees make honey", "what is a prime number"]
PREFS = ["concise", "humor"]
DECODING = {"max_new_tokens": 16, "lambda": 3}
RUN = dict(preferences=PREFS, seed=0)


def _pj(backend):
    return PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain", "decoding": DECODING}, backend=backend)


def test_a_row_that_fails_with_its_own_error_keeps_the_other_rows_results():
    be = PoisonToy()
    pj = _pj(be)
    with pytest.raises(PoisonError, match="cannot run slot") as info:
        pj.generate_batch(PROMPTS, seeds=[0, 1, 2, 3], **RUN)
    err = info.value
    assert be.raised >= 1
    assert err.row == 1
    assert len(err.rows) == len(PROMPTS) and err.rows[1] is err
    alone = _pj(ToyBackend())
    for i in (0, 2, 3):
        want = alone.generate(PROMPTS[i], **{**RUN, "seed": i})
        assert err.rows[i].tokens == want.tokens and err.rows[i].text == want.text, i
        assert err.rows[i].settings["decoding"]["seed"] == i
    # the engine goes on: the same call without the poisoned row is whole
    res = pj.generate_batch([PROMPTS[0], PROMPTS[2]], seeds=[0, 2], **RUN)
    assert [r.tokens for r in res] == [err.rows[0].tokens, err.rows[2].tokens]
    pj.close()
    alone.close()


def test_the_first_failed_row_is_named_when_several_fail():
    be = PoisonToy()
    pj = _pj(be)
    prompts = [PROMPTS[0], "poison one", "poison two", PROMPTS[3]]
    with pytest.raises(PoisonError) as info:
        pj.generate_batch(prompts, seeds=[0, 1, 2, 3], **RUN)
    err = info.value
    assert err.row == 1
    assert isinstance(err.rows[1], PoisonError) and isinstance(err.rows[2], PoisonError)
    assert [type(r).__name__ for r in (err.rows[0], err.rows[3])] == ["GenerationResult"] * 2
    pj.close()


def test_a_jsonl_batch_keeps_the_finished_rows_of_the_chunk_that_failed_and_resumes_after_them(tmp_path):
    """Before: the chunk's three finished rows were lost with the one that failed, and a rerun decoded
    all four again. Now they are written before the run stops with the row's own error; the rerun (the
    backend fixed) decodes only that row, and the output is the clean run's."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": p, "seed": i}) + "\n" for i, p in enumerate(PROMPTS)))
    records = read_records(src)
    out = tmp_path / "out.jsonl"
    pj = _pj(PoisonToy())
    with pytest.raises(PoisonError):
        run_jsonl(pj, records, preferences=PREFS, batch_size=4, output=str(out), progress=False)
    pj.close()
    partial = tmp_path / "out.jsonl.partial"
    kept = [json.loads(x) for x in partial.read_text().splitlines()[1:]]
    assert sorted(r["id"] for r in kept) == [1, 3, 4] and not out.exists()

    fixed = _pj(ToyBackend())
    assert run_jsonl(fixed, records, preferences=PREFS, batch_size=4, output=str(out), progress=False) == 1
    clean = tmp_path / "clean.jsonl"
    run_jsonl(fixed, records, preferences=PREFS, batch_size=4, output=str(clean), progress=False)
    fixed.close()
    assert _rows(out) == _rows(clean) and len(_rows(out)) == len(PROMPTS)


def _rows(path):
    """Each row's id, prompt, text and tokens (not its timings)."""
    return [
        {k: r[k] for k in ("id", "prompt", "text", "tokens")} for r in map(json.loads, path.read_text().splitlines())
    ]
