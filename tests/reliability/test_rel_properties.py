"""Property-based tests for every parser a user feeds (hypothesis; profile "ci" in tests/conftest.py).

For any input the outcome is a result or the project's typed error (a PersonaJudgeError subclass),
never another exception: that is what lets the CLI promise one line and exit 2 for every mistake.
Strategies mix arbitrary bytes with structured-but-wrong values (right shapes, wrong types,
NaN, huge integers, lone surrogates, deep nesting), which is where the tracebacks were.

The server's request bodies get the same treatment once the server exists (the serving work).
"""

from __future__ import annotations

import json
import math

import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st

from personajudge.batch import read_records  # noqa: E402
from personajudge.cli import build_parser  # noqa: E402
from personajudge.cli.options import _parse_option, config_from_args  # noqa: E402
from personajudge.core.config import RunConfig, build_config, load_config_file, take_options  # noqa: E402
from personajudge.core.errors import PersonaJudgeError  # noqa: E402
from personajudge.evaluation.dataset import read_prompts  # noqa: E402
from personajudge.preferences import Preference, load_file  # noqa: E402

# -- strategies ----------------------------------------------------------------------------------

#: text including lone surrogates (what undecodable input or a "\ud800" JSON escape becomes)
any_text = st.text(st.characters(), max_size=40)
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=10**20, max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | any_text
)
json_values = st.recursive(
    scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(any_text, c, max_size=4), max_leaves=12
)


def dumps(value) -> str:
    """JSON text as a user's file would hold it (NaN/Infinity included, surrogates as escapes)."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True)


KEYS = [
    "prompt",
    "id",
    "seed",
    "role",
    "content",
    "name",
    "description",
    "instruction",
    "weight",
    "examples",
    "backend",
    "options",
    "decoding",
    "top_k",
    "temperature",
    "method",
    "preferences",
    "views",
    "system",
]


def near_miss(depth: int = 2):
    """Objects with the right keys and arbitrary values: what a typo'd file looks like."""
    return st.dictionaries(st.sampled_from(KEYS) | any_text, json_values, max_size=5)


file_bytes = st.binary(max_size=200) | st.sampled_from([b"\xff\xfe", b"\xef\xbb\xbf{}", b"[" * 5000, b"\x00" * 10])


def typed(fn, *args, **kwargs):
    """Run ``fn``: a result, or a PersonaJudgeError -- anything else fails the property."""
    try:
        return fn(*args, **kwargs)
    except PersonaJudgeError as err:
        assert str(err).strip(), "a typed error needs a message"
        return err


# -- CLI values ------------------------------------------------------------------------------------


@given(item=any_text)
def test_key_value_options(item):
    out = typed(_parse_option, item)
    if not isinstance(out, PersonaJudgeError):
        key, _ = out
        assert key and "=" in item


NUMERIC_FLAGS = [
    "--threads",
    "--n-ctx",
    "--n-gpu-layers",
    "--lambda",
    "--temperature",
    "--top-k",
    "--top-p",
    "--max-new-tokens",
    "--seed",
]


@given(
    flag=st.sampled_from(NUMERIC_FLAGS),
    value=any_text | st.integers().map(str) | st.floats().map(repr),
    options=st.lists(st.tuples(st.sampled_from(["seed", "view_strength", "n_batch", "x"]), any_text), max_size=3),
)
def test_numeric_flags_and_backend_options(flag, value, options):
    argv = ["generate", "hi", "--backend", "toy", f"{flag}={value}"]
    for k, v in options:
        argv += ["--backend-option", f"{k}={v}"]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # argparse's own refusal: one line, status 2
        assert exit_.code == 2
        return
    out = typed(config_from_args, args)
    if not isinstance(out, PersonaJudgeError):
        cfg, _ = out
        assert isinstance(cfg, RunConfig)
        from personajudge.backends.toy import ToyOptions

        typed(take_options, cfg.backend, ToyOptions)


@given(
    options=st.dictionaries(
        st.sampled_from(
            [
                "n_batch",
                "n_ubatch",
                "n_seq_max",
                "kv_unified",
                "flash_attn",
                "threads_batch",
                "use_mmap",
                "verbose",
                "device_map",
                "attn_implementation",
                "trust_remote_code",
                "gguf_file",
                "revision",
                "cpu_prepack",
                "adapter",
                "seed",
                "view_strength",
            ]
        ),
        json_values,
        max_size=4,
    )
)
def test_backend_option_models(options):
    from personajudge.backends.hf import HFOptions
    from personajudge.backends.llama_cpp import LlamaCppOptions
    from personajudge.backends.toy import ToyOptions

    for spec in (LlamaCppOptions, HFOptions, ToyOptions):
        out = typed(take_options, options, spec)
        if isinstance(out, dict):
            assert set(out) == set(spec.model_fields)
            assert all(not (isinstance(v, float) and not math.isfinite(v)) for v in out.values())


# -- the TOML config ---------------------------------------------------------------------------------


@given(
    data=near_miss() | st.dictionaries(any_text, json_values, max_size=4),
    overrides=st.dictionaries(
        st.sampled_from(
            [
                "backend.name",
                "decoding.top_k",
                "decoding.lambda",
                "method",
                "backend.options.x",
                "views",
                "decoding.stop",
            ]
        ),
        json_values,
        max_size=3,
    ),
)
def test_build_config(data, overrides):
    out = typed(build_config, data, **overrides)
    assert isinstance(out, (RunConfig, PersonaJudgeError))


@given(
    content=file_bytes
    | any_text.map(lambda t: t.encode("utf-8", "surrogatepass"))
    | st.sampled_from([b"a = " + b"[" * 3000 + b"]" * 3000, b"[backend]\nthreads = 99999999999999999999"])
)
def test_load_config_file(tmp_path, content):
    f = tmp_path / "c.toml"
    f.write_bytes(content)
    out = typed(load_config_file, f)
    if isinstance(out, dict):
        typed(build_config, out)


# -- preference files ----------------------------------------------------------------------------------


@given(
    suffix=st.sampled_from([".json", ".toml", ".yaml"]),
    content=file_bytes | st.lists(st.one_of(any_text, near_miss()), max_size=4).map(lambda v: dumps(v).encode()),
)
def test_preference_files(tmp_path, suffix, content):
    pytest.importorskip("yaml")
    f = tmp_path / f"prefs{suffix}"
    if suffix == ".toml" and content[:1] == b"[":  # the same entries as TOML tables
        try:
            items = json.loads(content)
        except (ValueError, RecursionError):
            items = []
        content = b"".join(
            b"[[preferences]]\n"
            + b"".join(
                f"{k} = {json.dumps(v)}\n".encode("utf-8", "surrogatepass")
                for k, v in item.items()
                if isinstance(k, str)
                and k.isidentifier()
                and isinstance(v, (str, int, float))
                and not isinstance(v, bool)
            )
            for item in items
            if isinstance(item, dict)
        )
    f.write_bytes(content)
    out = typed(load_file, f)
    if isinstance(out, list):
        assert out and all(isinstance(p, Preference) for p in out)


# -- JSONL input and eval datasets ---------------------------------------------------------------------

messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "x"]), "content": any_text | json_values}
    ),
    max_size=3,
)
records = st.fixed_dictionaries(
    {"prompt": any_text | messages | json_values}, optional={"id": json_values, "seed": json_values}
)
lines = st.lists(records | near_miss() | json_values, min_size=0, max_size=4).map(
    lambda rs: "\n".join(dumps(r) for r in rs).encode()
)


@given(content=lines | file_bytes | st.sampled_from([b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}"]))
def test_jsonl_input_records(tmp_path, content):
    f = tmp_path / "in.jsonl"
    f.write_bytes(content)
    out = typed(read_records, f)
    if isinstance(out, list):
        assert out
        for r in out:  # what was accepted can be written back out and tokenized
            json.dumps(r.prompt, ensure_ascii=False).encode("utf-8")
            str(r.id).encode("utf-8")


@given(
    content=lines | file_bytes | st.lists(records, max_size=3).map(lambda v: dumps(v).encode()),
    suffix=st.sampled_from([".jsonl", ".json"]),
)
def test_eval_datasets(tmp_path, content, suffix):
    f = tmp_path / f"prompts{suffix}"
    f.write_bytes(content)
    out = typed(read_prompts, f)
    if isinstance(out, list):
        assert out and len({p.id for p in out}) == len(out)
        for p in out:
            assert p.sha and p.prompt.strip()


# -- chat templates -----------------------------------------------------------------------------------------

SNIPPETS = [
    "{{ messages[0].content }}",
    "{% for m in messages %}",
    "{% endfor %}",
    "{{ m.role }}",
    "{% if x %}",
    "{% endif %}",
    "{{ 'a' * 3 }}",
    "{{ raise_exception('no') }}",
    "{{ x|join(',') }}",
    "{% set x = [1, 2] %}",
    "{{ x ~ x }}",
    "{{ range(5)|list }}",
    "{{ (x|length) ** 3 }}",
    "{{ '%5d' % 3 }}",
    "{{ loop.index }}",
    "{% macro f(n) %}{{ n }}{% endmacro %}",
    "{{ f(2) }}",
    "{{ x.__class__ }}",
    "{{ 1 / 0 }}",
    "plain text",
]


@given(source=st.lists(st.sampled_from(SNIPPETS), max_size=8).map("".join) | any_text)
def test_any_chat_template_renders_or_fails_typed(source):
    pytest.importorskip("jinja2")
    from personajudge.core.chat_template import ChatTemplate

    def run():
        return ChatTemplate(source, "m.gguf").render(
            messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True, max_steps=50_000
        )

    out = typed(run)
    assert isinstance(out, (str, PersonaJudgeError))
