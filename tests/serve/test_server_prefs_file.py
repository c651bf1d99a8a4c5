"""A server's ``--preferences-file``: its preferences are the defaults as written, and requests name them.

Before, ``serve`` turned each entry of the file into its description as free
text (its name, instruction and examples lost), and a request's views could
not name what the file defines. Expected texts come from the same request run
in-process with the file's preferences (the toy backend is exact).
"""

from __future__ import annotations

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from serve_helpers import running_server  # noqa: E402

from personajudge.api import PersonaJudge  # noqa: E402
from personajudge.backends.toy import ToyBackend  # noqa: E402
from personajudge.preferences import load_file  # noqa: E402

PREFS_TOML = """
[[preferences]]
name = "pirate"
description = "Talk like a pirate"
instruction = "Answer like a pirate, with arr and matey."

[[preferences]]
name = "concise"
description = "Short"
instruction = "One short line, never more."
"""
MESSAGES = [{"role": "user", "content": "Where is the ship?"}]
KW = dict(temperature=0.0, seed=1, max_new_tokens=24)


def _local(prefs, **kw):
    with PersonaJudge({"backend": {"name": "toy"}, "encoder": "plain"}, backend=ToyBackend()) as pj:
        return pj.generate(MESSAGES, preferences=prefs, **KW, **kw).text


def test_the_files_preferences_are_the_defaults_and_name_a_requests_views(tmp_path):
    path = tmp_path / "prefs.toml"
    path.write_text(PREFS_TOML)
    prefs = load_file(str(path))
    flags = ["--backend", "toy", "--encoder", "plain", "--preferences-file", str(path)]
    with running_server(flags, tmp_path / "server.log") as (base, _):
        body = {"model": "persona-judge", "messages": MESSAGES, "temperature": 0.0, "seed": 1, "max_tokens": 24}
        with httpx.Client(timeout=60) as c:
            plain = c.post(base + "/v1/chat/completions", json=body)
            views = [["pirate", "concise"], ["humor"]]
            grouped = c.post(base + "/v1/chat/completions", json={**body, "views": views})
            named = c.post(base + "/v1/chat/completions", json={**body, "preferences": ["Pirate", "humor"]})
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] == _local(prefs)
    assert plain.json()["choices"][0]["message"]["content"] != _local([p.description for p in prefs])
    assert grouped.status_code == 200, grouped.text
    assert grouped.json()["choices"][0]["message"]["content"] == _local(prefs, views=views)
    # a request's preferences name the file's too (case-insensitively), one view each
    assert named.status_code == 200, named.text
    assert named.json()["choices"][0]["message"]["content"] == _local([prefs[0], "humor"])
    assert "ignored" not in (tmp_path / "server.log").read_text()  # the file's preferences are definitions there
