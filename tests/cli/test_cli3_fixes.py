"""Fixes of the third command-line audit (items A, B, C, D, E, G, H).

A: bench's memory probes measure themselves, not the bench that started them.
B: a second Ctrl-C while the first stops a llama.cpp batch exits 130, never SIGSEGV.
C: bench-serve stops its server whatever ends it (SIGTERM, SIGINT while the server loads, SIGKILL).
D: a standard output that cannot encode the text never loses the result.
E: bench-serve says why its server did not start.
G: settings from a --config file are named as the file's; a flag's bad value names the flag.
H: a reader that closes the pipe early ends a listing quietly, with the status of SIGPIPE.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bounded import sigint_as_at_a_terminal

from personajudge.bench import _peak_rss_mib, measure_memory
from personajudge.cli import EXIT_PIPE, EncodableStdout, main
from personajudge.core.config import RunConfig

TOY = ["--backend", "toy"]
PJ = [sys.executable, "-m", "personajudge"]


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc: no psutil needed)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not reaped, is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _wait_until(cond, bound: float, step: float = 0.05) -> bool:
    """Poll ``cond`` for at most ``bound`` seconds (a bound on a hang, not a timing assertion)."""
    end = time.monotonic() + bound
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return cond()


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# -- A: memory probes --------------------------------------------------------------------------------


def test_memory_probes_do_not_inherit_the_parents_peak():
    """A parent holding 512 MB starts the probes: each reports its own peak (a toy model is tens of MB),
    not the parent's. ``ru_maxrss`` survives fork and exec on Linux, so the old probes reported at
    least the parent's RSS, and every probe the same figure."""
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    ballast = bytearray(512 * 2**20)
    for i in range(0, len(ballast), 4096):
        ballast[i] = 1
    assert _peak_rss_mib() >= 512  # this process's own peak does include it
    cfg = RunConfig.model_validate({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}})
    mem = measure_memory(cfg, "hi", 2)
    assert mem["peak_rss_mib_1_view"] < 256 and mem["peak_rss_mib_2_views"] < 256, mem
    assert mem["rss_ratio"] == mem["peak_rss_mib_2_views"] / mem["peak_rss_mib_1_view"]
    del ballast


# -- B: a second Ctrl-C ----------------------------------------------------------------------------

#: runs the command line with ``Engine.close`` saying on stderr when it starts waiting for the
#: engine's thread: the moment a second Ctrl-C used to crash the process
_MARK_CLOSE = """
import sys
import personajudge.engine as engine
close = engine.Engine.close
def marked(self, *a, **k):
    sys.stderr.write("JOINING\\n")
    sys.stderr.flush()
    return close(self, *a, **k)
engine.Engine.close = marked
from personajudge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _interruptible(cmd: list[str]) -> subprocess.Popen:
    """``cmd`` with stderr piped, SIGINT at its default (a test signals it), the tests' environment."""
    return subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        preexec_fn=sigint_as_at_a_terminal,
    )


def _double_interrupt(tmp_path: Path, flags: list[str], rows: int) -> tuple[int, str, Path]:
    """A batch interrupted once after its first rows are on disk, and again as soon as it begins
    to stop the engine; (exit status, stderr, partial file)."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"prompt": f"prompt number {i} about owls"}) + "\n" for i in range(rows)))
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    for p in (out, partial):
        p.unlink(missing_ok=True)
    script = tmp_path / "marked.py"
    script.write_text(_MARK_CLOSE)
    cmd = [sys.executable, str(script), "generate", "--input", str(inp), "--output", str(out), *flags]
    proc = _interruptible(cmd)
    try:
        assert _wait_until(lambda: partial.exists() and len(partial.read_text().splitlines()) >= 2, 300)
        proc.send_signal(signal.SIGINT)
        seen = []
        assert proc.stderr is not None
        for line in proc.stderr:
            seen.append(line)
            if line.startswith("JOINING"):
                proc.send_signal(signal.SIGINT)
                break
        rest = proc.stderr.read()
        return proc.wait(60), "".join(seen) + rest, partial
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _check_partial(partial: Path) -> int:
    lines = partial.read_text().splitlines()
    objs = [json.loads(line) for line in lines]  # not one torn line
    assert "personajudge_batch" in objs[0]
    return len(objs) - 1


def test_second_ctrl_c_while_a_toy_batch_stops_exits_130(tmp_path):
    """Two Ctrl-C: status 130 and the rows on disk intact (the code path of item B; the crash itself
    needs a native library freed under its thread: the model test below)."""
    code, err, partial = _double_interrupt(
        tmp_path, [*TOY, "--prefer", "concise", "--prefer", "humor", "--seed", "1", "--batch-size", "4"], 20000
    )
    assert code == 130, err
    assert "Traceback" not in err and err.rstrip().endswith("personajudge: interrupted"), err
    assert _check_partial(partial) >= 1


@pytest.mark.model
def test_second_ctrl_c_while_a_llama_batch_stops_never_segfaults(tmp_path):
    """The second Ctrl-C lands while the engine's thread finishes a llama.cpp step. It used to raise
    inside that wait, skip freeing the model, and let the interpreter shut down under the running
    step: SIGSEGV in about half of the runs. Three runs, each must exit 130 with its rows intact."""
    pytest.importorskip("llama_cpp")
    flags = ["--threads", "1", "--prefer", "concise", "--prefer", "humor", "--seed", "1"]
    flags += ["--max-new-tokens", "8", "--batch-size", "4"]
    for _ in range(3):
        code, err, partial = _double_interrupt(tmp_path, flags, 20)
        assert code == 130, (code, err)
        assert _check_partial(partial) >= 1


# -- C: bench-serve's server ---------------------------------------------------------------------------


def _bench_serve(tmp_path: Path, wait_for: str) -> tuple[subprocess.Popen, int]:
    """A toy bench-serve with a long level, once its stderr shows ``wait_for``; (process, server pid)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from personajudge.cli.serve import BENCH_MAX_REQUESTS  # the most bench-serve takes: a long level

    cmd = [*PJ, "bench-serve", *TOY, "--no-direct", "--requests", str(BENCH_MAX_REQUESTS), "--max-tokens", "64"]
    cmd += ["--concurrency", "1"]
    proc = _interruptible(cmd)
    assert proc.stderr is not None
    for line in proc.stderr:
        if wait_for in line:
            break
    assert _wait_until(lambda: bool(_children(proc.pid)), 60), "no server started"
    (server,) = _children(proc.pid)
    return proc, server


def _check_stopped(proc: subprocess.Popen, server: int, sig: int) -> None:
    try:
        proc.send_signal(sig)
        proc.wait(90)
        assert _wait_until(lambda: not _alive(server), 60), "the server outlived bench-serve"
    finally:
        _kill([server])
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bench_serve_stops_its_server_on_sigterm(tmp_path):
    proc, server = _bench_serve(tmp_path, "requests at concurrency")
    _check_stopped(proc, server, signal.SIGTERM)
    assert proc.returncode == 128 + signal.SIGTERM


def test_bench_serve_stops_its_server_on_sigint_while_it_loads(tmp_path):
    """SIGINT to bench-serve alone while it waits for the server's /health (a model loading)."""
    proc, server = _bench_serve(tmp_path, "starting the server")
    _check_stopped(proc, server, signal.SIGINT)
    assert proc.returncode == 130


def test_bench_serve_killed_outright_takes_its_server_along(tmp_path):
    """SIGKILL runs no cleanup: the kernel's parent-death signal stops the server (Linux)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    proc, server = _bench_serve(tmp_path, "requests at concurrency")
    _check_stopped(proc, server, signal.SIGKILL)


# -- D: a standard output that cannot encode the text -------------------------------------------------


def test_json_on_an_ascii_stdout_is_whole_and_valid():
    pref = "简洁明了地回答"
    cmd = [*PJ, "generate", "hi", *TOY, "--prefer", pref, "--prefer", "humor", "--max-new-tokens", "4"]
    proc = subprocess.run([*cmd, "--json"], capture_output=True, timeout=120, env=_env(PYTHONIOENCODING="ascii"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.isascii()
    assert json.loads(proc.stdout)["settings"]["views"] == [[pref], ["humor"]]
    assert b"Traceback" not in proc.stderr


def test_batch_rows_on_an_ascii_stdout_are_all_written(tmp_path):
    inp = tmp_path / "uni.jsonl"
    inp.write_text('{"prompt": "caf\\u00e9 ok"}\n{"prompt": "plain"}\n')
    cmd = [*PJ, "generate", "--input", str(inp), *TOY, "--prefer", "concise", "--prefer", "humor"]
    cmd += ["--max-new-tokens", "4", "--seed", "1", "-q"]
    proc = subprocess.run(cmd, capture_output=True, timeout=120, env=_env(PYTHONIOENCODING="ascii"))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.decode("ascii").splitlines()]
    assert [r["prompt"] for r in rows] == ["café ok", "plain"]


def test_text_that_stdout_cannot_encode_is_escaped_with_one_warning(capsys):
    raw = io.BytesIO()
    stream = EncodableStdout(io.TextIOWrapper(raw, encoding="ascii", write_through=True))
    stream.write("猫 ok ")
    stream.write("é")
    stream.write(" plain")
    assert raw.getvalue() == b"\\u732b ok \\xe9 plain"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot hold" in err and "PYTHONIOENCODING=utf-8" in err


@pytest.mark.model
def test_streamed_text_on_a_latin1_stdout_is_kept():
    pytest.importorskip("llama_cpp")
    cmd = [*PJ, "generate", "猫是一种可爱的动物。请用中文继续写：", "--threads", "1", "--method", "base"]
    cmd += ["--encoder", "plain", "--seed", "1", "--max-new-tokens", "20", "--stop", "QQQ", "-q"]
    proc = subprocess.run(cmd, capture_output=True, timeout=300, env=_env(PYTHONIOENCODING="latin-1"))
    assert proc.returncode == 0, proc.stderr
    utf8 = subprocess.run(cmd, capture_output=True, timeout=300, env=_env(PYTHONIOENCODING="utf-8"))
    text = utf8.stdout.decode("utf-8")
    assert any(ord(c) > 255 for c in text)  # the case at hand: text latin-1 cannot hold (it echoes the prompt)
    assert proc.stdout == text.encode("latin-1", "backslashreplace")
    assert proc.stderr.decode().count("cannot hold") == 1


# -- E: why the server did not start -----------------------------------------------------------------


def test_bench_serve_quotes_its_servers_error(capsys):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    argv = ["bench-serve", *TOY, "--no-direct", "--requests", "1", "--max-tokens", "2", "--concurrency", "1"]
    # settings serve parses and then refuses (an unknown flag is refused before the server starts:
    # test_cli4_fixes): two default preferences, more views than --max-views allows
    assert main([*argv, "--prefer", "concise", "--prefer", "humor", "--max-views", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("personajudge: error: the server exited with status 2 before it was ready")
    assert "more than --max-views 1" in err[-1].split("it said:", 1)[1]


# -- G: a config file's settings, a flag's values ----------------------------------------------------


def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_bench_names_the_config_files_views(tmp_path, capsys):
    cfg = tmp_path / "views.toml"
    cfg.write_text('views = [["concise", "humor"], ["expert"]]\n[backend]\nname = "toy"\n')
    assert main(["bench", "--config", str(cfg), "--views", "3", "--no-memory", "--no-steps"]) == 2
    err = _err(capsys)
    assert "the 2 views of the config file" in err and str(cfg) in err and "--view groups" not in err


def test_bench_names_the_config_files_stop(tmp_path, capsys):
    cfg = tmp_path / "stop.toml"
    cfg.write_text('[backend]\nname = "toy"\n[decoding]\nstop = ["a"]\n')
    assert main(["bench", "--config", str(cfg), "--no-memory", "--no-steps"]) == 2
    err = _err(capsys)
    assert "decoding.stop" in err and str(cfg) in err and "drop --stop" not in err


def test_bench_warns_of_a_config_files_method_it_does_not_time(tmp_path, capsys):
    cfg = tmp_path / "pad.toml"
    cfg.write_text('method = "pad"\n[backend]\nname = "toy"\n')
    argv = ["bench", "--config", str(cfg), "--max-new-tokens", "2", "--repeats", "1", "--no-memory", "--no-steps"]
    assert main([*argv, "--methods", "plain,persona-judge", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["method"] for r in json.loads(out)["results"]] == ["plain", "persona-judge"]
    warning = [line for line in err.splitlines() if "warning" in line]
    assert (
        len(warning) == 1 and "'pad' is not timed" in warning[0] and "--methods plain,persona-judge,pad" in warning[0]
    )
    assert main([*argv, "--methods", "plain,pad", "--json"]) == 0  # timed: nothing to say
    assert "warning" not in capsys.readouterr().err


def test_a_bad_flag_value_names_the_flag(tmp_path, capsys):
    assert main(["generate", "hi", *TOY, "--top-p", "2"]) == 2
    err = _err(capsys)
    assert "invalid --top-p: decoding.top_p: Input should be less than or equal to 1 (got 2.0)" in err
    assert "invalid config" not in err  # no config file was given
    assert main(["generate", "hi", *TOY, "--model", ""]) == 2  # a rule with "; " in it stays whole
    assert _err(capsys).startswith("personajudge: error: invalid --model: backend.model: must not be empty; omit")
    cfg = tmp_path / "tp.toml"
    cfg.write_text("[decoding]\ntop_p = 3\n")
    assert main(["generate", "hi", *TOY, "--config", str(cfg)]) == 2  # the file's value: as before
    assert "invalid config: decoding.top_p: Input should be less than or equal to 1" in _err(capsys)


# -- H: a closed pipe --------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["preferences"], ["preferences", "--json"], ["plugins", "--json"]])
def test_a_listing_into_a_closed_pipe_ends_quietly(command):
    """The reader is gone before the first write (``| head -1`` once it has its line): no message, and
    the status of a process SIGPIPE ended (128 + 13), as other Unix tools give there."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([*PJ, *command], stdout=write, stderr=subprocess.PIPE, timeout=120, env=_env())
    finally:
        os.close(write)
    assert proc.returncode == EXIT_PIPE == 141
    assert proc.stderr == b""
