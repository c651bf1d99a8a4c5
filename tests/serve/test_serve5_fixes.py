"""Serve audit 5: an empty ``--host``, bench-serve's encoder, and a request's ``"preferences": []``.

1. ``serve --host ''`` (an unset shell variable) bound every interface and said "serving on
   http://:PORT/v1"; it is refused with one line before anything is bound. Serving on an address other
   hosts can reach without an API key says so in one warning line.
2. ``bench-serve`` recorded the encoder as given (``auto``) in its report; it records the one the requests
   ran with, as ``bench`` and a run's settings do: the direct row resolves it, a server's responses say it
   (their ``persona_judge`` object), so bench-serve loads no second model to find out.
3. ``"preferences": []`` on a server with configured views (``--view``) dropped those views (one view, plain
   sampling), while ``preferences=[]`` in the Python API leaves a config's views; the server now follows
   the API. Each case through a real client on 127.0.0.1.

Never binds anything but 127.0.0.1: the non-loopback addresses are a stand-in for ``_bind``'s sockets.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

import fake_openai  # noqa: E402
from cli_lines import one_line, run_main  # noqa: E402
from serve_helpers import in_process_server, running_server  # noqa: E402

import personajudge.cli.serve as cli_serve  # noqa: E402
import personajudge.serve.bench as serve_bench  # noqa: E402
from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.toy import ToyBackend  # noqa: E402
from personajudge.core.config import build_config  # noqa: E402
from personajudge.preferences import load_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:method 'persona-judge' with a single view")

TOY = ["--backend", "toy"]
PREFS = ["concise", "humor"]
MESSAGES = [{"role": "user", "content": "Where is the ship?"}]
KW = dict(temperature=0.0, seed=1, max_new_tokens=24)
BODY = {"model": "persona-judge", "messages": MESSAGES, "temperature": 0.0, "seed": 1, "max_tokens": 24}


# ---------------------------------------------------------------- 1. --host


@pytest.fixture
def no_bind(monkeypatch):
    """``_bind`` fails the test: a refusal must come before any socket is bound."""

    def refuse(host, port):
        raise AssertionError(f"bound {host!r}:{port}")

    monkeypatch.setattr(cli_serve, "_bind", refuse)


@pytest.mark.parametrize("host", ["", " "])
def test_an_empty_host_is_refused_before_binding(host, capsys, no_bind):
    code, out, err = run_main(["serve", *TOY, "--host", host, "--port", "0"], capsys)
    one_line(code, err, "--host is empty", "--host 0.0.0.0", "--host ::")
    assert out == "" and "serving" not in err


class _Bound:
    """A listening socket as ``_bind`` returns it, at an address this test never binds."""

    def __init__(self, address: str):
        self.address = address

    def getsockname(self) -> tuple[str, int]:
        return (self.address, 8000)

    def __enter__(self) -> _Bound:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


@pytest.fixture
def serve_once(monkeypatch, capsys):
    """``personajudge serve`` in-process as if bound to ``addresses``, up to the point it would serve:
    the model loads, the lines it writes are written, and uvicorn's loop returns at once."""
    monkeypatch.delenv("PERSONAJUDGE_API_KEY", raising=False)
    monkeypatch.setattr(cli_serve, "graceful_server", lambda *a: SimpleNamespace(run=lambda sockets: None))

    def serve(addresses: list[str], *flags: str) -> str:
        monkeypatch.setattr(cli_serve, "_bind", lambda host, port: [_Bound(a) for a in addresses])
        code, out, err = run_main(["serve", *TOY, "--prefer", "concise", "--prefer", "humor", *flags], capsys)
        assert code == 0 and out == "", err
        assert "personajudge: serving 'persona-judge'" in err, err
        return err

    return serve


def test_serving_off_this_host_without_an_api_key_warns_in_one_line(serve_once):
    err = serve_once(["0.0.0.0", "::"], "--host", "0.0.0.0")
    warned = [line for line in err.splitlines() if "without --api-key" in line]
    assert len(warned) == 1 and warned[0].startswith("personajudge: warning: serving on 0.0.0.0, :: "), err
    assert "--api-key" in warned[0] and "127.0.0.1" in warned[0]
    assert err.index("without --api-key") < err.index("personajudge: serving")  # said before serving


@pytest.mark.parametrize(
    "addresses, flags",
    [(["0.0.0.0"], ["--api-key", "k"]), (["127.0.0.1", "::1"], []), (["127.0.0.2"], [])],
    ids=["api-key", "loopback", "loopback-range"],
)
def test_no_warning_with_a_key_or_on_loopback(serve_once, addresses, flags):
    assert "without --api-key" not in serve_once(addresses, *flags)


def test_off_host_reads_the_bound_addresses():
    assert cli_serve._off_host(["127.0.0.1", "127.9.9.9", "::1"]) == []
    bound = ["0.0.0.0", "::", "192.168.1.5", "fe80::1%eth0", "2001:db8::1"]
    assert cli_serve._off_host(bound) == bound


# ---------------------------------------------------------------- 2. bench-serve's encoder


def test_a_response_says_the_encoder_auto_resolved_to():
    """The server's ``persona_judge`` object carries the run's encoder, as a Python run's settings do."""
    cfg = {"backend": {"name": "toy"}, "preferences": PREFS}  # encoder: auto
    local = PersonaJudge(cfg, backend=ToyBackend())
    resolved = local.generate(MESSAGES, **KW).settings["encoder"]
    assert resolved == local.resolved_encoder(local.config) != "auto"
    with PersonaJudge(cfg, backend=ToyBackend()) as pj, in_process_server(pj) as base:
        with httpx.Client(timeout=60) as c:
            plain = c.post(base + "/v1/chat/completions", json=BODY)
            named = c.post(base + "/v1/chat/completions", json={**BODY, "encoder": "plain"})
            streamed = c.post(base + "/v1/chat/completions", json={**BODY, "stream": True})
    assert plain.status_code == 200 and named.status_code == 200, (plain.text, named.text)
    assert plain.json()["persona_judge"]["encoder"] == resolved
    assert named.json()["persona_judge"]["encoder"] == "plain"  # a request's own encoder is the one it ran
    events = [json.loads(x[6:]) for x in streamed.text.splitlines() if x.startswith("data: {")]
    assert [e["persona_judge"]["encoder"] for e in events if "persona_judge" in e] == [resolved]


BENCH = ["bench-serve", *TOY, "--prefer", "concise", "--prefer", "humor", "--requests", "1", "--max-tokens", "2"]


def test_bench_serve_records_the_encoder_the_started_server_resolved(capsys):
    resolved = PersonaJudge({"backend": {"name": "toy"}, "preferences": PREFS}, backend=ToyBackend())
    expected = resolved.resolved_encoder(resolved.config)
    code, out, err = run_main([*BENCH, "--concurrency", "1", "--no-direct", "--json"], capsys)
    assert code == 0, err
    rep = json.loads(out)
    assert rep["settings"]["encoder"] == expected != "auto"
    assert rep["rows"][0]["encoder"] == expected


def test_the_direct_row_records_what_auto_resolved_to():
    cfg = build_config({"backend": {"name": "toy"}, "preferences": PREFS})
    row = serve_bench.direct_row(cfg, 1, 2, False)
    assert row["encoder"] == PersonaJudge(cfg, backend=ToyBackend()).resolved_encoder(cfg) != "auto"
    named = build_config({"backend": {"name": "toy"}, "preferences": PREFS, "encoder": "plain"})
    assert serve_bench.direct_row(named, 1, 2, False)["encoder"] == "plain"


def test_a_server_that_does_not_say_leaves_the_encoder_unknown_not_auto(capsys):
    """``--url`` at a server whose responses name no encoder, no direct row: nothing says what ``auto``
    became, so the report says null rather than the flag's ``auto``; a named encoder is itself."""
    with fake_openai.fake_server("ok") as (url, _):
        code, out, err = run_main([*BENCH, "--url", url, "--concurrency", "1", "--no-direct", "--json"], capsys)
        assert code == 0, err
        assert json.loads(out)["settings"]["encoder"] is None
        code, out, err = run_main(
            [*BENCH, "--url", url, "--concurrency", "1", "--no-direct", "--json", "--encoder", "plain"], capsys
        )
        assert code == 0, err
        assert json.loads(out)["settings"]["encoder"] == "plain"


# ---------------------------------------------------------------- 3. "preferences": []

PREFS_TOML = """
[[preferences]]
name = "pirate"
description = "Talk like a pirate"
instruction = "Answer like a pirate, with arr and matey."
"""


def _text(resp) -> tuple[str, int]:
    assert resp.status_code == 200, resp.text
    out = resp.json()
    return out["choices"][0]["message"]["content"], out["persona_judge"]["views"]


def test_empty_preferences_leave_the_servers_views_as_in_python(tmp_path):
    """``serve --view``: ``"preferences": []`` keeps the configured views, as ``generate(preferences=[])``
    keeps a config's; ``"views": []`` drops them, as ``views=[]`` does. The views name a preferences file's
    ``pirate``, which must still resolve."""
    path = tmp_path / "prefs.toml"
    path.write_text(PREFS_TOML)
    (pirate,) = load_file(str(path))
    table = {"name": pirate.name, "description": pirate.description, "instruction": pirate.instruction}
    views = [["pirate", "concise"], ["humor"]]
    flags = [*TOY, "--encoder", "plain", "--preferences-file", str(path)]
    flags += [f"--view={','.join(v)}" for v in views]
    cfg = {"backend": {"name": "toy"}, "encoder": "plain", "views": [[table, "concise"], ["humor"]]}
    with PersonaJudge(cfg, backend=ToyBackend()) as local:
        kept = local.generate(MESSAGES, preferences=[], **KW)
        dropped = local.generate(MESSAGES, views=[], **KW)
    assert len(kept.settings["views"]) == 2 and dropped.settings["views"] == [[]]
    with running_server(flags, tmp_path / "server.log") as (base, _):
        with httpx.Client(timeout=60) as c:
            bare = c.post(base + "/v1/chat/completions", json=BODY)
            empty = c.post(base + "/v1/chat/completions", json={**BODY, "preferences": []})
            no_views = c.post(base + "/v1/chat/completions", json={**BODY, "views": []})
    assert _text(empty) == _text(bare) == (kept.text, 2)
    assert _text(no_views) == (dropped.text, 1)
    assert kept.text != dropped.text  # the two cases are told apart


def test_empty_preferences_drop_the_servers_default_preferences_as_in_python():
    """``serve --prefer concise --prefer humor``: ``"preferences": []`` is no preferences (one view), as
    ``generate(preferences=[])`` is on a config with those preferences."""
    with PersonaJudge(
        {"backend": {"name": "toy"}, "encoder": "plain", "preferences": PREFS}, backend=ToyBackend()
    ) as local:
        expected = local.generate(MESSAGES, preferences=[], **KW)
    assert expected.settings["views"] == [[]]
    served = PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=ToyBackend())
    with served, in_process_server(served, default_preferences=PREFS) as base:
        with httpx.Client(timeout=60) as c:
            empty = c.post(base + "/v1/chat/completions", json={**BODY, "preferences": []})
            bare = c.post(base + "/v1/chat/completions", json=BODY)
    assert _text(empty) == (expected.text, 1)
    assert _text(bare)[1] == 2  # the defaults, for a request that sends neither field


# ---------------------------------------------------------------- defaults that cannot fit (an audit of the hf flow)


def test_defaults_that_leave_no_room_are_named_in_a_warning_before_serving(serve_once):
    """``serve --prefer ... --n-ctx`` too small for the default views' instructions said "serving" and then
    refused every request that used the defaults; the start-up now says so, and still serves (a request
    with lighter preferences runs)."""
    err = serve_once(["127.0.0.1"], "--n-ctx", "16")
    warned = [line for line in err.splitlines() if "the default preferences' views are" in line]
    assert len(warned) == 1, err
    assert "tokens for the question 'Hi?', and the model's context holds 16" in warned[0]
    assert err.index(warned[0]) < err.index("personajudge: serving")
    assert "the default preferences' views are" not in serve_once(["127.0.0.1"])  # control: they fit


def test_view_lengths_are_the_prompt_tokens_generate_uses():
    with PersonaJudge({"backend": {"name": "toy"}}) as pj:
        for prefs in (PREFS, ["concise"], ["a preference in plain words"]):
            assert (
                pj.view_lengths("Where is the ship?", preferences=prefs)
                == pj.generate("Where is the ship?", preferences=prefs, max_new_tokens=2).stats.prompt_tokens
            )


def test_a_too_long_prompt_over_http_gives_the_requests_words_not_flags():
    """The 400 for a view too long named ``--show-prompt`` (no request option) and ``--encoder plain``."""
    with PersonaJudge({"backend": {"name": "toy", "n_ctx": 40}, "encoder": "exemplar"}) as pj:
        with in_process_server(pj) as base:
            body = {**BODY, "preferences": PREFS, "messages": [{"role": "user", "content": "Hi?"}]}
            r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "--show-prompt" not in err["message"], err
    assert '"encoder": "plain" or "encoder": "instruction"' in err["message"], err
    assert "--encoder" not in err["message"] and "(the server's --n-ctx)" in err["message"], err
