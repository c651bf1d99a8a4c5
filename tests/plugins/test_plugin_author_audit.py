"""A plugin author's mistakes, each met where the plugin's output enters the core (audit A-L).

Every plugin here is small and built for its test: through ``register_plugin`` for objects that only need to
be registered, and as a fake distribution (a ``*.dist-info`` folder with ``entry_points.txt``, which is all
importlib.metadata needs) on ``sys.path`` or ``PYTHONPATH`` where the entry-point path itself is under test.
Each mistake must be a one-line typed error or warning naming the plugin, never a traceback from the core or
a run that silently does something else.
"""

import itertools
import json
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
import warnings

import numpy as np
import pytest
from plugin_modules import hook_module, registering
from serve_helpers import running_server

import personajudge as pj
from personajudge.backends.toy import ToyBackend, ToySession, ToyTokenizer
from personajudge.core import contract
from personajudge.core.errors import PersonaJudgeWarning, PluginError, TooManyViewsError
from personajudge.engine import Engine
from personajudge.plugins import PluginWarning, manager, register_plugin, registry
from personajudge.preferences import EncoderOptions

PREFS = ["concise", "humor"]
_numbers = itertools.count()


def _plugin(**hooks):
    """A module-like plugin with the given hook implementations."""
    return hook_module("audit_plugin", **hooks)


@pytest.fixture
def registered():
    """Register plugins for one test; unregister them all after it."""
    with registering("audit_plugin") as reg:
        yield reg


def _kind_warnings(kind):
    """Build ``kind``'s registry; the PluginWarnings that gave."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        registry(kind)
    return [str(w.message) for w in seen if issubclass(w.category, PluginWarning)]


def _toy_pj(backend=None, **config):
    return pj.PersonaJudge({"backend": {"name": "toy"}, **config}, backend=backend or ToyBackend())


def _run(m, **kw):
    return m.generate("hi there", preferences=PREFS, max_new_tokens=12, seed=1, **kw)


# --- A. stop_strings must be a list of strings -------------------------------------------------------------


class StopWordEncoder:
    name = "audit-stopword"
    description = "stop_strings returns what the test sets"
    stops: object = ["user:"]

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        return "q " + conversation[-1]["content"], True

    def stop_strings(self, tokenizer, options=None):
        return type(self).stops


@pytest.mark.parametrize("stops", ["user:", [""], ["ok", 3], None])
def test_a_stop_strings_that_are_not_a_list_of_strings_are_a_plugin_error_naming_the_encoder(
    registered, monkeypatch, stops
):
    registered(register_encoders=lambda register: register(StopWordEncoder))
    monkeypatch.setattr(StopWordEncoder, "stops", stops)
    with _toy_pj() as m, pytest.raises(PluginError, match=r"encoder 'audit-stopword' \(StopWordEncoder.*stop_strings"):
        _run(m, encoder="audit-stopword")


def test_a_a_list_of_stop_strings_is_used_whole(registered):
    """The control: the same word in a list is one stop string, not five letters."""
    registered(register_encoders=lambda register: register(StopWordEncoder))
    with _toy_pj() as m:
        res = _run(m, encoder="audit-stopword")
    assert res.settings["encoder_stop"] == ["user:"] and res.settings["decoding"]["stop"] == []


# --- B. the tokenizer's eos_token_ids, checked when the backend loads ---------------------------------------


def _with_eos(eos):
    class EosTokenizer(ToyTokenizer):
        def __init__(self):
            super().__init__()
            if eos == "missing":
                del self.eos_token_ids
            else:
                self.eos_token_ids = eos

    class EosBackend(ToyBackend):
        name = "audit-eos"

        def __init__(self, config=None):
            super().__init__(pj.BackendConfig(name="toy"))
            self.tokenizer = EosTokenizer()

    return EosBackend


BAD_EOS = ["missing", None, 0, [0], frozenset({999}), frozenset({-1}), frozenset({"0"}), frozenset({True})]


@pytest.mark.parametrize("eos", BAD_EOS)
def test_b_a_wrong_eos_token_ids_is_a_plugin_error_naming_the_backend_at_load(registered, eos):
    backend_cls = _with_eos(eos)
    registered(register_backends=lambda register: register(backend_cls))
    with pytest.raises(PluginError, match=r"backend 'audit-eos' \(.*EosBackend\): tokenizer .*eos_token_ids"):
        pj.PersonaJudge({"backend": {"name": "audit-eos"}})  # load_backend
    with pytest.raises(PluginError, match=r"EosBackend\): tokenizer .*eos_token_ids"):
        pj.PersonaJudge({"backend": {"name": "toy"}}, backend=backend_cls())  # backend= object


def test_b_an_empty_eos_token_ids_is_a_warning_and_generation_runs_to_max_tokens():
    """Chosen: a warning, not an error. A model may have no end-of-text token; the run is then bounded
    only by max_new_tokens or a stop string, which the user is told once."""
    with pytest.warns(PersonaJudgeWarning, match=r"eos_token_ids is empty: generation stops only at max_new_tokens"):
        m = _toy_pj(_with_eos(frozenset())())
    with m:
        res = _run(m)
    assert res.finish_reason == "length" and len(res.tokens) == 12


# --- C. logits wider than the vocabulary ---------------------------------------------------------------------


class WideSession(ToySession):
    """Logits padded past the vocabulary with high values, as a padded output layer (never to be sampled)."""

    pad = 7
    last_raw: list = []

    def _forward_many(self, calls):
        outs = [
            np.concatenate([o, np.full((o.shape[0], self.pad), 50.0, o.dtype)], axis=1)
            for o in super()._forward_many(calls)
        ]
        WideSession.last_raw = outs
        return outs


class WideBackend(ToyBackend):
    def open(self, n_views):
        return WideSession(self, n_views)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_c_columns_past_the_vocabulary_are_never_sampled(seed):
    """The padded columns hold 50.0: sampled from, every token would be one of them. Cut off, the run is the
    toy backend's own, token for token (the first 33 columns are its logits)."""
    with _toy_pj(WideBackend()) as wide, _toy_pj() as toy:
        got = wide.generate("hi", preferences=PREFS, max_new_tokens=20, seed=seed)
        want = toy.generate("hi", preferences=PREFS, max_new_tokens=20, seed=seed)
    assert got.tokens == want.tokens
    assert max(got.tokens) < ToyTokenizer().vocab_size


def test_c_the_cut_is_a_view_of_the_backends_array():
    with WideBackend().open(1) as s:
        (out,) = s.forward_many([(0, [1, 2, 3], 2)])
    (raw,) = WideSession.last_raw
    assert out.shape == (2, 33) and raw.shape == (2, 40)
    assert np.shares_memory(out, raw) and np.array_equal(out, raw[:, :33])


def test_c_torch_logits_are_cut_as_a_view_too():
    torch = pytest.importorskip("torch")

    class TorchWide(ToySession):
        def _forward_many(self, calls):
            self.raw = [
                torch.cat([torch.from_numpy(o), torch.zeros(o.shape[0], 3)], 1) for o in super()._forward_many(calls)
            ]
            return self.raw

    s = TorchWide(ToyBackend(), 1)
    (out,) = s.forward_many([(0, [4, 5], 1)])
    assert tuple(out.shape) == (1, 33) and out.data_ptr() == s.raw[0].data_ptr()


# --- D. logits' dtype ---------------------------------------------------------------------------------------


def _dtype_session(convert):
    class DtypeSession(ToySession):
        def _forward_many(self, calls):
            return [convert(o) for o in super()._forward_many(calls)]

    return DtypeSession(ToyBackend(), 1)


@pytest.mark.parametrize("dtype", [bool, str, object, np.complex64, np.int64, np.int8])
def test_d_logits_of_a_non_floating_dtype_are_a_plugin_error_naming_the_class(dtype):
    """ints are refused, not cast: integer "logits" are token ids or an un-dequantized output by mistake."""
    s = _dtype_session(lambda o: o.astype(dtype))
    with pytest.raises(PluginError, match=r"DtypeSession\._forward_many returned logits of dtype .* floating dtype"):
        s.forward_many([(0, [1, 2], 1)])
    assert s.length(0) == 0  # the failed call left nothing behind


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_d_floating_logits_are_accepted_as_they_are(dtype):
    s = _dtype_session(lambda o: o.astype(dtype))
    (out,) = s.forward_many([(0, [1, 2], 1)])
    assert out.dtype == dtype and s.length(0) == 2


def test_d_torch_bool_logits_are_refused_and_bfloat16_accepted():
    torch = pytest.importorskip("torch")
    bad = _dtype_session(lambda o: torch.from_numpy(o) > 0)
    with pytest.raises(PluginError, match="dtype torch.bool"):
        bad.forward_many([(0, [1], 1)])
    good = _dtype_session(lambda o: torch.from_numpy(o).to(torch.bfloat16))
    (out,) = good.forward_many([(0, [1], 1)])
    assert out.dtype == torch.bfloat16


# --- E, F: entry points -------------------------------------------------------------------------------------


def install(site, dist, entry, module, code):
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[personajudge]\n{entry} = {module}\n")


BACKEND_PLUGIN = """
from personajudge import hookimpl
from personajudge.backends.toy import ToyBackend

class B(ToyBackend):
    name = "{name}"

@hookimpl
def register_backends(register):
    register(B)
"""


def _load_all():
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        manager.get_plugin_manager()
        for kind in ("backend", "encoder", "method"):
            registry(kind)
    return [str(w.message) for w in seen if issubclass(w.category, PluginWarning)]


def test_e_two_distributions_with_the_same_entry_point_name_are_both_loaded(site):
    n = next(_numbers)
    install(site, "audit-epa", "plugin", f"pj_audit_epa_{n}", BACKEND_PLUGIN.format(name="from-epa"))
    install(site, "audit-epb", "plugin", f"pj_audit_epb_{n}", BACKEND_PLUGIN.format(name="from-epb"))
    assert _load_all() == []
    backends = {r["name"]: r for r in manager.list_plugins()["backend"]}
    assert backends["from-epa"]["distribution"] == "audit-epa"
    assert backends["from-epb"]["distribution"] == "audit-epb"
    assert {backends[b]["entry_point"] for b in ("from-epa", "from-epb")} == {
        f"plugin = pj_audit_epa_{n}",
        f"plugin = pj_audit_epb_{n}",
    }
    with pj.PersonaJudge({"backend": {"name": "from-epb"}}) as m:
        assert len(_run(m).tokens) == 12


def test_f_an_installed_plugin_without_hookimpl_is_named_in_one_warning(site):
    module = f"pj_audit_nodeco_{next(_numbers)}"
    install(site, "audit-nodeco", "nodeco", module, BACKEND_PLUGIN.replace("@hookimpl\n", "").format(name="nodecob"))
    warned = _load_all()
    assert len(warned) == 1, warned
    assert "audit-nodeco 0.1, entry point 'nodeco = " in warned[0]
    assert f"module '{module}' implements no hooks: decorate its functions with @personajudge.hookimpl" in warned[0]
    # it was not left registered with no hooks, so registering it at run time says the same
    with pytest.raises(PluginError, match="implements no hooks"):
        register_plugin(sys.modules[module])


# --- G. backend and session classes with unimplemented methods ----------------------------------------------


class NoOpenBackend(pj.Backend):
    name = "audit-noopen"

    def __init__(self, config=None):
        self.tokenizer = ToyTokenizer()
        self.context_length = 64


def test_g_a_backend_without_open_is_refused_when_it_registers(registered):
    registered(register_backends=lambda register: register(NoOpenBackend))
    warned = _kind_warnings("backend")
    assert len(warned) == 1, warned
    assert "backend 'audit-noopen' (class NoOpenBackend) does not implement open" in warned[0]
    assert "audit-noopen" not in registry("backend")


class GoodSibling(ToyBackend):
    name = "audit-good-sibling"


def test_g_one_refused_backend_does_not_take_its_plugins_other_backends_with_it(registered):
    def hook(register):
        register(NoOpenBackend)
        register(GoodSibling)  # the hook goes on after the refusal

    registered(register_backends=hook)
    warned = _kind_warnings("backend")
    assert len(warned) == 1 and "audit-noopen" in warned[0] and "skipped a backend of plugin" in warned[0], warned
    assert "audit-noopen" not in registry("backend")
    assert registry("backend")["audit-good-sibling"] is GoodSibling


class NoTruncateSession(pj.Session):
    def __init__(self, backend, n_views):
        super().__init__(n_views, backend.context_length, backend.tokenizer.vocab_size)

    def _forward_many(self, calls):
        return [np.zeros((c.n_logits, 33), np.float32) for c in calls]


class NoTruncateBackend(ToyBackend):
    def open(self, n_views):
        return NoTruncateSession(self, n_views)


def test_g_a_session_without_truncate_is_a_plugin_error_naming_the_class():
    with (
        _toy_pj(NoTruncateBackend()) as m,
        pytest.raises(PluginError, match=r"session class NoTruncateSession \(module .*\) does not implement _truncate"),
    ):
        _run(m)


def test_g_a_session_overriding_the_public_methods_is_told_what_to_implement():
    """What the old module docstring (K) said a backend was: ``forward`` and ``truncate``."""

    class Public(pj.Session):
        def forward(self, view, tokens, n_logits=1):
            return np.zeros((n_logits, 5))

        def truncate(self, view, length):
            pass

    with pytest.raises(PluginError, match="does not implement _forward_many, _truncate"):
        Public(1, 100, 5)


def test_k_the_contract_module_names_the_methods_a_backend_implements():
    doc = contract.__doc__
    assert "``_forward_many`` and ``_truncate``" in doc
    assert "one\nclass with ``forward`` and ``truncate``" not in doc


# --- H. reserving what the backend can hold -----------------------------------------------------------------


class FewViewsBackend(ToyBackend):
    """Holds at most 4 views, and says so as the contract asks."""

    def __init__(self, config=None):
        super().__init__(config)
        self.opened = []

    def open(self, n_views):
        if n_views > 4:
            raise TooManyViewsError(f"holds at most 4 views, asked for {n_views}")
        self.opened.append(n_views)
        return super().open(n_views)


def test_h_reserve_falls_back_to_what_the_backend_holds_and_keeps_only_that():
    backend = FewViewsBackend()
    engine = Engine(backend, max_batch=8)
    try:
        assert engine.reserve(16) == 4
        assert engine.stats()["slots"] == 4 and backend.opened == [4]
        with pj.PersonaJudge({"backend": {"name": "toy"}}, backend=backend, max_batch=8) as m:
            res = m.generate_batch(["a", "b", "c"], preferences=PREFS, max_new_tokens=5, seed=1)
            assert [len(r.tokens) for r in res] == [5, 5, 5]
            with pytest.raises(TooManyViewsError):
                m.generate("a", views=[[p] for p in ("concise", "humor", "expert", "friendly", "vivid")])
    finally:
        engine.close()


def test_h_reserve_below_one_view_re_raises():
    class NoViews(ToyBackend):
        def open(self, n_views):
            raise TooManyViewsError("holds no views")

    engine = Engine(NoViews(), max_batch=2)
    try:
        with pytest.raises(TooManyViewsError):
            engine.reserve(4)
        assert engine.stats()["slots"] == 0
    finally:
        engine.close()


# --- I. encoder_options.stop = false, for every encoder -----------------------------------------------------


class DeclaredStopEncoder(StopWordEncoder):
    name = "audit-declared"
    Options = EncoderOptions
    stops = ["e"]


class UndeclaredStopEncoder(StopWordEncoder):
    name = "audit-undeclared"
    stops = ["e"]


@pytest.mark.parametrize("enc", [DeclaredStopEncoder, UndeclaredStopEncoder])
def test_i_stop_false_drops_a_plugin_encoders_stop_strings(registered, enc):
    registered(register_encoders=lambda register: register(enc))
    with _toy_pj() as m:
        kept = m.generate("hi there", preferences=PREFS, max_new_tokens=40, seed=1, encoder=enc.name)
        dropped = m.generate(
            "hi there", preferences=PREFS, max_new_tokens=40, seed=1, encoder=enc.name, encoder_options={"stop": False}
        )
    assert kept.settings["encoder_stop"] == ["e"] and dropped.settings["encoder_stop"] == []
    # 'e' is a common letter of the toy model: with the stop string the run ends early, without it at 40
    assert kept.finish_reason == "stop" and (dropped.finish_reason, len(dropped.tokens)) == ("length", 40)


# --- J. encoders' and methods' results ----------------------------------------------------------------------


class NoRender:
    name = "audit-norender"
    description = "no render"


def test_j_an_encoder_without_render_is_refused_when_it_registers(registered):
    registered(register_encoders=lambda register: register(NoRender))
    warned = _kind_warnings("encoder")
    assert len(warned) == 1 and "encoder 'audit-norender' has no render()" in warned[0], warned
    assert "audit-norender" not in registry("encoder")


class RenderEncoder(StopWordEncoder):
    name = "audit-render"
    out: object = None

    def render(self, view, conversation, tokenizer, *, system=None, options=None):
        return type(self).out


@pytest.mark.parametrize("out", ["prompt text", ([1, 2], True), None, ("text", 1), ["text", True], ("text",)])
def test_j_render_returning_anything_but_text_and_add_bos_is_a_plugin_error(registered, monkeypatch, out):
    monkeypatch.setattr(RenderEncoder, "out", out)
    registered(register_encoders=lambda register: register(RenderEncoder))
    with (
        _toy_pj() as m,
        pytest.raises(
            PluginError, match=r"encoder 'audit-render' \(RenderEncoder, from .*\)\.render returned .* a str and a bool"
        ),
    ):
        _run(m, encoder="audit-render")


def _method(name, plan, loop):
    return type(name, (), {"name": name, "description": "test", "plan": plan, "loop": loop})


def _yields_str(self, req):
    yield "forward please"


BAD_METHODS = [
    ("audit-empty", lambda self, views: [], lambda self, req: pj.core.decoding.plain_loop(req), "plan returned list"),
    ("audit-noneplan", lambda self, views: None, lambda self, req: None, "plan returned NoneType"),
    ("audit-noneloop", lambda self, views: [list(v) for v in views], lambda self, req: None, "loop returned NoneType"),
    ("audit-listloop", lambda self, views: [list(v) for v in views], lambda self, req: [], "loop returned list"),
    ("audit-badops", lambda self, views: [list(v) for v in views], _yields_str, "loop yielded a str"),
]


@pytest.mark.parametrize("name,plan,loop,what", BAD_METHODS, ids=[b[0] for b in BAD_METHODS])
def test_j_wrong_plan_or_loop_results_are_a_plugin_error_naming_the_method(registered, name, plan, loop, what):
    cls = _method(name, plan, loop)
    registered(register_methods=lambda register: register(cls))
    with _toy_pj() as m, pytest.raises(PluginError, match=rf"method '{name}' \({name}, from .*\)\.{what}"):
        _run(m, method=name)
    with _toy_pj() as m:  # the engine is fine afterwards
        assert len(_run(m).tokens) == 12


# --- G, H, L through `personajudge serve` ---------------------------------------------------------------------

SERVE_PLUGIN = """
import numpy as np
import personajudge as pj
from personajudge.backends.toy import ToyBackend

class FewViews(ToyBackend):
    name = "audit-fewviews"
    describe = pj.Backend.describe  # the default: no model named

    def open(self, n_views):
        if n_views > 4:
            raise pj.TooManyViewsError(f"audit-fewviews holds at most 4 views, asked for {n_views}")
        return super().open(n_views)

class NoTruncate(pj.Session):
    def _forward_many(self, calls):
        return [np.zeros((c.n_logits, 33), np.float32) for c in calls]

class NoTruncateBackend(ToyBackend):
    name = "audit-notrunc"

    def open(self, n_views):
        return NoTruncate(n_views, self.context_length, 33)

@pj.hookimpl
def register_backends(register):
    register(FewViews)
    register(NoTruncateBackend)
"""


@pytest.fixture
def serve_site(tmp_path, monkeypatch):
    pytest.importorskip("uvicorn")
    d = tmp_path / "site"
    d.mkdir()
    install(d, "audit-serve", "audit-serve", "pj_audit_serve", SERVE_PLUGIN)
    monkeypatch.setenv("PYTHONPATH", str(d))
    monkeypatch.setenv(manager.ENV_SELECT, "audit-serve")
    return d


def test_g_serve_with_a_session_that_cannot_open_fails_before_serving(serve_site):
    proc = subprocess.run(
        [sys.executable, "-m", "personajudge", "serve", "--backend", "audit-notrunc", "--prefer", "concise",
         "--prefer", "humor", "--host", "127.0.0.1", "--port", "0"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "serving" not in proc.stderr and "Traceback" not in proc.stderr
    assert "session class NoTruncate (module pj_audit_serve) does not implement _truncate" in proc.stderr


def _post(base, body):
    req = urllib.request.Request(
        base + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_h_l_serve_reserves_what_the_backend_holds_and_names_the_backend(serve_site, tmp_path):
    log = tmp_path / "serve.log"
    flags = ["--backend", "audit-fewviews", "--prefer", "concise", "--prefer", "humor", "--max-batch", "8"]
    with running_server(flags, log) as (base, _proc):
        with urllib.request.urlopen(base + "/health", timeout=5) as r:
            assert json.loads(r.read())["slots"] == 4
        msg = [{"role": "user", "content": "hi"}]
        ok, body = _post(base, {"model": "persona-judge", "messages": msg, "max_tokens": 4, "seed": 1})
        assert ok == 200 and body["usage"]["completion_tokens"] == 4, body
        five = [["concise"], ["humor"], ["expert"], ["friendly"], ["vivid"]]
        code, err = _post(base, {"model": "persona-judge", "messages": msg, "max_tokens": 4, "views": five})
        assert code == 400 and "at most 4 views" in err["error"]["message"], err
    text = log.read_text()
    assert "personajudge: serving 'persona-judge' (audit-fewviews) on http://127.0.0.1:" in text, text
    assert "holds 4 views at once, fewer than --max-batch 8" in text, text
