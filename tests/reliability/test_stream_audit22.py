"""Findings of the streaming and interruption audit of session 22 (a helper using the API and the CLI as a
user would), each checked against the behaviour it asked for; every test here fails on the code before
its fix.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import signal
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest
from bounded import sigint_as_at_a_terminal
from cli_lines import one_line, run_main

import personajudge as pj
from personajudge.core.errors import ConfigError, ContextLengthError, in_row, located

TOY = {"backend": {"name": "toy"}, "encoder": "plain"}
RUN = {"preferences": ["concise", "humor"], "max_new_tokens": 8, "seed": 1}


def _drain(gen):
    chunks = []
    try:
        while True:
            chunks.append(next(gen))
    except StopIteration as stop:
        return chunks, stop.value


def test_the_one_shot_stream_returns_the_result_as_the_method_does():
    """``PersonaJudge.stream`` returns the finished ``GenerationResult``; the one-shot ``pj.stream`` dropped it
    (``yield from`` without ``return``)."""
    with pj.PersonaJudge(TOY) as m:
        want_chunks, want = _drain(m.stream("hi", **RUN))
    chunks, got = _drain(pj.stream("hi", config=TOY, **RUN))
    assert isinstance(got, pj.GenerationResult)
    assert chunks == want_chunks and "".join(chunks) == got.text == want.text
    assert got.tokens == want.tokens and got.stats.seed == 1


@pytest.mark.parametrize(
    "bad,error,reason",
    [
        ("   ", ConfigError, "the prompt is empty"),
        ([], ConfigError, "a conversation must be a non-empty list"),
    ],
)
def test_generate_batch_names_the_prompt_that_cannot_be_encoded(bad, error, reason):
    """ "the prompt is empty" did not say which of the prompts it was (a prompt too long already said
    ``prompts[i]``, with ``.row``)."""
    prompts = ["ok one", "ok two", "ok three", bad, "ok five"]
    with pj.PersonaJudge(TOY) as m, pytest.raises(error) as err:
        m.generate_batch(prompts, **RUN)
    assert str(err.value).startswith(f"prompts[3]: {reason}"), err.value
    assert err.value.row == 3 and err.value.reason.startswith(reason)


def test_a_marked_error_is_located_by_its_file_line_and_others_are_left_alone():
    where = ["in.jsonl:1", "in.jsonl:4", "in.jsonl:9"]
    marked = in_row(ConfigError("the prompt is empty"), 2)
    assert str(marked) == "prompts[2]: the prompt is empty" and type(marked) is ConfigError
    named = located(marked, where)
    assert str(named) == "in.jsonl:9: the prompt is empty" and type(named) is ConfigError
    long = located(in_row(ContextLengthError("too long"), 1), where)
    assert str(long) == "in.jsonl:4: too long" and type(long) is ContextLengthError
    plain = ConfigError("no row")
    assert located(plain, where) is plain


@pytest.mark.timeout(60)
def test_two_threads_waiting_on_one_job_both_get_its_result():
    """As on a ``concurrent.futures.Future``: the second thread blocked in ``job.result()`` waited for ever
    (the first took the one final event from the job's queue), even after the model was closed."""
    with pj.PersonaJudge(TOY) as m:
        want = m.generate("hello", **{**RUN, "max_new_tokens": 200})
        job = m.submit("hello", **{**RUN, "max_new_tokens": 200})
        got, gate = {}, threading.Barrier(3)

        def wait(name):
            gate.wait()
            got[name] = job.result().tokens

        threads = [threading.Thread(target=wait, args=(n,), daemon=True) for n in "AB"]
        for t in threads:
            t.start()
        gate.wait()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads), "a waiter is still blocked"
        assert got == {"A": want.tokens, "B": want.tokens}
        assert job.result().tokens == want.tokens  # and a reader after the end


@pytest.mark.timeout(60)
def test_two_tasks_waiting_on_one_asyncio_job_both_get_its_result():
    async def main():
        with pj.PersonaJudge(TOY) as m:
            job = m.submit("hello", loop=asyncio.get_running_loop(), **{**RUN, "max_new_tokens": 50})

            async def last():
                async for ev in job.aevents():
                    final = ev
                return final

            a, b = await asyncio.wait_for(asyncio.gather(last(), last()), 30)
            assert a[0] == b[0] == "done" and a[1].tokens == b[1].tokens and len(a[1].tokens) == 50

    asyncio.run(main())


def _pipe_bytes(fd):
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


@pytest.mark.timeout(120)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="FIONREAD on a pipe, /proc/PID/wchan")
def test_ctrl_c_while_a_batch_writes_to_a_full_pipe_leaves_whole_lines(tmp_path):
    """A batch to standard output whose reader is slow: the Ctrl-C landed inside the blocked write of a chunk,
    and CPython's buffered writer dropped the rest of it, leaving a half line (and the count said nothing).
    Now the interrupt waits for the chunk's lines, which all get out, and the last line says how many."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(60)))
    argv = ["generate", "--input", str(src), "--backend", "toy", "--prefer", "concise", "--prefer", "humor"]
    argv += ["--max-new-tokens", "500", "--seed", "7", "--batch-size", "8"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "personajudge", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        preexec_fn=sigint_as_at_a_terminal,  # a CI runner's background shell ignores SIGINT
    )
    wchan = f"/proc/{proc.pid}/wchan"
    deadline = time.monotonic() + 60
    try:  # until the writer waits in its write to the full pipe (not while it decodes the next chunk)
        while not (_pipe_bytes(proc.stdout.fileno()) > 0 and open(wchan).read().strip().endswith("pipe_write")):
            assert proc.poll() is None and time.monotonic() < deadline, "the batch never filled the pipe"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)  # the interrupt is held while the write waits for the reader
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    lines = out.decode().split("\n")
    assert proc.returncode == 130 and lines[-1] == "", (proc.returncode, out[-200:])
    rows = [json.loads(line) for line in lines[:-1]]  # each a whole row
    assert [r["id"] for r in rows] == list(range(1, len(rows) + 1)) and 0 < len(rows) < 60  # ids: line numbers
    assert f"personajudge: {len(rows)} of 60 results were written to standard output\n" in err.decode(), err


# ---------------------------------------------------------------- an eval that stops before its first row


EVAL = ["eval", "--limit", "1", "--max-new-tokens", "4", "--scorers", "length", "--no-progress", "--no-report"]


def test_an_eval_that_fails_before_its_first_row_leaves_no_run_record(tmp_path, capsys):
    """A mistyped ``--model`` left ``run.json`` behind, and the corrected command was then "a different
    configuration", refused without ``--force`` (and told to "rerun the original command")."""
    pytest.importorskip("llama_cpp")
    run_dir = tmp_path / "run"
    bad = [*EVAL, "--backend", "llama-cpp", "--model", str(tmp_path / "nosuch.gguf"), "--run-dir", str(run_dir)]
    code, _, err = run_main(bad, capsys)
    one_line(code, err, "model file not found")
    assert not (run_dir / "run.json").exists() and not (run_dir / "generations.jsonl").exists()
    code, out, err = run_main([*EVAL, "--backend", "toy", "--run-dir", str(run_dir)], capsys)
    assert code == 0 and "4 generated, 0 reused, 0 failed" in err, err


def test_a_ctrl_c_before_the_first_row_says_nothing_is_saved(tmp_path, capsys, monkeypatch):
    from personajudge.evaluation import runner

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "generate", interrupted)
    run_dir = tmp_path / "run"
    code, _, err = run_main([*EVAL, "--backend", "toy", "--run-dir", str(run_dir)], capsys)
    assert code == 130 and err == "personajudge: interrupted\n", err
    assert not (run_dir / "run.json").exists()


def test_a_run_with_rows_keeps_its_record_when_it_stops(tmp_path, capsys, monkeypatch):
    """Control: once a row is in (here: generated, then a Ctrl-C while scoring), the record stays, the
    message says so, and the same command resumes with the rows reused."""
    from personajudge.evaluation import runner

    real = runner.Runner.score

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.Runner, "score", interrupted)
    run_dir = tmp_path / "run"
    code, _, err = run_main([*EVAL, "--backend", "toy", "--run-dir", str(run_dir)], capsys)
    assert code == 130 and "finished rows are saved in" in err and (run_dir / "run.json").exists(), err
    monkeypatch.setattr(runner.Runner, "score", real)
    code, _, err = run_main([*EVAL, "--backend", "toy", "--run-dir", str(run_dir)], capsys)
    assert code == 0 and "0 generated, 4 reused" in err, err


@pytest.mark.parametrize("flag,value", [("--lambdas", ""), ("--scorers", ""), ("--scorers", " , ")])
def test_an_empty_sweep_or_scorer_list_is_refused_as_other_empty_lists_are(tmp_path, capsys, flag, value):
    """``--lambdas ""`` ran with no sweep and ``--scorers ""`` with no scores, while ``--methods ""`` and
    ``--lambdas ,`` were errors: an unset shell variable slipped through."""
    code, _, err = run_main([*EVAL, "--backend", "toy", "--run-dir", str(tmp_path / "r"), flag, value], capsys)
    one_line(code, err, flag)
    assert not (tmp_path / "r" / "run.json").exists()


def _wait_for(predicate, proc, what, seconds=60):
    deadline = time.monotonic() + seconds
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


@pytest.mark.timeout(180)
def test_sigterm_during_a_batch_says_what_is_kept_and_the_rerun_resumes(tmp_path):
    """``kill PID`` of a local batch ended it with status 143 and not a word (a ``--ray`` run said how many rows
    its partial file keeps). Now the same line, and the same resume."""
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"prompt number {i}"}) + "\n" for i in range(60)))
    argv = [sys.executable, "-m", "personajudge", "generate", "--input", str(src), "--output", str(out)]
    argv += ["--backend", "toy", "--prefer", "concise", "--prefer", "humor", "--max-new-tokens", "300"]
    argv += ["--seed", "7", "--batch-size", "4", "--quiet"]
    partial = tmp_path / "out.jsonl.partial"
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
    try:
        _wait_for(lambda: partial.exists() and partial.read_text().count("\n") > 2, proc, "no chunk was written")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    kept = sum(1 for line in partial.read_text().splitlines() if '"id"' in line)
    assert proc.returncode == 143, err
    assert f"{kept} of 60 results are kept in {partial}" in err.decode(), err
    again = subprocess.run(argv, capture_output=True, timeout=120, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(range(1, 61))


@pytest.mark.parametrize("output", [[], ["--output", "-"]], ids=["no-output", "dash"])
@pytest.mark.parametrize("flag", ["--force", "--overwrite"])
def test_force_and_overwrite_to_standard_output_are_refused(tmp_path, capsys, output, flag):
    """They did nothing there without a word, as they would for one prompt (which refuses them)."""
    src = tmp_path / "in.jsonl"
    src.write_text('{"prompt": "hi"}\n')
    code, out, err = run_main(["generate", "--input", str(src), "--backend", "toy", *output, flag], capsys)
    one_line(code, err, f"{flag} needs --output FILE")
    assert out == ""
