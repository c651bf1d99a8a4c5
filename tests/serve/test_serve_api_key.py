"""An API key no client can send is refused at start-up, in one line that does not show it.

A key reaches the server in ``Authorization: Bearer <key>``: no header carries a line break, Starlette
reads header bytes as Latin-1 (a non-ASCII key never compares equal), and the token is compared
stripped. Before, ``serve --api-key $'x\\ny'`` (or such a ``PERSONAJUDGE_API_KEY``) started a server
that answered every request 401. A printable key with inner punctuation still works, through a real
client on 127.0.0.1.
"""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")

from cli_lines import one_line, run_main  # noqa: E402
from refuse import refuse_calls  # noqa: E402
from serve_helpers import in_process_server  # noqa: E402

import personajudge.cli.serve as cli_serve  # noqa: E402
from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.toy import ToyBackend  # noqa: E402
from personajudge.core.errors import ConfigError  # noqa: E402
from personajudge.serve import create_app  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:method .persona-judge. with a single view")

BAD = ["x\ny", "tab\tkey", " padded", "padded ", "clé", "\x00", "emoji🙂"]


@pytest.fixture
def no_model(monkeypatch):
    refuse_calls(monkeypatch, cli_serve, "PersonaJudge", "the model was loaded before the key was checked")


@pytest.mark.parametrize("key", BAD)
def test_serve_refuses_a_key_no_client_can_send_before_the_model_loads(capsys, no_model, key):
    code, out, err = run_main(["serve", "--backend", "toy", "--port", "0", "--api-key", key], capsys)
    one_line(code, err, "printable ASCII")
    assert key.strip() not in err or not key.strip()  # a secret is never echoed


@pytest.mark.parametrize("key", BAD[:2])
def test_the_environment_variable_is_checked_the_same_way(monkeypatch, capsys, no_model, key):
    monkeypatch.setenv("PERSONAJUDGE_API_KEY", key)
    code, out, err = run_main(["serve", "--backend", "toy", "--port", "0"], capsys)
    one_line(code, err, "PERSONAJUDGE_API_KEY")


def test_create_app_refuses_it_too():
    with PersonaJudge({"backend": {"name": "toy"}}, backend=ToyBackend()) as pj:
        with pytest.raises(ConfigError, match="printable ASCII"):
            create_app(pj, api_key="x\ny", reserve=False)


def test_a_printable_key_with_punctuation_still_authenticates():
    key = "sk-Ab_9.~+/=:@ inner"
    with PersonaJudge({"backend": {"name": "toy"}, "decoding": {"max_new_tokens": 4}}, backend=ToyBackend()) as pj:
        with in_process_server(pj, api_key=key) as base:
            body = {"model": "persona-judge", "prompt": "hi", "max_tokens": 4}
            ok = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=30)
            assert ok.status_code == 200, ok.text
            bad = httpx.post(f"{base}/v1/completions", json=body, headers={"Authorization": "Bearer other"}, timeout=30)
            assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"


def test_an_empty_key_is_refused_not_read_as_no_key(monkeypatch, capsys, no_model):
    """``--api-key "$KEY"`` with KEY unset served every client without a key, silently on loopback; an
    empty ``--api-key`` also fell through to ``PERSONAJUDGE_API_KEY``. Both are one line and exit 2 now."""
    monkeypatch.setenv("PERSONAJUDGE_API_KEY", "from-the-environment")
    code, _, err = run_main(["serve", "--backend", "toy", "--port", "0", "--api-key", ""], capsys)
    one_line(code, err, "is empty (an unset variable?)")
    monkeypatch.setenv("PERSONAJUDGE_API_KEY", "")
    code, _, err = run_main(["serve", "--backend", "toy", "--port", "0"], capsys)
    one_line(code, err, "is empty (an unset variable?)")
    with PersonaJudge({"backend": {"name": "toy"}}, backend=ToyBackend()) as pj:
        with pytest.raises(ConfigError, match="is empty"):
            create_app(pj, api_key="", reserve=False)
