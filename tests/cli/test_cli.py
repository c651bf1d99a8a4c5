"""CLI behaviour: output formats and exit status 2 with one line for user mistakes."""

import json
import os
import subprocess
import sys

import pytest

from personajudge.cli import main

TOY = ["--backend", "toy"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json(capsys):
    code, out, err = run(
        [
            "generate",
            "hello",
            *TOY,
            "--prefer",
            "concise",
            "--prefer",
            "humor",
            "--seed",
            "3",
            "--max-new-tokens",
            "16",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    obj = json.loads(out)
    assert set(obj) >= {"text", "tokens", "stats"} and len(obj["tokens"]) == 16
    for key in ("drafted", "accepted", "acceptance_rate", "iterations", "tokens", "wall_time_s", "tokens_per_s"):
        assert key in obj["stats"]
    assert obj["stats"]["seed"] == 3


def test_generate_plain_text_and_stats_line(capsys):
    code, out, err = run(
        [
            "generate",
            "hello",
            *TOY,
            "--prefer",
            "concise",
            "--prefer",
            "humor",
            "--seed",
            "3",
            "--max-new-tokens",
            "16",
        ],
        capsys,
    )
    assert code == 0 and out.strip() and "tok/s" in err and "acceptance" in err


def test_config_file_with_flag_override(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('preferences = ["concise", "humor"]\n[backend]\nname = "toy"\n[decoding]\nmax_new_tokens = 9\n')
    code, out, _ = run(["generate", "hi", "--config", str(cfg), "--max-new-tokens", "7", "--json"], capsys)
    assert code == 0 and len(json.loads(out)["tokens"]) == 7


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["generate", "", *TOY], "prompt is empty"),
        (["generate", "   ", *TOY], "prompt is empty"),
        (["generate", "hi", *TOY, "--lambda", "0"], "decoding.lambda"),
        (["generate", "hi", "--backend", "nope"], "unknown backend 'nope'"),
        (["generate", "hi", *TOY, "--config", "/nonexistent/x.toml"], "config file not found"),
        (["generate", "hi", *TOY, "--top-p", "2"], "decoding.top_p"),
        (["generate", "hi", *TOY, "--method", "magic"], "unknown method 'magic'"),
        (["generate", "hi", *TOY, "--prefer", "concize"], "did you mean concise"),
        (["generate", "hi " * 50, *TOY, "--n-ctx", "64", "--prefer", "concise", "--prefer", "humor"], "context"),
        (["generate", "hi", *TOY, "--lambda", "x"], "--lambda must be an integer"),
        (["generate", "hi", *TOY, "--backend-option", "colour=blue"], "unknown option"),
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        sys.exit(main(argv))
    out, err = capsys.readouterr()
    assert e.value.code == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err


def test_unreadable_config_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[decoding\n")
    code, _, err = run(["generate", "hi", *TOY, "--config", str(bad)], capsys)
    assert code == 2 and "not valid TOML" in err


def test_plugins_listing(capsys):
    code, out, _ = run(["plugins", "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and {"backend", "encoder", "method", "preference", "scorer"} <= set(data)
    assert "toy" in [r["name"] for r in data["backend"]]
    code, out, _ = run(["plugins"], capsys)
    assert "backends:" in out and "persona-judge-base" in out


def test_console_script_runs_as_a_subprocess():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    exe = os.path.join(os.path.dirname(sys.executable), "personajudge")
    cmd = [exe] if os.path.exists(exe) else [sys.executable, "-m", "personajudge"]
    ok = subprocess.run(
        cmd
        + [
            "generate",
            "hello",
            *TOY,
            "--prefer",
            "concise",
            "--prefer",
            "humor",
            "--max-new-tokens",
            "8",
            "--seed",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["tokens"]) == 8
    bad = subprocess.run(
        cmd + ["generate", "hi", *TOY, "--lambda", "0"], capture_output=True, text=True, env=env, timeout=120
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1
