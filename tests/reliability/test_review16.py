"""Two refusals from the "noticed" list: a config path that is no path, and an unbounded bench-serve.

- ``load_config_file(None)`` (or any ``check_path`` caller given a non-path) raised ``os.fspath``'s
  bare ``TypeError``; the API promises a typed error.
- ``bench-serve --requests`` had no upper bound: a load test must be bounded, and the server's queue
  default grows with it (``max(64, --requests)``).
"""

from __future__ import annotations

import pytest
from cli_lines import one_line, run_main
from refuse import refuse_calls

from personajudge.core.config import load_config_file
from personajudge.core.errors import ConfigError
from personajudge.core.files import check_path


@pytest.mark.parametrize("value", [None, 3, 2.5, object()], ids=["None", "int", "float", "object"])
def test_a_config_path_that_is_no_path_is_a_config_error(value):
    with pytest.raises(ConfigError, match=r"^config file: expected a path \(str or os.PathLike\), got "):
        load_config_file(value)


def test_check_path_names_the_thing_and_the_type():
    with pytest.raises(ConfigError) as caught:
        check_path(None, "preferences file", ConfigError)
    assert str(caught.value) == "preferences file: expected a path (str or os.PathLike), got NoneType"
    assert check_path("a/b.toml", "config file", ConfigError) == "a/b.toml"  # a path still passes through


@pytest.fixture
def no_bench_serve_run(monkeypatch):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    import personajudge.cli.serve as serve_cli

    refuse_calls(monkeypatch, serve_cli, "run_bench_serve", "bench-serve ran before the bad input was refused")
    return serve_cli


def test_bench_serve_requests_past_the_bound_is_one_line(no_bench_serve_run, capsys):
    cap = no_bench_serve_run.BENCH_MAX_REQUESTS
    argv = ["bench-serve", "--backend", "toy", "--requests", str(cap + 1)]
    one_line(*run_main(argv, capsys)[::2], f"--requests must be at most {cap}", f"got {cap + 1}")


def test_bench_serve_requests_at_the_bound_is_taken(no_bench_serve_run, capsys):
    """The bound itself passes the check: the run is reached (and refused here by the fixture)."""
    cap = no_bench_serve_run.BENCH_MAX_REQUESTS
    with pytest.raises(AssertionError, match="bench-serve ran"):
        run_main(["bench-serve", "--backend", "toy", "--requests", str(cap), "--no-direct"], capsys)
