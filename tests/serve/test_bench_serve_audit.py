"""``personajudge bench-serve`` against servers that misbehave (audit findings F, G, H, I).

The misbehaving servers are small stdlib HTTP servers on 127.0.0.1 (a free port), stopped by each test:
one that never answers a completion, one whose completions fail, one that fails after the warm-up.
The bench must stop by itself, say why in one line and exit 2, and check its flags before any work.
"""

import json
import socket
import subprocess
import sys

import pytest
from fake_openai import MODEL, fake_server
from refuse import refuse_calls
from serve_helpers import free_port

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import personajudge.cli.serve as cli_serve  # noqa: E402
import personajudge.serve.bench as serve_bench  # noqa: E402
from personajudge.cli import main  # noqa: E402
from personajudge.core.errors import ConfigError  # noqa: E402

BENCH = ["bench-serve", "--backend", "toy", "--requests", "2", "--max-tokens", "4", "--concurrency", "1"]


@pytest.fixture
def no_direct_row(monkeypatch):
    """The direct row must not run before a flag or URL problem is found."""

    refuse_calls(monkeypatch, serve_bench, "direct_row", "the direct row ran before the bad input was reported")


# F: bounded client


def test_a_server_that_never_answers_stops_the_bench_by_itself():
    """--url at a server that accepts the completion and never answers: the bench ends (the subprocess's
    own timeout is only a bound against a hang, not a timing assertion) with one line naming the limit."""
    with fake_server("hang") as (url, _):
        argv = [*BENCH, "--no-direct", "--url", url, "--request-timeout", "0.5", "--json"]
        proc = subprocess.run(
            [sys.executable, "-m", "personajudge", *argv], capture_output=True, text=True, timeout=120
        )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no complete answer within 5.5s" in lines[0] and "warm-up" in lines[0]
    assert proc.stdout == ""


def test_the_url_probe_is_bounded_too():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)  # accepts (in the backlog) and never answers
    try:
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
        with pytest.raises(ConfigError, match="no answer from .*/models within 0.5s"):
            serve_bench.check_url(url, model=MODEL, headers={}, timeout=0.5)
    finally:
        listener.close()


# G: bad input, one line, before any work


@pytest.mark.parametrize("levels", ["abc", "1,x", "1.5"])
def test_a_mistyped_concurrency_is_one_line(levels, capsys, no_direct_row):
    assert main([*BENCH[:-2], "--concurrency", levels]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--concurrency takes positive integers" in err[0] and repr(levels) in err[0]


@pytest.mark.parametrize("url", ["notaurl", "ftp://127.0.0.1/v1", "http://"])
def test_a_bad_url_is_one_line_before_the_direct_row(url, capsys, no_direct_row):
    assert main([*BENCH, "--url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("personajudge: error: --url")


def test_an_unreachable_url_is_one_line_before_the_direct_row(capsys, no_direct_row):
    assert main([*BENCH, "--url", f"http://127.0.0.1:{free_port()}/v1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the server" in err[0]


def test_a_url_that_does_not_serve_the_model_is_one_line(capsys, no_direct_row):
    with fake_server("ok") as (url, _):
        assert main([*BENCH, "--url", url, "--served-model-name", "other"]) == 2
    err = capsys.readouterr().err
    assert "does not serve 'other'" in err and MODEL in err


# H: the server flags reach the started server, or are refused


@pytest.mark.parametrize("flag", [["--port", "1"], ["--host", "10.0.0.1"], ["--port", "8000"]])
def test_host_and_port_are_refused(flag, capsys, no_direct_row):
    assert main([*BENCH, *flag]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "127.0.0.1 and a free port" in err[0]


def test_the_server_limits_are_forwarded(monkeypatch, capsys):
    seen = {}

    def fake_run(cfg, **kw):
        seen.update(kw)
        return {
            "machine": "m",
            "server": "started",
            "backend": "toy",
            "model": "default",
            "method": "pj",
            "requests_per_level": 2,
            "max_tokens": 4,
            "rows": [],
        }

    monkeypatch.setattr(cli_serve, "run_bench_serve", fake_run)
    argv = [*BENCH, "--max-tokens-limit", "3", "--request-timeout", "7", "--shutdown-timeout", "2.5"]
    assert main(argv) == 0
    flags = seen["server_flags"]
    assert "--max-tokens-limit=3" in flags and "--request-timeout=7.0" in flags and "--shutdown-timeout=2.5" in flags
    assert seen["request_timeout"] == 7.0  # and the client's bound follows it


def test_a_forwarded_limit_is_enforced_by_the_started_server(capsys):
    """End to end: the started toy server refuses max_tokens 4 over --max-tokens-limit 2, and the bench
    says so in one line instead of timing a configuration that was not asked for."""
    assert main([*BENCH, "--no-direct", "--max-tokens-limit", "2"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 400" in err and "at most 2" in err


# I: failures are errors quoting the server; --url's header names the server


def test_a_failing_warm_up_quotes_the_server(capsys):
    with fake_server("fail") as (url, _):
        assert main([*BENCH, "--no-direct", "--url", url]) == 2
    err = capsys.readouterr().err
    assert "HTTP 503" in err and "the fake server is overloaded" in err


def test_a_level_where_every_request_fails_is_an_error(capsys):
    with fake_server("fail-after-1") as (url, handler):
        assert main([*BENCH, "--no-direct", "--url", url, "--json"]) == 2
        assert handler.posts == 3  # the warm-up succeeded, then both timed requests failed
    out = capsys.readouterr()
    assert "all 2 requests at concurrency 1 failed" in out.err and "HTTP 503" in out.err
    assert "the fake server is overloaded" in out.err


def test_with_url_the_header_names_the_server_not_the_local_flags(capsys):
    with fake_server("ok") as (url, _):
        assert main([*BENCH, "--no-direct", "--url", url + "/"]) == 0
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert f"server at {url}," in head and "backend toy" not in head and "method" not in head
    assert "| server c=1 | 2 | 2 |" in out


def test_with_url_the_direct_row_gets_no_ratio_to_the_remote_server(capsys):
    """The direct row runs here, the server at --url anywhere: their speeds are no ratio of each other."""
    with fake_server("ok") as (url, _):
        assert main([*BENCH, "--url", url, "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["direct (no server)"]["tokens"] > 0 and rows["direct (no server)"]["vs_c1"] is None
    assert rows["server c=1"]["vs_c1"] == 1.0


# audit 20: a server that is not this one, limits past what a session holds, the table's TTFT


@pytest.mark.parametrize("data", ["null", "5", "[1, 2]"])
def test_a_model_list_of_another_shape_is_one_line(data, capsys, no_direct_row):
    """``{"data": null}`` was a TypeError traceback (exit 1)."""
    with fake_server(f"models:{data}") as (url, _):
        assert main([*BENCH, "--url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not answer an OpenAI model list" in err[0], err


@pytest.mark.parametrize(
    "event",
    [
        "1",
        '"hello"',
        "[1, 2]",
        '{"choices": "abc"}',
        '{"choices": [{"delta": null}]}',
        '{"choices": [], "usage": {"prompt_tokens": 1}}',
        '{"choices": [], "usage": {"completion_tokens": "3"}}',
    ],
)
def test_a_stream_event_of_another_shape_fails_the_request_in_one_line(event, capsys):
    """Each was a traceback (TypeError, AttributeError, KeyError; a string token count in the sum)."""
    with fake_server(f"raw:{event}") as (url, _):
        assert main([*BENCH, "--no-direct", "--url", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("personajudge: error: ") and "not an OpenAI chat.completion.chunk" in err[-1], err


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--max-batch", "9223372036854775808"], "--max-batch must be at most 65536"),
        (["--concurrency", "99999999999999999999"], "--concurrency levels must be at most 10000"),
    ],
)
def test_limits_past_what_a_session_or_a_level_holds_are_refused_before_any_work(argv, needle, capsys, no_direct_row):
    """They were taken, the server started, and every request failed with a 500 from the engine thread."""
    assert main([*BENCH, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_serve_and_the_api_refuse_a_batch_no_session_can_hold(capsys):
    from personajudge.api import PersonaJudge

    assert main(["serve", "--backend", "toy", "--max-batch", "65537"]) == 2
    assert "--max-batch must be at most 65536, got 65537" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="max_batch must be at most 65536"):
        PersonaJudge({"backend": {"name": "toy"}}, max_batch=2**63)


def test_a_row_with_no_time_to_first_text_shows_a_dash():
    row = {
        "name": "c=1",
        "requests": 2,
        "errors": 0,
        "tokens": None,
        "requests_without_usage": 2,
        "tokens_per_s": None,
        "vs_c1": None,
        "latency_p50_s": 0.1,
        "latency_p95_s": 0.2,
        "ttft_p50_s": None,
        "ttft_p95_s": None,
    }
    rep = {"machine": "m", "server": "started", "backend": "toy", "model": "x", "method": "pj"}
    rep |= {"requests_per_level": 2, "max_tokens": 4, "rows": [row]}
    line = [x for x in serve_bench.format_table(rep).splitlines() if x.startswith("| c=1 ")][0]
    assert "None" not in line and "| 0.1 / 0.2 | - |" in line
