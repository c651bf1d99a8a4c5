"""Argument types shared by the ``python -m personajudge.bench.*`` commands: a bad value is argparse's
usage error (exit 2) naming the flag, not a traceback or a table of meaningless numbers."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def at_least(low: int) -> Callable[[str], int]:
    """An integer >= ``low``."""

    def parse(v: str) -> int:
        try:
            n = int(v)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {v!r}") from None
        if n < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {n}")
        return n

    parse.__name__ = f"integer >= {low}"
    return parse


def counts(low: int) -> Callable[[str], list[int]]:
    """A comma-separated list of integers >= ``low``."""
    one = at_least(low)

    def parse(v: str) -> list[int]:
        items = [s.strip() for s in v.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError("expected comma-separated integers, got nothing")
        return [one(s) for s in items]

    return parse
