"""Fixtures of the plugin tests."""

import pytest

from personajudge.plugins import manager


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder of fake distributions on sys.path, and a plugin manager that has not loaded yet (put back as
    it was after the test)."""
    d = tmp_path / "site"
    d.mkdir()
    monkeypatch.syspath_prepend(str(d))
    monkeypatch.delenv(manager.ENV_SELECT, raising=False)
    monkeypatch.setattr(manager, "_pm", None)
    monkeypatch.setattr(manager, "_registries", {})
    monkeypatch.setattr(manager, "_sources", {})
    return d
