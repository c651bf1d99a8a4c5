"""Reading user-supplied files with errors that say which file and what went wrong."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import PersonaJudgeError


def read_text(path: str | os.PathLike[str], what: str, error: type[PersonaJudgeError]) -> str:
    """The UTF-8 text of ``path``; ``error("<what> not found: ...")`` and the like otherwise."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error(f"{what} not found: {p}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"cannot read {what} {p}: {getattr(err, 'strerror', None) or err}") from None
