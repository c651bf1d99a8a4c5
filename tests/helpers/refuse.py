"""Make a function fail the test when it is called: for the checks that must come before it.

Many tests assert that a mistake is reported before the model loads, the bench runs or a server starts;
the way to prove it is to make that step itself a test failure. Written once here rather than as a
``def refuse(*a, **k): raise AssertionError(...)`` in every such test."""

from __future__ import annotations

from typing import Any


def refuse_calls(monkeypatch: Any, target: Any, name: str, message: str) -> None:
    """``target.name`` raises ``AssertionError(message)`` when called, for the rest of the test."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(message)

    monkeypatch.setattr(target, name, refused)
