"""Every file or stream a user feeds: one line and exit 2 for bad bytes or shapes, never a traceback.

Each case is a regression test for a traceback found by probing (issue 14); the CLI runs in a
subprocess where it matters that it is the real entry point (stdin bytes, exit status).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from personajudge.cli import main
from personajudge.core.errors import ConfigError, PersonaJudgeError, PreferenceError
from personajudge.core.files import check_text, decode_utf8, read_stream, read_text
from personajudge.evaluation.dataset import read_prompts
from personajudge.evaluation.errors import DatasetError, EvalError
from personajudge.evaluation.report import write_report
from personajudge.preferences import load_file

TOY = ["--backend", "toy", "--max-new-tokens", "4", "--seed", "0"]


def one_line_error(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("personajudge: error: ") and "Traceback" not in err
    return err


# -- UTF-8 ---------------------------------------------------------------------------------------


def test_invalid_utf8_on_stdin_is_one_line_naming_the_offset():
    proc = subprocess.run(
        [sys.executable, "-m", "personajudge", "generate", "-", *TOY],
        input=b"why is \xff the sky blue",
        capture_output=True,
        timeout=120,
    )
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert err.strip().splitlines() == [
        "personajudge: error: standard input is not valid UTF-8: byte 0xff at offset 7 (line 1) invalid start "
        "byte; save it as UTF-8"
    ]


def test_valid_stdin_still_works():
    proc = subprocess.run(
        [sys.executable, "-m", "personajudge", "generate", "-", *TOY, "--json"],
        input="why is the sky blue ☀".encode(),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert json.loads(proc.stdout)["tokens"]


def test_invalid_utf8_in_a_jsonl_input_file(tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b'{"prompt": "hello"}\n{"prompt": "caf\xe9"}\n')
    assert f.read_bytes().index(b"\xe9") == 35
    err = one_line_error(capsys, ["generate", "--input", str(f), *TOY])
    assert "not valid UTF-8: byte 0xe9 at offset 35 (line 2)" in err and str(f) in err


def test_lone_surrogate_escape_in_a_jsonl_input_file(tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "caf\\udce9"}\n')
    err = one_line_error(capsys, ["generate", "--input", str(f), *TOY])
    assert f"{f}:1" in err and "lone surrogate U+DCE9" in err


def test_lone_surrogate_in_a_jsonl_id_is_refused_before_it_reaches_the_output(tmp_path, capsys):
    f = tmp_path / "in.jsonl"
    f.write_text('{"prompt": "hello", "id": "a\\ud800"}\n')
    err = one_line_error(capsys, ["generate", "--input", str(f), *TOY])
    assert '"id" is not valid Unicode' in err


@pytest.mark.parametrize("line", ['{"prompt": "x", "seed": ' + "9" * 5000 + "}", "[" * 100_000 + "]" * 100_000])
def test_json_beyond_pythons_limits_in_a_jsonl_file(tmp_path, capsys, line):
    f = tmp_path / "in.jsonl"
    f.write_text(line + "\n")
    err = one_line_error(capsys, ["generate", "--input", str(f), *TOY])
    assert f"{f}:1: not usable JSON" in err


@pytest.mark.parametrize(
    "content, words",
    [
        (b'{"prompt": "caf\xe9"}\n', "not valid UTF-8: byte 0xe9 at offset 15"),
        (b'{"prompt": "caf\\udce9"}\n', "lone surrogate U+DCE9"),
        (b'[{"prompt": "x", "id": ' + b"9" * 5000 + b"}]", "not usable JSON"),
        (b'{"prompt": "x", "id": [1]}\n', "id must be a string or a number"),
        (b"[" * 100_000 + b"]" * 100_000, "not usable JSON"),
    ],
)
def test_dataset_files(tmp_path, content, words):
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(content)
    with pytest.raises(DatasetError, match=re.escape(words)):
        read_prompts(f)


def test_dataset_with_invalid_utf8_through_eval_exits_2_before_any_model(tmp_path, capsys):
    f = tmp_path / "prompts.jsonl"
    f.write_bytes(b'{"prompt": "caf\xe9"}\n')
    err = one_line_error(
        capsys,
        [
            "eval",
            "--backend",
            "toy",
            "--dataset",
            str(f),
            "--run-dir",
            str(tmp_path / "r"),
            "--scorers",
            "length",
            "--no-progress",
        ],
    )
    assert "not valid UTF-8" in err


def test_prompt_argument_with_undecodable_bytes(capsys):
    # what Python makes of undecodable bytes in argv (surrogateescape)
    err = one_line_error(capsys, ["generate", "caf\udce9", *TOY])
    assert "the prompt is not valid Unicode" in err


def test_api_refuses_lone_surrogates_with_a_typed_error():
    from personajudge import PersonaJudge

    with PersonaJudge({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 2}}) as pj:
        with pytest.raises(ConfigError, match="lone surrogate"):
            pj.generate("caf\ud800", preferences=["concise", "humor"])
        with pytest.raises(ConfigError, match="message 1"):
            pj.generate([{"role": "user", "content": "x\udcff"}], preferences=["concise", "humor"])


def test_the_helpers(tmp_path):
    assert decode_utf8("\ufeffhé".encode(), "x", ConfigError) == "hé"  # a BOM is dropped
    with pytest.raises(ConfigError, match="offset 2"):
        decode_utf8(b"ab\x80", "x", ConfigError)
    with pytest.raises(ConfigError, match="U\\+D800 at character 1"):
        check_text("a\ud800", "the text", ConfigError)
    assert check_text("ok ☀", "x", ConfigError) == "ok ☀"
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(ConfigError, match="larger than"):
        read_text(big, "input file", ConfigError, max_bytes=1024)
    import io

    with pytest.raises(ConfigError, match="larger than"):
        read_stream(io.BytesIO(b"x" * 2048), "standard input", ConfigError, max_bytes=1024)
    assert read_stream(io.BytesIO("ç".encode()), "s", ConfigError) == "ç"


def test_a_device_is_not_read_into_memory():
    with pytest.raises(ConfigError, match="larger than 0 MiB"):
        read_text("/dev/zero", "config file", ConfigError, max_bytes=1000)


# -- preferences files ---------------------------------------------------------------------------


def test_binary_preferences_file(tmp_path, capsys):
    f = tmp_path / "prefs.json"
    f.write_bytes(b"\x00\x01\xff\xfe binary")
    err = one_line_error(capsys, ["generate", "hi", *TOY, "--preferences-file", str(f)])
    assert "preferences file" in err and "not valid UTF-8: byte 0xff at offset 2" in err


@pytest.mark.parametrize(
    "content, words",
    [
        ('[{"name": "x"}]', "'x' is no preference name (a table without a description adjusts"),
        ('[{"description": "be kind", "weight": -1}]', "weight: Input should be greater than 0 (got -1)"),
        ('[{"description": "be kind", "weight": 1e999}]', "weight: Input should be a finite number"),
        ('[{"description": 5}]', "description must be a string, got int"),
        ('[{"description": "be kind", "colour": "red"}]', "unknown key(s) colour"),
        ('["be \\ud800 kind"]', "unable to parse raw data as a unicode string"),
    ],
)
def test_preference_validation_errors_read_as_sentences(tmp_path, content, words):
    f = tmp_path / "prefs.json"
    f.write_text(content)
    with pytest.raises(PreferenceError) as info:
        load_file(f)
    msg = str(info.value)
    assert words in msg and "errors.pydantic.dev" not in msg and len(msg.splitlines()) == 1


def test_reward_model_validation_reads_as_a_sentence(capsys):
    err = one_line_error(
        capsys, ["generate", "hi", *TOY, "--method", "pad", "--method-option", 'reward_model={"threads": 0}']
    )
    assert "method_options.reward_model: threads: Input should be greater than or equal to 1 (got 0)" in err
    assert "pydantic.dev" not in err


# -- report ---------------------------------------------------------------------------------------


def test_report_leaves_a_directory_that_is_not_a_run_alone(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    for name in ("winrate.png", "scores.png", "lambda_sweep.png", "objectives_time.png", "report.md"):
        (d / name).write_bytes(b"mine")
    err = one_line_error(capsys, ["report", str(d)])
    assert "not an evaluation run directory" in err
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["winrate.png", "scores.png", "lambda_sweep.png", "objectives_time.png", "report.md"]
    )
    assert all(p.read_bytes() == b"mine" for p in d.iterdir())


@pytest.mark.parametrize(
    "record, words",
    [
        ("{}", "has no 'spec' table"),
        ('{"spec": {"methods": 3}}', "spec.methods: Input should be a valid list"),
        ("[1, 2]", "holds JSON list, not an object"),
        ("not json", "is not valid JSON"),
        (
            '{"spec": {"methods": ["prompt"], "experiments": [{"name": "e", "views": [["concise"]]}]}, "prompts": 5}',
            "'prompts' must be a list",
        ),
    ],
)
def test_report_on_a_broken_run_json(tmp_path, capsys, record, words):
    d = tmp_path / "d"
    d.mkdir()
    (d / "run.json").write_text(record)
    (d / "winrate.png").write_bytes(b"mine")
    err = one_line_error(capsys, ["report", str(d)])
    assert words in err and (d / "winrate.png").read_bytes() == b"mine"


def test_report_on_a_file(tmp_path, capsys):
    f = tmp_path / "run.json"
    f.write_text("{}")
    err = one_line_error(capsys, ["report", str(f)])
    assert "is a file, not an evaluation run directory" in err


def _toy_eval(run, *extra):
    """A two-prompt evaluation on the toy backend into ``run``."""
    argv = ["eval", "--backend", "toy", "--run-dir", str(run), "--limit", "2", "--max-new-tokens", "4"]
    argv += ["--methods", "prompt,persona-judge", "--pair", "concise,humor", "--scorers", "length"]
    return main([*argv, "--no-progress", "-q", *extra])


def test_report_removes_only_the_plots_it_wrote_itself(tmp_path):
    """A real run: the report's own stale plot goes, a file the user put there stays."""
    run = tmp_path / "run"
    assert _toy_eval(run) == 0
    report = json.loads((run / "report.json").read_text())
    assert report["plots"], "the toy run draws plots"
    ours = sorted(report["plots"].values())
    # pretend an earlier report drew a lambda-sweep plot, and the user keeps a file named like another
    report["plots"]["lambda sweep"] = "lambda_sweep.png"
    (run / "report.json").write_text(json.dumps(report))
    (run / "lambda_sweep.png").write_bytes(b"stale, ours")
    (run / "objectives_time.png").write_bytes(b"the user's")
    out = write_report(run)
    assert not (run / "lambda_sweep.png").exists()
    assert (run / "objectives_time.png").read_bytes() == b"the user's"
    assert sorted(json.loads((run / "report.json").read_text())["plots"].values()) == ours
    assert out["markdown"].exists()


def test_corrupt_rows_in_a_run_are_skipped_not_fatal(tmp_path):
    run = tmp_path / "run"
    assert _toy_eval(run, "--no-report") == 0
    good = json.loads(write_report(run, plots=False)["json"].read_text())
    with open(run / "generations.jsonl", "a") as f:
        f.write(json.dumps({"key": ["x"], "prompt_id": {"a": 1}, "experiment": [1], "method": None}) + "\n")
    with open(run / "scores.jsonl", "a") as f:
        f.write(json.dumps({"key": "k", "gen": [1], "scorer": {"x": 1}, "value": "high"}) + "\n")
    again = json.loads(write_report(run, plots=False)["json"].read_text())
    assert again["methods"] == good["methods"]


def test_eval_resume_with_a_broken_spec_is_a_sentence(tmp_path, capsys):
    d = tmp_path / "d"
    d.mkdir()
    (d / "run.json").write_text('{"spec": {"methods": [], "experiments": []}}')
    err = one_line_error(capsys, ["eval", "--resume", "--run-dir", str(d)])
    assert "holds no valid evaluation spec: spec.methods: give at least one method" in err


def test_errors_are_typed_in_the_api(tmp_path):
    with pytest.raises(EvalError):
        write_report(tmp_path / "missing")
    assert issubclass(DatasetError, PersonaJudgeError)


def test_run_rows_past_pythons_json_limits_are_skipped(tmp_path, capsys):
    from personajudge.evaluation.store import read_rows

    f = tmp_path / "generations.jsonl"
    # a row of the harness's shape (a row whose fields have other types is skipped too: store.ROW_TYPES)
    row = {"key": "a", "prompt_id": "0", "experiment": "e", "method": "m", "seed": 0, "fp": "x", "text": ""}
    f.write_text(json.dumps(row) + '\n{"key": ' + "9" * 5000 + "}\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    rows, bad = read_rows(f)
    assert rows == [row] and bad == 2
    assert "skipped 2 unreadable line(s)" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["9" * 5000, "[" * 100_000 + "]" * 100_000])
def test_scorer_option_values_past_pythons_json_limits_stay_text(value):
    from personajudge.cli.eval import parse_scorers

    (spec,) = parse_scorers("l=length", [f"l.x={value}"])
    assert spec.options["x"] == value
