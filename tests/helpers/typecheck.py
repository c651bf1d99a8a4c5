"""Run mypy on a snippet against the package as an installed one looks.

The source tree maps ``core/``, ``backends/``, ``preferences/`` and ``plugins/`` under ``personajudge``
(pyproject's ``package-dir``), so mypy cannot follow ``import personajudge`` from the tree itself;
this builds the installed layout out of symlinks, as ``make lint`` does, and points ``MYPYPATH`` at it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def typed_package(where: Path) -> Path:
    """A folder holding ``personajudge/`` in its installed layout (symlinks into the tree): the MYPYPATH."""
    pkg = where / "typed" / "personajudge"
    pkg.mkdir(parents=True)
    for entry in (ROOT / "personajudge").iterdir():
        if entry.name != "__pycache__":
            (pkg / entry.name).symlink_to(entry)
    for room in ("core", "backends", "preferences", "plugins"):
        (pkg / room).symlink_to(ROOT / room)
    return pkg.parent


def run_mypy(files: list[Path], where: Path) -> subprocess.CompletedProcess[str]:
    """mypy over ``files`` (imports of the package followed silently: only the files' own errors count)."""
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "MYPYPATH": str(typed_package(where))},
        cwd=where,
    )
