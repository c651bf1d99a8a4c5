"""Plugins: a backend defined here registers through the public hook and runs."""

import numpy as np
import pytest

from personajudge.api import PersonaJudge
from personajudge.cli import main
from personajudge.core.config import BackendConfig
from personajudge.core.contract import Backend, Session
from personajudge.core.errors import UnknownPluginError
from personajudge.plugins import PluginWarning, hookimpl, register_plugin, registry, unregister_plugin


class CycleTokenizer:
    """Tokens are the letters a..e (ids 1..5); 0 is EOS."""

    vocab_size = 6
    eos_token_ids = frozenset({0})
    chat_template = None

    def encode(self, text, *, add_bos=True):
        return [1 + (ord(c) % 5) for c in text]

    def decode(self, ids):
        return "".join("abcde"[i - 1] for i in ids if i)

    def apply_chat_template(self, messages, *, add_generation_prompt=True):
        raise NotImplementedError("no chat template")


class CycleSession(Session):
    """The next token is always (last + 1) mod 5, with certainty."""

    def __init__(self, n_views, context_length):
        super().__init__(n_views, context_length, vocab_size=6)
        self.ctx = [[] for _ in range(n_views)]
        self.calls = []

    def _forward_many(self, calls):
        self.calls.append(len(calls))
        out = []
        for view, tokens, n_logits in calls:
            self.ctx[view].extend(tokens)
            rows = []
            for end in range(len(self.ctx[view]) - n_logits, len(self.ctx[view])):
                logits = np.full(6, -30.0)
                logits[1 + self.ctx[view][end] % 5] = 0.0
                rows.append(logits)
            out.append(np.stack(rows) if rows else np.empty((0, 6)))
        return out

    def _truncate(self, view, length):
        del self.ctx[view][length:]


class CycleBackend(Backend):
    name = "test-cycle"
    description = "a backend defined inside the tests"

    def __init__(self, config: BackendConfig):
        self.tokenizer = CycleTokenizer()
        self.context_length = config.n_ctx or 512
        self.sessions = []

    def open(self, n_views):
        s = CycleSession(n_views, self.context_length)
        self.sessions.append(s)
        return s


class TestPlugin:
    @hookimpl
    def register_backends(self, register):
        register(CycleBackend)


@pytest.fixture
def plugin():
    p = TestPlugin()
    register_plugin(p, name="test-plugin")
    yield p
    unregister_plugin(p)


def test_registered_backend_is_listed_and_used_by_generate(plugin):
    assert "test-cycle" in registry("backend").names()
    assert registry("backend").origin("test-cycle") == "test-plugin"
    pj = PersonaJudge({"backend": {"name": "test-cycle", "n_ctx": 4096}})  # room for the exemplar views
    res = pj.generate("abc", preferences=["concise", "humor"], max_new_tokens=12, seed=0)
    assert isinstance(pj.backend, CycleBackend)
    # both views agree with certainty: every draft is accepted, and the text cycles
    assert res.stats.acceptance_rate == 1.0
    assert len(res.text) == 12 and all(
        res.text[i + 1] == "abcde"[("abcde".index(res.text[i]) + 1) % 5] for i in range(11)
    )
    assert max(pj.backend.sessions[-1].calls) == 2  # the two views were batched into one call


def test_registered_backend_is_usable_from_the_cli(plugin, capsys):
    assert (
        main(["generate", "abc", "--backend", "test-cycle", "--prefer", "concise", "--max-new-tokens", "5", "--json"])
        == 0
    )
    import json

    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 5 and out["stats"]["method"] == "persona-judge"


def test_settings_a_backend_does_not_read_are_named_in_one_warning(plugin, capsys):
    """``--device cuda`` given to llama.cpp or the toy runs, but says it was ignored (``config_fields``)."""
    import warnings

    from personajudge.core.errors import PersonaJudgeWarning
    from personajudge.plugins import load_backend

    with pytest.warns(PersonaJudgeWarning) as caught:
        load_backend(BackendConfig(name="toy", device="cuda:3", dtype="float16", n_ctx=256))
    assert len(caught) == 1
    assert str(caught[0].message) == (
        "the toy backend does not use backend.device='cuda:3', backend.dtype='float16': ignored"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", PersonaJudgeWarning)
        load_backend(BackendConfig(name="toy", n_ctx=256))  # what it reads: no warning
        load_backend(BackendConfig(name="test-cycle", device="cuda", threads=3))  # no config_fields: reads all
    code = main(
        ["generate", "hi", "--backend", "toy", "-q", "--prefer", "concise", "--prefer", "humor"]
        + ["--max-new-tokens", "3", "--threads", "2"]
    )
    err = capsys.readouterr().err
    assert code == 0 and err.strip() == "personajudge: warning: the toy backend does not use backend.threads=2: ignored"


def test_unknown_names_list_the_registered_ones():
    with pytest.raises(UnknownPluginError) as e:
        registry("backend").get("nope")
    assert "unknown backend 'nope'" in str(e.value) and "toy" in str(e.value)
    with pytest.raises(UnknownPluginError, match="persona-judge-base"):
        registry("method").get("persona_judge")


def test_a_colliding_name_is_skipped_with_a_warning_and_the_builtin_kept():
    class Dup:
        @hookimpl
        def register_backends(self, register):
            class Toy2(CycleBackend):
                name = "toy"

            register(Toy2)

    d = Dup()
    register_plugin(d, name="dup")
    try:
        with pytest.warns(
            PluginWarning, match="skipped backend 'toy' of plugin 'dup' .*already registered by persona-judge"
        ):
            reg = registry("backend")
        assert reg.get("toy").__module__ == "personajudge.backends.toy"  # the built-in won
        assert reg.origin("toy") == "personajudge.plugins.builtins"
    finally:
        unregister_plugin(d)
    assert "toy" in registry("backend").names()


def test_builtins_register_through_the_same_hooks():
    from personajudge.plugins.manager import get_plugin_manager

    pm = get_plugin_manager()
    impls = {pm.get_name(i.plugin) for i in pm.hook.register_backends.get_hookimpls()}
    assert "personajudge.plugins.builtins" in impls
    assert {"persona-judge", "persona-judge-base", "prompt", "base", "reference"} <= set(registry("method").names())
    assert {"chat-turn", "system", "plain", "instruction"} <= set(registry("encoder").names())


def test_core_imports_neither_torch_nor_llama_cpp():
    import subprocess
    import sys

    code = (
        "import sys, personajudge.core, personajudge.plugins.manager as m; m.list_plugins(); "
        "print(sorted(x for x in ('torch', 'llama_cpp', 'transformers') if x in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
