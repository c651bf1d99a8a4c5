"""`generate --input/--output` resumes after being killed, and writes its outputs safely.

The SIGKILL tests run the real CLI in a subprocess; a wrapper (below) only slows each chunk down so
that the kill lands while the run is in progress, at two different points.
"""

import errno
import io
import json
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from personajudge.cli import main
from personajudge.core.files import JsonlAppendFile

TOY = ["--backend", "toy", "--prefer", "concise", "--prefer", "humor", "--max-new-tokens", "12"]
N = 12

#: Runs the CLI with every generate_batch call slowed down (so a kill can land mid-run).
SLOW_MAIN = textwrap.dedent("""
    import sys, time
    from personajudge.api import PersonaJudge
    real = PersonaJudge.generate_batch
    def slow(self, *a, **k):
        time.sleep(0.15)
        return real(self, *a, **k)
    PersonaJudge.generate_batch = slow
    from personajudge.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def write_input(path, n=N, seeds=True):
    with open(path, "w") as f:
        for i in range(n):
            row = {"id": i if i % 2 else f"p{i}", "prompt": f"tell me about thing {i}"}
            if seeds and i == 4:
                row["seed"] = 999
            f.write(json.dumps(row) + "\n")


def rows(path):
    return [json.loads(x) for x in open(path)]


def partial_rows(path):
    lines = [json.loads(x) for x in open(path) if x.endswith("\n")]
    return [r for r in lines if "fp" in r]


def untimed(row):
    return {**row, "stats": {k: v for k, v in row["stats"].items() if k not in ("wall_time_s", "tokens_per_s")}}


def argv_for(inp, out, *extra):
    return ["generate", "--input", str(inp), "--output", str(out), *TOY, "--batch-size", "2", *extra]


def run_and_kill(argv, partial, at_least):
    """Start the CLI, SIGKILL it once the partial file holds ``at_least`` rows; return the rows it had."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_MAIN, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if partial.exists() and len(partial_rows(partial)) >= at_least:
                break
            if proc.poll() is not None:
                pytest.fail(f"run ended before the kill: {proc.stderr.read().decode()}")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(30)
        proc.stderr.close()
    return partial_rows(partial)


def test_sigkill_twice_then_resume_equals_uninterrupted_run(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_input(inp)
    ref, out = tmp_path / "ref.jsonl", tmp_path / "out.jsonl"
    assert main(argv_for(inp, ref, "--seed", "3", "-q")) == 0
    partial = tmp_path / "out.jsonl.partial"
    argv = argv_for(inp, out, "--seed", "3", "-q")
    first = run_and_kill(argv, partial, 2)
    assert 2 <= len(first) < N and not out.exists()
    second = run_and_kill(argv, partial, len(first) + 4)
    assert len(second) < N and not out.exists()
    assert second[: len(first)] == first  # rows of the first run kept as they were, not regenerated
    assert main(argv) == 0
    final = rows(out)
    assert [r["id"] for r in final] == [r["id"] for r in rows(ref)]  # each row once, input order
    assert [untimed(r) for r in final] == [untimed(r) for r in rows(ref)]
    assert not partial.exists()
    kept = {r["id"]: r for r in second}
    for r in final:  # the rows killed runs wrote are in the output untouched (timings included)
        if r["id"] in kept:
            assert {**r, "fp": kept[r["id"]]["fp"]} == kept[r["id"]]


def test_rows_without_a_seed_are_kept_on_resume(tmp_path, capsys):
    """Without --seed the rows cannot be reproduced: a rerun must keep them, not redo them."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, seeds=False)
    first = run_and_kill(argv_for(inp, out, "-q"), tmp_path / "out.jsonl.partial", 3)
    assert main(argv_for(inp, out, "-q")) == 0
    final = {r["id"]: r for r in rows(out)}
    assert len(final) == N
    for r in first:
        r.pop("fp")
        assert final[r["id"]] == r


def _interrupted(tmp_path, *extra, after=1):
    """A partial file holding ``after`` chunks of a run stopped by Ctrl-C (in process)."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp)
    import personajudge.batch as batch

    real = batch.JsonlBatch._write
    calls = {"n": 0}

    def write_then_stop(self, chunk, rows_):
        real(self, chunk, rows_)
        calls["n"] += 1
        if calls["n"] == after:
            raise KeyboardInterrupt

    batch.JsonlBatch._write = write_then_stop
    try:
        assert main(argv_for(inp, out, "--seed", "3", "-q", *extra)) == 130
    finally:
        batch.JsonlBatch._write = real
    return inp, out, tmp_path / "out.jsonl.partial"


def test_torn_last_line_is_dropped(tmp_path, capsys):
    inp, out, partial = _interrupted(tmp_path, after=2)
    ref = tmp_path / "ref.jsonl"
    assert main(argv_for(inp, ref, "--seed", "3", "-q")) == 0
    text = partial.read_text()
    whole = rows(ref)[4]
    with open(partial, "a") as f:  # a kill in the middle of writing the fifth row
        f.write(json.dumps({**whole, "fp": "x"})[:40])
    assert main(argv_for(inp, out, "--seed", "3", "-q")) == 0
    assert [untimed(r) for r in rows(out)] == [untimed(r) for r in rows(ref)]
    assert text  # the run before the tear had written something


def test_changed_settings_refuse_to_resume_without_force(tmp_path, capsys):
    inp, out, partial = _interrupted(tmp_path, after=2)
    before = partial.read_bytes()
    capsys.readouterr()
    code = main(argv_for(inp, out, "--seed", "3", "-q", "--temperature", "0.3"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "decoding.temperature" in err[0] and "--force" in err[0]
    assert partial.read_bytes() == before  # nothing lost
    # A changed prompt is refused as well: its row no longer matches.
    lines = open(inp).read().splitlines()
    lines[0] = json.dumps({"id": "p0", "prompt": "something else"})
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    assert main(argv_for(inp, out, "--seed", "3", "-q")) == 2
    assert "do not match the input" in capsys.readouterr().err
    # --force keeps what still matches (3 of the 4 rows) and redoes the rest.
    kept = {r["id"]: r for r in partial_rows(partial) if r["id"] != "p0"}
    assert main(argv_for(inp, out, "--seed", "3", "-q", "--force")) == 0
    final = {r["id"]: r for r in rows(out)}
    assert final["p0"]["prompt"] == "something else" and len(final) == N
    for rid, r in kept.items():
        assert {**final[rid], "fp": r["fp"]} == r


class _Terminal(io.StringIO):
    """A standard error that says it is a terminal."""

    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_quiet(tmp_path, monkeypatch):
    inp = tmp_path / "in.jsonl"
    write_input(inp, 4)
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert main(argv_for(inp, tmp_path / "a.jsonl")) == 0
    err = sys.stderr.getvalue()
    assert "4/4" in err and "row/s" in err and "tok/s" in err
    monkeypatch.setattr(sys, "stderr", _Terminal())
    assert main(argv_for(inp, tmp_path / "b.jsonl", "-q")) == 0
    assert sys.stderr.getvalue() == ""


def test_no_progress_bar_when_stderr_is_not_a_terminal(tmp_path, capsys):
    """A log file (``2> log``) gets no carriage-return redraws: tqdm draws only on a terminal."""
    inp = tmp_path / "in.jsonl"
    write_input(inp, 4)
    assert main(argv_for(inp, tmp_path / "a.jsonl")) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "row/s" not in err and err == ""


# -- safe outputs ----------------------------------------------------------------------------------


def test_symlink_fifo_and_device_outputs_are_refused(tmp_path, capsys):
    inp = tmp_path / "in.jsonl"
    write_input(inp, 2)
    real = tmp_path / "real.jsonl"
    real.write_text("precious\n")
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    for target, needle in [(link, "symbolic link"), (fifo, "FIFO"), ("/dev/null", "character device")]:
        for extra in ([], ["--overwrite"]):
            assert main(argv_for(inp, target, "-q", *extra)) == 2, (target, extra)
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and needle in err[0], err
    assert real.read_text() == "precious\n" and link.is_symlink() and fifo.is_fifo()
    # The partial file is never written through a link either.
    (tmp_path / "out.jsonl.partial").symlink_to(real)
    assert main(argv_for(inp, tmp_path / "out.jsonl", "-q")) == 2
    assert "symbolic link" in capsys.readouterr().err and real.read_text() == "precious\n"
    # '-' is standard output.
    assert main(argv_for(inp, "-", "-q")) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


def test_overwrite_replaces_a_regular_file_atomically(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 3)
    out.write_text("old\n")
    os.chmod(out, 0o640)
    assert main(argv_for(inp, out, "-q")) == 2 and out.read_text() == "old\n"
    assert main(argv_for(inp, out, "-q", "--overwrite")) == 0
    assert len(rows(out)) == 3 and (os.stat(out).st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]  # no temp files left


def test_second_writer_is_refused_while_the_first_holds_the_file(tmp_path, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 2)
    with JsonlAppendFile(tmp_path / "out.jsonl.partial") as other:
        other.open()
        assert main(argv_for(inp, out, "-q")) == 2
    assert "another process is writing" in capsys.readouterr().err


def test_full_disk_is_one_line_and_keeps_partial_results(tmp_path):
    """A file-size limit makes the kernel fail a write mid-run (EFBIG, as ENOSPC would): one line, exit 2,
    the finished rows on disk; the same command without the limit finishes the run."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp)
    argv = argv_for(inp, out, "--seed", "3", "-q")
    assert main(argv_for(inp, tmp_path / "ref.jsonl", "--seed", "3", "-q")) == 0
    size = (tmp_path / "ref.jsonl").stat().st_size

    def limit():  # in the child: half the output fits
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))

    code = "import sys; from personajudge.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.run(
        [sys.executable, "-c", code, *argv], preexec_fn=limit, capture_output=True, text=True, timeout=120
    )
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "File too large" in err[0] and "kept in" in err[0] and "rerun the same command" in err[0]
    partial = tmp_path / "out.jsonl.partial"
    assert 0 < len(partial_rows(partial)) < N and not out.exists()
    assert main(argv) == 0
    assert len(rows(out)) == N and not partial.exists()


def test_disk_full_on_append_names_enospc(tmp_path, monkeypatch, capsys):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, 6)
    real_fsync, calls = os.fsync, {"n": 0}

    def fsync(fd):
        if os.path.realpath(f"/proc/self/fd/{fd}").endswith(".partial"):
            calls["n"] += 1
            if calls["n"] == 3:  # header, first chunk, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(argv_for(inp, out, "-q")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "kept in" in err[0], err


def test_closed_pipe_is_one_line_exit_2(tmp_path):
    inp = tmp_path / "in.jsonl"
    write_input(inp, 40)
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_MAIN, "generate", "--input", str(inp), *TOY, "--batch-size", "1", "-q"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    first = proc.stdout.readline()
    proc.stdout.close()  # `| head -1`
    try:
        code = proc.wait(120)
    finally:
        proc.kill()
    err = proc.stderr.read().decode().strip().splitlines()
    proc.stderr.close()
    assert json.loads(first)["id"] == "p0"
    assert code == 2 and len(err) == 1 and "broken pipe" in err[0], err


def test_a_prompt_too_long_for_the_context_names_its_line_and_loses_no_finished_chunk(tmp_path, capsys):
    """Rows are checked against the context before their chunk decodes: the error names ``file:line``
    (it was a bare "the prompt of view 0 is ..." with no line), chunks before it stay on disk, and the
    rerun after the fix continues from them."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=6)
    lines = inp.read_text().splitlines()
    lines[4] = json.dumps({"id": "long", "prompt": "ab " * 3000})  # line 5, in the third chunk of 2
    inp.write_text("\n".join(lines) + "\n")
    code = main(argv_for(inp, out, "--seed", "3", "-q", "--batch-size", "2"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 2 and "4 of 6 results are kept" in err[0], err
    assert err[1].startswith(f"personajudge: error: {inp}:5: the prompt of view 0 is "), err
    lines[4] = json.dumps({"id": "long", "prompt": "ab"})
    inp.write_text("\n".join(lines) + "\n")
    assert main(argv_for(inp, out, "--seed", "3", "-q", "--batch-size", "2")) == 0
    assert [r["id"] for r in rows(out)] == ["p0", 1, "p2", 3, "long", 5]


def test_a_run_that_fails_before_its_first_row_leaves_nothing_and_its_fix_runs(tmp_path, capsys):
    """A prompt too long for --n-ctx fails before any row: no partial file is left, and the rerun with the
    context the error asks for runs without --force."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=3)
    assert main(argv_for(inp, out, "--n-ctx", "16", "-q")) == 2
    assert "--n-ctx" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl.partial").exists() and not out.exists()
    assert main(argv_for(inp, out, "--n-ctx", "4096", "-q")) == 0
    assert len(rows(out)) == 3


def test_a_partial_file_with_only_its_settings_line_is_taken_over_without_force(tmp_path, capsys):
    """A header-only partial (a run killed while loading its model, or an older version that left one) holds
    no row to lose: a rerun with other settings replaces it, where one holding rows needs --force."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=3)
    partial = tmp_path / "out.jsonl.partial"
    from personajudge.batch import FORMAT, HEADER_KEY

    header = {HEADER_KEY: FORMAT, "settings_hash": "old", "settings": {"backend": {"n_ctx": 16}}}
    partial.write_text(json.dumps(header) + "\n")
    assert main(argv_for(inp, out, "-q")) == 0
    assert len(rows(out)) == 3 and not partial.exists()
    # negative control: the same settings line followed by a row is refused without --force
    partial.write_text(json.dumps(header) + "\n" + json.dumps({"id": 1, "fp": "x", "text": ""}) + "\n")
    out.unlink()
    assert main(argv_for(inp, out, "-q")) == 2
    assert "cannot resume from" in capsys.readouterr().err


@pytest.mark.parametrize(
    "content",
    [b"my precious notes\n", b"garbage1\ngarbage2\n", b"my precious notes", b'{"personajudge_batch_notes": 1}'],
    ids=["one-line", "two-lines", "no-newline", "torn-like-another-key"],
)
def test_a_partial_path_holding_a_file_this_command_did_not_write_is_refused_untouched(tmp_path, capsys, content):
    """Lines that are not JSON read as an empty file: it was taken over, its last line cut as a torn write,
    and deleted when the run finished (exit 0). It has no settings line, so it is refused like a file of
    JSON lines without one; --force replaces it, as the message says."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=2)
    partial = tmp_path / "out.jsonl.partial"
    partial.write_bytes(content)
    assert main(argv_for(inp, out, "-q")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no settings line" in err[0] and "--force" in err[0]
    assert partial.read_bytes() == content and not out.exists()
    assert main(argv_for(inp, out, "-q", "--force")) == 0
    assert len(rows(out)) == 2 and not partial.exists()


def test_an_unreadable_line_inside_a_partial_file_is_refused_not_skipped(tmp_path, capsys):
    """Only a torn last line is dropped silently; a complete line that is not JSON is not one this
    command wrote (each row is one write, fsynced), so it is refused like any other foreign line."""
    inp, out, partial = _interrupted(tmp_path, after=2)
    kept = len(partial_rows(partial))
    assert kept == 4  # two chunks of --batch-size 2
    lines = partial.read_bytes().splitlines(keepends=True)
    partial.write_bytes(b"".join([lines[0], b"not json\n", *lines[1:]]))
    before = partial.read_bytes()
    capsys.readouterr()
    assert main(argv_for(inp, out, "--seed", "3", "-q")) == 2
    assert "1 of its lines are not result rows" in capsys.readouterr().err
    assert partial.read_bytes() == before
    assert main(argv_for(inp, out, "--seed", "3", "--force")) == 0
    assert "kept 4 matching row(s)" in capsys.readouterr().err  # and the unreadable line dropped
    assert len(rows(out)) == N


def test_a_torn_settings_line_alone_is_a_new_file(tmp_path):
    """A kill while the settings line was being written leaves its start and no newline: nothing to keep."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_input(inp, n=2)
    (tmp_path / "out.jsonl.partial").write_bytes(b'{"personajudge_batch": 1, "settings_ha')
    assert main(argv_for(inp, out, "-q")) == 0
    assert len(rows(out)) == 2
