"""Probe 15: bad input the CLI and the API still handled without their promised one line / typed error.

1. A seed past the largest one (2**64 - 1) in a ``generate --input`` batch: a line's own ``"seed"``
   passed ``read_records`` (which promises every line is checked before the model loads, its error
   naming ``file:line``) and failed after the model loaded as ``seeds[0]: ...``; ``--seed MAX`` with a
   second row (seed + 1) failed the same way as ``seeds[1]``, a name the user never wrote (``eval`` and
   ``bench`` refuse the same overflow up front, naming ``--seed``). In the API, ``generate_batch`` on a
   config seeded with the largest seed ran row 1 with seed 2**64 and reported it: a seed no call accepts.
2. ``personajudge report DIR`` where ``generations.jsonl`` or ``scores.jsonl`` is a directory: an
   ``IsADirectoryError`` traceback and exit 1 (``eval`` refuses the same directory in one line).
3. ``generate PROMPT --replicas 0`` (or ``--cpus-per-replica`` / ``--gpus-per-replica``, any value) ran
   and ignored the flag without a word; with ``--input`` the same flags are refused ("needs --ray").
4. ``serve --backend toy --max-batch 99999999999999999999`` (or 10**12): an ``OverflowError`` /
   ``MemoryError`` traceback and exit 1 from sizing the toy session; llama.cpp's backend says it holds
   fewer views and the server starts.
5. A config file's ``decoding = [1]`` next to ``--max-new-tokens 3`` said ``invalid --max-new-tokens:
   decoding.max_new_tokens: parent is not a table``: the flag is blamed for the file's mistake, which
   ``_name_flags`` promises not to do.
6. ``report`` of a run whose rows file is a symbolic link to ``/dev/zero`` read without end (the other
   readers stop at 256 MiB): now every reader reads through ``core.files.read_bytes``.
7. A path holding a NUL byte was a bare ``ValueError`` from ``open`` in ``load_config_file`` and
   ``preferences.load_file``.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from cli_lines import one_line, run_main
from refuse import refuse_calls

import personajudge.cli.generate as cli_generate
from personajudge.api import PersonaJudge
from personajudge.core.errors import ConfigError, PersonaJudgeError
from personajudge.evaluation.report import write_report

TOY = ["--backend", "toy", "--max-new-tokens", "3", "-q"]
LARGEST_SEED = 2**64 - 1

pytestmark = pytest.mark.filterwarnings("ignore:method 'persona-judge' with a single view")


@pytest.fixture
def no_model(monkeypatch):
    """``generate`` must refuse before it loads a model: constructing one fails the test."""

    refuse_calls(monkeypatch, cli_generate, "PersonaJudge", "the model was loaded before the mistake was reported")


def _jsonl(path: Path, *rows: dict) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# -- 1. seeds past the largest -----------------------------------------------------------------


def test_a_lines_seed_past_the_largest_is_refused_naming_its_line_before_the_model(tmp_path, capsys, no_model):
    src = _jsonl(tmp_path / "in.jsonl", {"prompt": "a", "seed": LARGEST_SEED + 1})
    code, out, err = run_main(["generate", *TOY, "--input", src, "--output", str(tmp_path / "out.jsonl")], capsys)
    one_line(code, err, f"{src}:1", '"seed"')


def test_seed_flag_whose_row_seeds_pass_the_largest_is_refused_naming_the_flag(tmp_path, capsys, no_model):
    src = _jsonl(tmp_path / "in.jsonl", {"prompt": "a"}, {"prompt": "b"})
    argv = ["generate", *TOY, "--seed", str(LARGEST_SEED), "--input", src, "--output", str(tmp_path / "out.jsonl")]
    code, out, err = run_main(argv, capsys)
    one_line(code, err, "--seed", 'give the rows their own "seed"')
    assert "seeds[1]" not in err and "seeds=" not in err, err  # the API's keyword: the command line has none


def test_generate_batch_never_runs_a_row_with_a_seed_past_the_largest():
    cfg = {"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 2, "seed": LARGEST_SEED}}
    with PersonaJudge(cfg) as pj:
        try:
            results = pj.generate_batch(["a", "b"])
        except ConfigError:
            return  # refused, as eval and bench refuse --seed MAX with a second sample
        seeds = [r.stats.seed for r in results]
        assert all(0 <= s <= LARGEST_SEED for s in seeds), seeds
        for prompt, r in zip(["a", "b"], results):  # each reported seed repeats its row
            assert pj.generate(prompt, seed=r.stats.seed).text == r.text


# -- 2. report: a rows file that is a directory -------------------------------------------------


@pytest.fixture
def run_dir(tmp_path, capsys) -> Path:
    """A small finished evaluation run on the toy backend."""
    ds = _jsonl(tmp_path / "ds.jsonl", {"prompt": "Why is the sky blue?"})
    d = tmp_path / "run"
    argv = [
        "eval",
        *TOY[:-1],
        "--dataset",
        ds,
        "--run-dir",
        str(d),
        "--methods",
        "base",
        "--baseline",
        "none",
        "--pair",
        "concise,humor",
        "--scorers",
        "length",
        "--no-report",
        "--no-progress",
        "-q",
    ]
    code, out, err = run_main(argv, capsys)
    assert code == 0, err
    return d


@pytest.mark.parametrize("name", ["generations.jsonl", "scores.jsonl"])
def test_report_of_a_run_whose_rows_file_is_a_directory_is_one_line(run_dir, capsys, name):
    (run_dir / name).unlink()
    (run_dir / name).mkdir()
    code, out, err = run_main(["report", "--no-plots", str(run_dir)], capsys)
    one_line(code, err, name)
    with pytest.raises(PersonaJudgeError):
        write_report(run_dir, plots=False)


# -- 3. replica flags without --input -----------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value",
    [("--replicas", "0"), ("--replicas", "2"), ("--cpus-per-replica", "2"), ("--gpus-per-replica", "nan")],
)
def test_replica_flags_on_one_prompt_are_refused_not_ignored(capsys, no_model, flag, value):
    code, out, err = run_main(["generate", *TOY, flag, value, "hi"], capsys)
    one_line(code, err, flag)


# -- 4. serve: a --max-batch the toy backend cannot size -----------------------------------------


@pytest.mark.parametrize("max_batch", [str(10**20), str(10**12)])
def test_serve_with_a_huge_max_batch_on_toy_is_no_traceback(monkeypatch, capsys, max_batch):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("prometheus_client")
    import personajudge.cli.serve as cli_serve

    monkeypatch.delenv("PERSONAJUDGE_API_KEY", raising=False)
    # up to the point it would serve: uvicorn's loop returns at once
    monkeypatch.setattr(cli_serve, "graceful_server", lambda *a: SimpleNamespace(run=lambda sockets: None))
    argv = ["serve", "--backend", "toy", "--port", "0", "--max-batch", max_batch]
    argv += ["--prefer", "concise", "--prefer", "humor"]
    code, out, err = run_main(argv, capsys)  # an OverflowError / MemoryError escaping main fails here
    if code == 2:
        one_line(code, err, "--max-batch")
    else:
        assert code == 0 and "Traceback" not in err, err


# -- 5. a config file's non-table blamed on the flag that sets a field inside it --------------------


def test_a_config_files_non_table_section_is_not_blamed_on_a_flag(tmp_path, capsys, no_model):
    config = tmp_path / "run.toml"
    config.write_text('decoding = [1]\n[backend]\nname = "toy"\n', encoding="utf-8")
    code, out, err = run_main(["generate", "--config", str(config), "--max-new-tokens", "3", "hi"], capsys)
    one_line(code, err, "decoding")
    assert "invalid --max-new-tokens" not in err, err  # the file's `decoding` is the mistake, not the flag


@pytest.mark.parametrize("n_views", [2**16 + 1, 10**20])
def test_a_session_past_the_most_views_is_too_many_views_before_any_is_allocated(n_views):
    """The contract's cap: the error the engine sizes down on (``Engine.reserve`` halves), raised before a
    backend allocates per-view state (the toy's lists were an ``OverflowError`` / ``MemoryError``)."""
    from personajudge.backends.toy import ToyBackend
    from personajudge.core.contract import MAX_SESSION_VIEWS
    from personajudge.core.errors import TooManyViewsError
    from personajudge.engine import Engine

    backend = ToyBackend()
    with pytest.raises(TooManyViewsError, match=f"at most {MAX_SESSION_VIEWS} views"):
        backend.open(n_views)
    engine = Engine(backend)
    try:
        assert engine.reserve(n_views) <= MAX_SESSION_VIEWS
    finally:
        engine.close()


def test_report_of_a_rows_file_that_never_ends_is_refused_not_read_into_memory(run_dir, capsys):
    (run_dir / "scores.jsonl").unlink()
    (run_dir / "scores.jsonl").symlink_to("/dev/zero")
    code, out, err = run_main(["report", "--no-plots", str(run_dir)], capsys)
    one_line(code, err, "larger than")


def test_a_path_with_a_nul_byte_is_the_readers_typed_error_not_a_bare_value_error():
    from personajudge.core.config import load_config_file
    from personajudge.core.errors import PreferenceError
    from personajudge.preferences import load_file

    with pytest.raises(ConfigError, match="NUL byte"):
        load_config_file("run\x00.toml")
    with pytest.raises(PreferenceError, match="NUL byte"):
        load_file("prefs\x00.toml")
