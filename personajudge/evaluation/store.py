"""The evaluation run's files: rows in append-only JSONL, ``run.json`` written atomically.

- The JSONL mechanics -- one ``write`` per row then ``flush`` + ``fsync``, a torn last line (a kill
  mid-write) cut off when the file is opened for appending and ignored by readers, an exclusive
  ``flock`` -- are :class:`personajudge.core.files.JsonlAppendFile`'s, shared with the JSONL batch,
  so there is one implementation of them. This module adds what is the evaluation's own:
- A row's identity is ``(key, fingerprint)``: the fingerprint says under which settings it was
  produced (model, decoding, prompt text, scorer options). :meth:`JsonlStore.append` refuses an
  identity that is already in the file, so a resumed run never duplicates a finished row; on
  reading, the first occurrence wins. A line that is not an object with a ``key``, or a row whose
  fields are not of their types (:data:`ROW_TYPES`), is skipped with a warning.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from personajudge.core import files
from personajudge.core.config import validation_message
from personajudge.core.files import os_error_text

from .errors import EvalError, RunLockedError
from .spec import EvalSpec

RUN_FILE = "run.json"
GENERATIONS = "generations.jsonl"
SCORES = "scores.jsonl"


_NUMBER = (int, float, type(None))
#: the JSON types of the fields each file's rows are read by (the report, the scorers; None: the field
#: may be missing or null). A row with another type was not written by the harness (edited by hand, or
#: foreign): it is skipped like an unreadable line, so that a resumed run writes it again, a scorer never
#: meets a null text and the report never a time that is a string (both were tracebacks)
ROW_TYPES: dict[str, dict[str, tuple[type, ...]]] = {
    GENERATIONS: {
        "key": (str,),
        "prompt_id": (str,),
        "experiment": (str,),
        "method": (str,),
        "seed": (int,),
        "lambda": (int, type(None)),
        "fp": (str,),
        "text": (str,),
        "n_tokens": (int, type(None)),
        "wall_time_s": _NUMBER,
        "tokens_per_s": _NUMBER,
        "acceptance_rate": _NUMBER,
        "prompt_tokens": (list, type(None)),
    },
    SCORES: {
        "gen": (str,),
        "scorer": (str,),
        "fp": (str,),
        "kind": (str, type(None)),
        "value": _NUMBER,
        "dimension": (str, type(None)),
        "details": (dict, type(None)),
    },
}


def well_typed(row: dict[str, Any], types: dict[str, tuple[type, ...]]) -> bool:
    """Whether every field of ``row`` named in ``types`` has one of its types (a bool is no number);
    a list of prompt token counts holds integers only."""
    if not all(isinstance(row.get(k), t) and not isinstance(row.get(k), bool) for k, t in types.items()):
        return False
    counts = row.get("prompt_tokens")
    return counts is None or all(isinstance(n, int) and not isinstance(n, bool) for n in counts)


def _identity(row: dict[str, Any]) -> tuple[str, str]:
    return str(row.get("key")), str(row.get("fp", ""))


def _keyed_rows(path: Path, objs: list[Any], bad: int) -> tuple[list[dict[str, Any]], int]:
    """The objects that are rows (a dict with a ``key``, its fields of their :data:`ROW_TYPES`); the rest
    count as bad lines, with a warning."""
    keyed = [o for o in objs if isinstance(o, dict) and "key" in o]
    bad += len(objs) - len(keyed)
    types = ROW_TYPES.get(path.name)
    rows = keyed if types is None else [r for r in keyed if well_typed(r, types)]
    if bad:
        print(f"personajudge: warning: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    if len(rows) < len(keyed):
        print(
            f"personajudge: warning: {path}: skipped {len(keyed) - len(rows)} row(s) with a field of the wrong "
            "type (edited by hand?)",
            file=sys.stderr,
        )
    return rows, bad + len(keyed) - len(rows)


def read_rows(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """Rows of ``path`` (missing file: none) and how many bad lines were skipped; the file is untouched."""
    return _keyed_rows(Path(path), *files.read_jsonl(path, "evaluation rows file", EvalError))


class JsonlStore:
    """One JSONL file of rows, indexed by identity; opened for appending with a torn tail repaired."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.rows: dict[tuple[str, str], dict[str, Any]] = {}
        self._file = files.JsonlAppendFile(self.path, "evaluation rows file", EvalError)

    def open(self) -> JsonlStore:
        objs = self._file.open()
        rows, _ = _keyed_rows(self.path, objs, self._file.skipped)
        for row in rows:
            self.rows.setdefault(_identity(row), row)
        return self

    def __contains__(self, identity: tuple[str, str]) -> bool:
        return identity in self.rows

    def get(self, key: str, fp: str) -> dict[str, Any] | None:
        return self.rows.get((key, fp))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows.values())

    def append(self, row: dict[str, Any]) -> bool:
        """Write ``row`` durably; False (and nothing written) if its identity is already stored."""
        ident = _identity(row)
        if ident in self.rows:
            return False
        self._file.append([row])
        self.rows[ident] = row
        return True

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> JsonlStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RunLock:
    """An exclusive lock on a run directory, so two processes never append to the same files."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / ".lock"
        self._f: TextIO | None = None

    def __enter__(self) -> RunLock:
        try:
            self._f = open(self.path, "a")
        except OSError as err:  # a read-only directory, or a directory named .lock
            raise EvalError(f"cannot write to the run directory {self.path.parent}: {os_error_text(err)}") from None
        try:
            import fcntl
        except ImportError:  # no advisory locks on this platform
            return self
        try:
            fcntl.flock(self._f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._f.close()
            self._f = None
            raise RunLockedError(
                f"another evaluation is writing to {self.path.parent}; wait for it to finish or use another --run-dir"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._f is not None:
            self._f.close()  # closing releases the lock
            self._f = None


def write_json_atomic(path: Path, data: Any) -> None:
    """:func:`personajudge.core.files.write_json_atomic` (readers see the old or the new file), its
    failures (a full disk, a link at the path) an :class:`EvalError` naming the file."""
    files.write_json_atomic(path, data, what="evaluation file", error=EvalError)


def read_run_file(run_dir: str | Path) -> dict[str, Any]:
    """The run record (``run.json``) of ``run_dir``: a JSON object.

    Anything else -- no such directory, a file instead of a directory, unreadable or non-UTF-8
    bytes, JSON that is not an object -- is an :class:`EvalError` naming the path.
    """
    d = Path(run_dir)
    p = d / RUN_FILE
    if d.exists() and not d.is_dir():
        raise EvalError(
            f"{run_dir} is a file, not an evaluation run directory; give the directory that holds "
            f"{RUN_FILE} (the --run-dir of `personajudge eval`)"
        )
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise EvalError(
            f"{run_dir} is not an evaluation run directory (no {RUN_FILE}); "
            "start one with `personajudge eval --run-dir DIR`"
        ) from None
    except OSError as err:
        raise EvalError(f"cannot read {p}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise EvalError(f"{p} is not valid UTF-8 (byte offset {err.start}); it is not a run record") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, or a number or nesting past Python's limits
        raise EvalError(f"{p} is not valid JSON ({validation_message(err)})") from None
    if not isinstance(data, dict):
        raise EvalError(f"{p} is not a run record: it holds JSON {type(data).__name__}, not an object")
    return data


def read_run_spec(run_dir: str | Path) -> tuple[dict[str, Any], Any]:
    """``(record, EvalSpec)`` of a run directory; an :class:`EvalError` naming the field and the rule
    when ``run.json`` has no valid ``spec`` (never a traceback, never only a pydantic URL)."""
    record = read_run_file(run_dir)
    p = Path(run_dir) / RUN_FILE
    if not isinstance(record.get("spec"), dict):
        raise EvalError(
            f"{p} has no 'spec' table (the run's configuration), so it cannot be reported; "
            "rerun `personajudge eval` with --force to start this directory afresh"
        )
    try:
        return record, EvalSpec.model_validate(record["spec"])
    except ValueError as err:  # pydantic's ValidationError
        raise EvalError(f"{p} holds no valid evaluation spec: {validation_message(err, prefix='spec')}") from None


def load_rows(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """All readable rows of a run directory's JSONL files (torn tails ignored, files untouched)."""
    d = Path(run_dir)
    return read_rows(d / GENERATIONS)[0], read_rows(d / SCORES)[0]
