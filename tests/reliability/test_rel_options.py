"""Backend and method options are checked against what the library underneath can do.

llama.cpp aborts the whole process (``GGML_ASSERT``, ``std::bad_alloc``: exit 134) on some values
its own parameter checks let through; those must be refused with one line before anything loads.
The abort cases run in a subprocess, so a regression shows as exit 134 instead of killing pytest.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field

from personajudge.cli import main
from personajudge.cli.options import _parse_option
from personajudge.core.config import BackendConfig, Options, build_config, take_options
from personajudge.core.errors import ConfigError, PersonaJudgeError

TOY = ["--backend", "toy", "--max-new-tokens", "4", "--seed", "0"]


class _Demo(Options):
    n: int = Field(4, ge=1, le=10)
    flag: bool = False
    ratio: float = 0.5
    name: str | None = None


def test_take_options_fills_defaults_and_checks_types():
    assert take_options({"n": 7}, _Demo) == {"n": 7, "flag": False, "ratio": 0.5, "name": None}
    assert take_options(BackendConfig(name="demo", options={"ratio": 2}), _Demo)["ratio"] == 2.0


@pytest.mark.parametrize(
    "options, words",
    [
        ({"colour": 1, "n": 2}, "backend.options: unknown option(s) for demo: colour; known: n, flag, ratio, name"),
        ({"n": 0}, "backend.options.n: Input should be greater than or equal to 1 (got 0)"),
        ({"n": 11}, "backend.options.n: Input should be less than or equal to 10 (got 11)"),
        ({"n": "3"}, "backend.options.n: Input should be a valid integer (got '3')"),
        ({"n": True}, "backend.options.n: Input should be a valid integer (got True)"),
        ({"flag": 1}, "backend.options.flag: Input should be a valid boolean (got 1)"),
        ({"ratio": float("nan")}, "backend.options.ratio: Input should be a finite number (got nan)"),
        ({"ratio": float("inf")}, "backend.options.ratio: Input should be a finite number (got inf)"),
    ],
)
def test_take_options_errors_name_the_option_and_the_rule(options, words):
    with pytest.raises(ConfigError) as info:
        take_options(BackendConfig(name="demo", options=options), _Demo)
    assert str(info.value) == words


@pytest.mark.parametrize(
    "option, words",
    [
        ("seed=-1", "backend.options.seed: Input should be greater than or equal to 0 (got -1)"),
        ("seed=x", "backend.options.seed: Input should be a valid integer (got 'x')"),
        ("seed=1.5", "backend.options.seed: Input should be a valid integer (got 1.5)"),
        ("view_strength=NaN", "backend.options.view_strength: Input should be a finite number (got nan)"),
        ("view_strength=[1]", "backend.options.view_strength: Input should be a valid number"),
        ("colour=blue", "unknown option(s) for toy: colour"),
        ("=3", "--backend-option expects KEY=VALUE with a non-empty KEY"),
    ],
)
def test_toy_options_through_the_cli(capsys, option, words):
    code = main(["generate", "hi", *TOY, "--backend-option", option])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "method, option, words",
    [
        ("pad", 'weight="x"', "method_options.weight: Input should be a valid number (got 'x')"),
        ("pad", "weight=NaN", "method_options.weight: Input should be a finite number (got nan)"),
        ("pad", "beta=1e400", "method_options.beta: Input should be a finite number (got inf)"),
        ("pad", "k=-3", "method_options.k: Input should be greater than or equal to 1 (got -3)"),
        ("mod", "weights=[1, -1]", "method_options.weights.1: Input should be greater than or equal to 0 (got -1)"),
        ("mod", 'weights="ab"', "method_options.weights: Input should be a valid list (got 'ab')"),
    ],
)
def test_method_options_through_the_cli(capsys, method, option, words):
    code = main(
        [
            "generate",
            "hi",
            *TOY,
            "--method",
            method,
            "--prefer",
            "concise",
            "--prefer",
            "humor",
            "--method-option",
            option,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1


def test_parse_option_values():
    assert _parse_option("n_batch=64") == ("n_batch", 64)
    assert _parse_option("x= text ") == ("x", " text ")
    assert _parse_option("w=[0.5, 0.5]") == ("w", [0.5, 0.5])
    assert _parse_option("big=" + "9" * 5000) == ("big", "9" * 5000)  # past int()'s digit limit: stays text
    with pytest.raises(PersonaJudgeError, match="nested too deeply"):
        _parse_option("deep=" + "[" * 100_000 + "]" * 100_000)
    with pytest.raises(PersonaJudgeError, match="KEY=VALUE"):
        _parse_option("novalue")


def test_threads_are_bounded_for_every_backend():
    """More than ggml's 512 threads aborts llama.cpp and stalls torch: refused in the shared config."""
    with pytest.raises(ConfigError, match="backend.threads: Input should be less than or equal to 512"):
        build_config({"backend": {"threads": 100_000}})
    assert build_config({"backend": {"threads": 512}}).backend.threads == 512


def test_config_file_with_wrong_table_types_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("backend = 5\nmethod_options = 3\n")
    code = main(["generate", "hi", *TOY, "--config", str(cfg), "--backend-option", "seed=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "backend and backend.options must be tables" in err


# -- llama.cpp --------------------------------------------------------------------------------------


def _cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "personajudge", "generate", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, words",
    [
        (["--backend-option", "n_batch=2"], "n_batch=2 is smaller than the 3 KV sequences"),
        (["--backend-option", "n_batch=4294967297"], "n_batch: Input should be less than or equal to 2147483647"),
        (["--backend-option", "n_seq_max=4", "--backend-option", "n_batch=3"], "n_batch=3 is smaller than n_seq_max=4"),
        (["--backend-option", "n_seq_max=1"], "n_seq_max: Input should be greater than or equal to 2"),
        (["--backend-option", "threads_batch=100000"], "threads_batch: Input should be less than or equal to 512"),
        (["--threads", "100000"], "backend.threads: Input should be less than or equal to 512"),
        (["--n-ctx", "2147483000"], "is more than llama.cpp can address"),
        (["--backend-option", 'flash_attn="yes"'], "flash_attn: Input should be a valid boolean"),
    ],
)
def test_llama_cpp_values_that_would_abort_are_refused_before_loading(args, words):
    pytest.importorskip("llama_cpp")
    proc = _cli("hi", "--backend", "llama-cpp", "--max-new-tokens", "2", *args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr


@pytest.mark.model
def test_llama_cpp_batch_smaller_than_the_views_is_refused_not_aborted():
    """3 views need 4 sequences: n_batch=3 passed the up-front check (3 sequences at start) and used to
    end in GGML_ASSERT(n_outputs_max <= cparams.n_outputs_max), exit 134."""
    proc = _cli(
        "hi",
        "--backend",
        "llama-cpp",
        "--threads",
        "1",
        "--max-new-tokens",
        "2",
        "--backend-option",
        "n_batch=3",
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--prefer",
        "formal",
    )
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "need 4 KV sequences, more than backend.options.n_batch=3" in proc.stderr
    ok = _cli(
        "hi",
        "--backend",
        "llama-cpp",
        "--threads",
        "1",
        "--max-new-tokens",
        "2",
        "--backend-option",
        "n_batch=4",
        "--prefer",
        "concise",
        "--prefer",
        "humor",
        "--prefer",
        "formal",
        "--seed",
        "0",
    )
    assert ok.returncode == 0, ok.stderr[-2000:]


# -- a GGUF carrying a hostile chat template, end to end ----------------------------------------------

HOSTILE = (
    "{% if messages[-1]['content'] == 'loop' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
    "{% else %}{{ raise_exception('Conversation roles must alternate\n(and more)') }}{% endif %}"
)


@pytest.fixture(scope="module")
def hostile_gguf(tmp_path_factory):
    gguf = pytest.importorskip("gguf")
    pytest.importorskip("llama_cpp")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    try:
        import synthetic_gguf
    finally:
        sys.path.pop(0)
    from personajudge.backends.embedded import default_model_path

    dest = tmp_path_factory.mktemp("gguf") / "hostile.gguf"
    original = gguf.GGUFWriter.add_name

    def add_name(self, name):  # the copied metadata has no template: add ours next to the name
        original(self, name)
        self.add_string("tokenizer.chat_template", HOSTILE)

    gguf.GGUFWriter.add_name = add_name
    try:
        synthetic_gguf.write_synthetic(default_model_path(), dest, synthetic_gguf.SHAPES["tiny"])
    finally:
        gguf.GGUFWriter.add_name = original
    return dest


@pytest.mark.model
@pytest.mark.parametrize(
    "prompt, words",
    [
        ("hello", "failed: Conversation roles must alternate (and more); use --encoder plain"),
        ("loop", "cannot be used: it did not finish within 20,000 steps"),
    ],
)
def test_hostile_template_in_a_gguf_is_one_line_naming_the_file(hostile_gguf, capsys, monkeypatch, prompt, words):
    from personajudge.core import chat_template

    monkeypatch.setattr(chat_template, "MAX_STEPS", 20_000)  # stop the loop fast; the default is 2M steps
    code = main(
        [
            "generate",
            prompt,
            "--model",
            str(hostile_gguf),
            "--threads",
            "1",
            "--max-new-tokens",
            "2",
            "--encoder",
            "chat-turn",
            "--prefer",
            "concise",
            "--prefer",
            "humor",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [x for x in err.splitlines() if not x.startswith("personajudge: warning:")]
    assert len(lines) == 1 and f"the chat template of {hostile_gguf}" in lines[0] and words in lines[0]


@pytest.mark.model
def test_hostile_template_is_bypassed_with_the_plain_encoder(hostile_gguf, capsys):
    code = main(
        [
            "generate",
            "loop",
            "--model",
            str(hostile_gguf),
            "--threads",
            "1",
            "--max-new-tokens",
            "2",
            "--encoder",
            "plain",
            "--prefer",
            "concise",
            "--prefer",
            "humor",
            "--seed",
            "0",
        ]
    )
    assert code == 0, capsys.readouterr().err
