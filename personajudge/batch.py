"""JSONL batch mode of ``personajudge generate``: ``--input FILE.jsonl [--output FILE.jsonl]``.

Each input line is a JSON object with a ``"prompt"`` (a string or a list of
``{"role", "content"}`` messages) and optional ``"id"`` and ``"seed"``, and no
other key (a misspelt ``"seeed"`` is an error, not a default seed); blank
lines are skipped, and lines end at ``"\\n"`` only (:func:`~personajudge.core.files.jsonl_lines`). Prompts run through
:meth:`~personajudge.PersonaJudge.generate_batch`, ``batch_size`` at a time
(locally, or on Ray replicas: :mod:`personajudge.distributed`); each prompt
gives one output line ``{"id", "prompt", "text", "tokens", "finish_reason",
"stats"}``, in input order.

Resumable and safe (nothing finished is ever lost):

- Results are appended to ``<output>.partial`` as each chunk finishes (one
  write, flush, fsync; :class:`~personajudge.core.files.JsonlAppendFile`). Its
  first line records the settings; every row carries ``fp``, a fingerprint of
  the settings, the prompt and the seed that produced it.
- Rerunning the same command resumes: rows of the partial file whose id and
  fingerprint match the input are kept and skipped, a torn last line (a kill
  during a write) is dropped, a row is never written twice. A partial file
  made under other settings (or for other prompts), or not by this command
  (no settings line, an unreadable line), is refused unless ``force``, and
  left untouched; with it the rows that still match are kept and the rest dropped.
- When every prompt is done the rows are written in input order to
  ``<output>`` through a temporary file, fsync and an atomic rename, and the
  partial file is removed. An existing output is replaced only with
  ``overwrite``; a symbolic link, FIFO or device at either path is never
  written (``-`` means standard output), and neither is the input file.
- Rows without a seed (and no ``--seed``) get a fresh one, recorded in their
  stats; such a row is kept on resume as it is (it could not be reproduced).
- A prompt the model cannot take (too long for the context) stops the run
  before its chunk decodes, naming its ``file:line``. A prompt whose logits
  turn NaN or infinite while decoding (one that overflows float16) fails
  alone: every other row is generated and written, then the run fails naming
  the line(s) (``NumericalError``, exit 2); a rerun redoes only those rows.
  So on Ray replicas too (:mod:`personajudge.distributed`), with the same
  helpers (:func:`~personajudge.api.rows_failed_alone`, :func:`~personajudge.api.executor_results`).
- A row that fails with another error of its own (a backend that cannot run
  its forward, a plugin's bug on it) stops the run with that error, but the
  executor first yields its chunk (that row as its exception), so the chunk's
  finished rows are written and a rerun redoes only what did not finish;
  locally and on Ray alike.
- A run that stops before its first row (an error, Ctrl-C, a second Ctrl-C
  inside ``ray.init``) removes the partial file it made, which holds only its
  settings line; a partial file it found (rows of an earlier run) stays.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personajudge.core.config import MAX_SEED, RunConfig, check_seed_span
from personajudge.core.errors import ConfigError, NumericalError, PersonaJudgeError, located
from personajudge.core.files import (
    JsonlAppendFile,
    OutputError,
    QuietStream,
    atomic_write,
    check_output_path,
    check_path,
    check_text,
    fsync_dir,
    jsonl_lines,
    mark_fresh,
    note,
    os_error_text,
    read_jsonl,
    read_text,
    silence_stdout,
    unmark_fresh,
    write_whole,
)
from personajudge.core.processes import whole_lines
from personajudge.preferences import normalize_conversation

from .api import executor_results, fresh_seed, rows_failed_alone

#: First line of a partial file: ``{"personajudge_batch": FORMAT, "settings": {...}, "settings_hash": ...}``.
HEADER_KEY = "personajudge_batch"
FORMAT = 1


#: The fields of an input line; any other key is refused (a typo such as ``"seeed"`` would otherwise
#: silently run with the default seed).
FIELDS = ("prompt", "id", "seed")


def _unknown_fields(obj: dict[str, Any], where: str) -> ConfigError:
    unknown = sorted((k for k in obj if k not in FIELDS), key=str)
    names = ", ".join(json.dumps(k, ensure_ascii=False)[:60] for k in unknown[:5]) + (
        " ..." if len(unknown) > 5 else ""
    )
    if {"text", "finish_reason"} <= obj.keys():  # a results file given back as input
        return ConfigError(
            f'{where}: a result row, not a prompt line (fields {names}); keep only "prompt", "id" and "seed" '
            "of each line to run them again"
        )
    close = difflib.get_close_matches(str(unknown[0]).lower(), FIELDS, n=1, cutoff=0.6)  # "ID" is "id"
    hint = f'; did you mean "{close[0]}"?' if close else ""
    plural = "s" if len(unknown) > 1 else ""
    return ConfigError(
        f'{where}: unknown field{plural} {names}{hint} (a line has "prompt", and optionally "id" and "seed")'
    )


@dataclass
class Record:
    id: Any
    prompt: str | list[dict[str, str]]
    seed: int | None
    where: str  # "file:line" for error messages


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """Parse and validate every line before any model is loaded; errors name ``file:line``."""
    p = Path(check_path(path, "input file", ConfigError))  # "" would read the current folder
    text = read_text(p, "input file", ConfigError)
    out: list[Record] = []
    ids: set[str] = set()
    for lineno, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err.msg}: column {err.colno})") from None
        except (ValueError, RecursionError) as err:  # an integer too long to convert, or nesting too deep
            raise ConfigError(f"{where}: not usable JSON ({str(err)[:120] or 'nested too deeply'})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f'{where}: expected a JSON object with a "prompt" field')
        if any(k not in FIELDS for k in obj):  # before "missing": {"promt": ...} asks "did you mean"
            raise _unknown_fields(obj, where)
        if "prompt" not in obj:
            raise ConfigError(f'{where}: missing the "prompt" field')
        prompt = obj["prompt"]
        if not isinstance(prompt, (str, list)):
            raise ConfigError(f'{where}: "prompt" must be a string or a list of chat messages')
        try:
            normalize_conversation(prompt)
        except PersonaJudgeError as err:
            raise ConfigError(f"{where}: {err}") from None
        seed = obj.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
            raise ConfigError(f'{where}: "seed" must be an integer from 0 to {MAX_SEED}')
        rid = obj.get("id", lineno)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise ConfigError(f'{where}: "id" must be a string or an integer')
        if isinstance(rid, str):
            check_text(rid, f'{where}: "id"', ConfigError)  # it is written back to the output file
        if str(rid) in ids:
            raise ConfigError(f"{where}: duplicate id {rid!r}")
        ids.add(str(rid))
        out.append(Record(rid, prompt, seed, where))
    if not out:
        raise ConfigError(f"input file {p} has no prompts")
    return out


# -- standard output ---------------------------------------------------------------------------

#: encodings that hold every character
_UNICODE_CODECS = {"utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}


def writes_unicode(stream: Any) -> bool:
    """Whether text ``stream`` can encode every character: a UTF encoding, or none (``io.StringIO``).
    Not so with ``PYTHONIOENCODING=ascii``, a ``C`` locale without UTF-8 mode, or a Windows code page."""
    encoding = getattr(stream, "encoding", None)
    if not encoding:
        return True
    try:
        return codecs.lookup(encoding).name in _UNICODE_CODECS
    except LookupError:
        return False


def stdout_json(obj: Any, stream: Any = None) -> str:
    """``obj`` as one line of JSON for ``stream`` (default ``sys.stdout``): non-ASCII characters as
    they are where the stream holds them, else as ``\\uXXXX`` escapes. Both are the same JSON value, so
    a stream that cannot encode the text never loses a result (nor raises after the work is done)."""
    return json.dumps(obj, ensure_ascii=not writes_unicode(sys.stdout if stream is None else stream))


# -- fingerprints ----------------------------------------------------------------------------------


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def _jsonable_preferences(preferences: Sequence[Any] | None) -> list[Any] | None:
    if preferences is None:
        return None
    return [p.model_dump(mode="json") if hasattr(p, "model_dump") else p for p in preferences]


def batch_settings(config: RunConfig, preferences: Sequence[Any] | None = None) -> dict[str, Any]:
    """What decides a row's output besides its prompt and seed.

    The base seed is left out (each row's own seed is in its fingerprint), and so are the thread count
    and the batch size: they change speed, not the rows (``generate_batch`` gives each row what it
    would get alone).
    """
    run = config.model_dump(mode="json", by_alias=True)
    run["decoding"].pop("seed", None)
    run["backend"].pop("threads", None)
    if preferences is not None:  # what generate_batch will use: --prefer replaces the config's list
        run["preferences"] = _jsonable_preferences(preferences)
    return run


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _changed(old: Any, new: Any) -> list[str]:
    a, b = _flatten(old if isinstance(old, dict) else {}), _flatten(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, object) != b.get(k, object))


# -- the job ---------------------------------------------------------------------------------------


@dataclass
class Chunk:
    """Prompts generated together in one ``generate_batch`` call (locally or on one replica)."""

    index: int
    records: list[Record]
    positions: list[int]  # each record's index in the input
    seeds: list[int]

    @property
    def prompts(self) -> list[Any]:
        return [r.prompt for r in self.records]

    @property
    def where(self) -> list[str]:
        """Each prompt's ``file:line``, for error messages."""
        return [r.where for r in self.records]


#: Runs chunks and yields each with its results (``GenerationResult.as_dict()`` per prompt), in any order;
#: a prompt that failed alone (NaN logits) may yield its exception instead of a result, and so may the
#: failed row of the chunk an executor yields just before it raises that row's own error.
Executor = Callable[[list[Chunk]], Iterable[tuple[Chunk, list[Any]]]]


def local_executor(pj: Any, preferences: Sequence[Any] | None = None) -> Executor:
    """Chunks one after another through ``pj.generate_batch`` in this process."""

    def run(chunks: list[Chunk]) -> Iterator[tuple[Chunk, list[Any]]]:
        for c in chunks:
            try:
                results = pj.generate_batch(c.prompts, preferences=preferences, seeds=c.seeds)
            except Exception as err:  # rows that failed alone (err.rows): the others finished
                rows = rows_failed_alone(err, len(c.records))
                if rows is None:
                    # one row's error raised before the chunk decodes (too long, not encodable): name its line
                    if (named := located(err, c.where)) is not err:
                        raise named from None
                    raise
                if not isinstance(err, NumericalError):  # a row's own bug: its chunk is written, then the run stops
                    yield c, executor_results(rows)
                    raise
                results = rows  # NaN rows: recorded, the run goes on
            yield c, executor_results(results)

    return run


@dataclass
class JsonlBatch:
    """One ``generate --input/--output`` job: validated, resumed from its partial file, run, finished.

    Use it as a context manager around :meth:`run`; :meth:`open` (called on entry) checks the output
    paths and reads the partial file *before* any model is loaded, so a mistake costs no load time.
    """

    records: Sequence[Record]
    config: RunConfig
    preferences: Sequence[Any] | None = None
    batch_size: int = 8
    output: str | None = None
    overwrite: bool = False
    force: bool = False
    progress: bool = True  # the bar (drawn only on a terminal) and the "resuming" note, on stderr
    source: str | os.PathLike[str] | None = None  # the input file: never written, replaced or removed
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # str(id) -> row, kept or new
    written: int = 0  # rows written by this run
    failed: list[tuple[str, BaseException]] = field(default_factory=list)  # (file:line, error): rows that failed alone

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be at least 1")
        self.settings = batch_settings(self.config, self.preferences)
        self.settings_hash = _hash(self.settings)
        base = self.config.decoding.seed
        if base is not None:  # rows without a seed of their own run with base + their index
            last = max((i for i, r in enumerate(self.records) if r.seed is None), default=-1)
            what = f"the seed {base} (--seed, or the config's decoding.seed) with {last + 1} input rows"
            # the API's hint names its seeds= keyword, which the command line has not
            hint = ' (input row i runs with seed + i; lower the seed, or give the rows their own "seed")'
            check_seed_span(base, last + 1, what, hint=hint)
        self.seeds: list[int | None] = [
            r.seed if r.seed is not None else (base + i if base is not None else None)
            for i, r in enumerate(self.records)
        ]
        self.fps = [
            f"{self.settings_hash}:{_hash(r.prompt)}:{'fresh' if s is None else s}"
            for r, s in zip(self.records, self.seeds)
        ]
        output = None if self.output == "-" else self.output
        if output is not None:  # before pathlib: Path("") is ".", and "." has no name to add ".partial" to
            output = check_path(output, "output file", OutputError)
        self.to_stdout = output is None
        self.target = None if output is None else Path(output)
        self.partial = None if self.target is None else self.target.with_name(self.target.name + ".partial")
        self._file: JsonlAppendFile | None = None
        self._created = False  # open() made the partial file (removed again if the run fails before a row)
        self._fresh: str | None = None  # the partial file while marked fresh (core.files.mark_fresh)
        self._pending_out: dict[int, dict[str, Any] | None] = {}  # stdout: rows waiting for earlier ones
        self._next_out = 0

    # -- opening: paths, partial file, resume ---------------------------------------------------
    def open(self) -> JsonlBatch:
        if self.target is None or self.partial is None:  # set together: both None when writing to stdout
            if sys.stdout is None or sys.stdout.closed:  # `>&-`: refused before any model loads
                raise OutputError("standard output is closed; give --output FILE for the results")
            return self
        self._check_not_the_input()
        check_output_path(self.target)
        if self.target.exists() and not self.overwrite:
            raise OutputError(
                f"output file {self.target} already exists; pass --overwrite to replace it, or choose another path"
            )
        check_output_path(self.partial, "partial results file")
        self._created = not self.partial.exists()
        self._file = JsonlAppendFile(self.partial, "partial results file")
        try:
            self._file.open(check=self._judge_partial)
            self._resume()
        except BaseException:
            self._file.close()
            raise
        if self._created:  # holds only the settings line until a row is written (see discard_fresh_files)
            self._fresh = os.path.abspath(self.partial)
            mark_fresh(self._fresh)
        return self

    def _forget_fresh(self) -> None:
        """The partial file holds a row now, or this run's own ending decides about it (:meth:`__exit__`)."""
        if self._fresh is not None:
            unmark_fresh(self._fresh)
            self._fresh = None

    def _check_not_the_input(self) -> None:
        """Refuse an output (or its partial file) that is the input file, before anything is written.

        ``--overwrite`` would replace the prompts with the results, and ``--force`` would rewrite (then
        delete) an input named ``<output>.partial``. The same file by any name: a link or ``./`` path
        is caught by ``samefile``, a path not there yet cannot be the input.
        """
        if self.source is None or self.target is None or self.partial is None:
            return
        for path, what in ((self.target, "the output file"), (self.partial, "the partial results file of --output")):
            try:
                same = os.path.samefile(self.source, path)
            except (OSError, ValueError):  # one of them missing (or unreadable): not the same file
                same = False
            if same:
                raise OutputError(
                    f"the input file {self.source} is {what} {self.target}; the results would replace "
                    "the prompts: choose another --output"
                )

    def _judge_partial(self, objs: list[Any], skipped: int, tail: bytes) -> None:
        """What the partial file holds, decided before :meth:`JsonlAppendFile.open` cuts its torn tail:
        a file this command may not resume is refused (unless ``force``) with the file untouched.

        A file with no settings line is refused whatever its lines are: before, a file of lines that
        were not JSON (a user's notes at ``<output>.partial``) read as empty, so it was taken over, its
        last line cut as torn, and deleted at the end of the run. Unreadable lines count as lines that
        are not result rows; only a torn last line of this format is dropped silently."""
        header = objs[0] if objs and isinstance(objs[0], dict) and HEADER_KEY in objs[0] else None
        rows = [o for o in objs[1 if header else 0 :] if isinstance(o, dict) and "id" in o and "fp" in o]
        bad = len(objs) - len(rows) - (header is not None) + skipped
        # nothing but a torn start of a settings line (a kill during its write) is a new file too
        head = f'{{"{HEADER_KEY}":'.encode()
        new = not objs and not skipped and (tail.startswith(head) or head.startswith(tail))
        expected = {str(r.id): fp for r, fp in zip(self.records, self.fps)}
        keep: dict[str, dict[str, Any]] = {}
        stale = 0
        for row in rows:  # the first occurrence wins, as in the eval harness
            rid = str(row["id"])
            if rid in keep:
                continue
            if expected.get(rid) == row["fp"]:
                keep[rid] = row
            else:
                stale += 1
        same_settings = header is not None and header.get("settings_hash") == self.settings_hash
        # a settings line and nothing else: a run that failed before its first row (a missing model, a
        # prompt too long for the context). Nothing to lose, so rerunning with the fix needs no --force.
        empty = header is not None and len(objs) == 1 and not skipped
        if not new and (not same_settings or stale or bad) and not self.force and not empty:
            if header is None:
                why = "it has no settings line (not written by this version of personajudge)"
            elif not same_settings:
                changed = _changed(header.get("settings"), self.settings)
                shown = ", ".join(changed[:6]) + (" ..." if len(changed) > 6 else "")
                why = f"it was made with other settings (changed: {shown or 'format'})"
            elif stale:
                why = f"{stale} of its rows do not match the input (prompt, id or seed changed)"
            else:
                why = f"{bad} of its lines are not result rows"
            raise OutputError(
                f"cannot resume from {self.partial}: {why}; rerun the original command, pass "
                f"--force to keep the {len(keep)} row(s) that still match and redo the rest, "
                "or remove the file"
            )
        self._verdict = (new, not same_settings or bool(stale) or bool(bad), empty, keep, len(rows) + bad)

    def _resume(self) -> None:
        """Act on :meth:`_judge_partial`'s verdict, the file open and its torn tail cut: start it, rewrite
        it with the rows that still match (``force``), or keep its rows."""
        new, rewrite, empty, keep, lines = self._verdict
        assert self._file is not None and self.partial is not None  # open() made both before resuming
        if new:
            self._file.append([self._header()])
            return
        if rewrite:  # --force: rewrite the file with what still matches
            self._file.close()
            with atomic_write(self.partial, "wb", what="partial results file") as f:
                for obj in [self._header(), *keep.values()]:
                    f.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")
            self._file = JsonlAppendFile(self.partial, "partial results file")
            self._file.open()
            if not empty:
                note(
                    f"personajudge: --force: kept {len(keep)} matching row(s) of {self.partial}, dropped {lines - len(keep)}"
                )
        self.done = keep
        if keep and self.progress:
            note(f"personajudge: resuming: {len(keep)} of {len(self.records)} row(s) already in {self.partial}")

    def _header(self) -> dict[str, Any]:
        return {HEADER_KEY: FORMAT, "settings_hash": self.settings_hash, "settings": self.settings}

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> JsonlBatch:
        return self.open()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self._forget_fresh()
        self.close()
        # a partial file this run made and the run failed before any row: it holds only the settings
        # line, and left behind it would look like a run to resume
        if exc_type is not None and self._created and not self.written and self.partial is not None:
            with contextlib.suppress(OSError):
                self.partial.unlink()

    # -- work ------------------------------------------------------------------------------------
    def chunks(self) -> list[Chunk]:
        """The prompts still to do, ``batch_size`` at a time, with their seeds (fresh ones drawn here, so
        every executor runs exactly the same rows)."""
        todo = [i for i, r in enumerate(self.records) if str(r.id) not in self.done]
        out: list[Chunk] = []
        for k in range(0, len(todo), self.batch_size):
            pos = todo[k : k + self.batch_size]
            out.append(
                Chunk(
                    len(out),
                    [self.records[i] for i in pos],
                    pos,
                    [s if (s := self.seeds[i]) is not None else fresh_seed() for i in pos],
                )
            )
        return out

    def _failed_error(self) -> PersonaJudgeError:
        """The error for the rows that failed alone (NaN logits), naming their input lines."""
        (where, err), rest = self.failed[0], self.failed[1:]
        reason = getattr(err, "reason", None) or str(err)
        more = ""
        if rest:
            names = ", ".join(w for w, _ in rest[:5])
            more = f" (so did {len(rest)} more: {names}{', ...' if len(rest) > 5 else ''})"
        error = type(err)(f"{where}: {reason}{more}") if isinstance(err, NumericalError) else None
        return error if error is not None else PersonaJudgeError(f"{where}: {type(err).__name__}: {reason}{more}")

    def _rows(self, chunk: Chunk, results: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [
            {"id": rec.id, "prompt": rec.prompt, **res, "fp": self.fps[pos]}
            for rec, pos, res in zip(chunk.records, chunk.positions, results)
        ]

    def _write(self, chunk: Chunk, rows: list[dict[str, Any]]) -> None:
        if self._file is not None:
            new = [r for r in rows if str(r["id"]) not in self.done]
            self._file.append(new)  # durable before it counts as done
            if new:
                self._forget_fresh()
            for r in new:
                self.done[str(r["id"])] = r
            self.written += len(new)
            return
        for pos, row in zip(chunk.positions, rows):  # stdout: in input order, whatever order chunks come in
            self._pending_out[pos] = row
        lines = []
        while self._next_out in self._pending_out:
            got = self._pending_out.pop(self._next_out)
            self._next_out += 1
            if got is None:  # a row that failed alone (see ``run``): no line, the rest go on
                continue
            row = dict(got)
            row.pop("fp", None)
            lines.append(stdout_json(row) + "\n")
        try:
            with whole_lines():  # a Ctrl-C lands between chunks, never inside a line
                write_whole(sys.stdout, "".join(lines))
                self.written += len(lines)
        except BrokenPipeError:
            silence_stdout()
            raise OutputError(
                f"standard output was closed (broken pipe) after {self.written} of {len(self.records)} results"
            ) from None
        except OSError as err:  # `> /dev/full` and the like: say how much got out, never lose rows silently
            silence_stdout()
            raise OutputError(
                f"could not write to standard output ({os_error_text(err)}) after {self.written} of "
                f"{len(self.records)} results; the rest are lost: --output FILE keeps them resumably"
            ) from None
        for row in rows:
            self.done[str(row["id"])] = row

    def run(self, executor: Executor, *, on_chunk: Callable[[int], None] | None = None) -> int:
        """Run the pending chunks through ``executor``, write each as it comes, finish the output.

        Returns how many rows this run wrote. ``on_chunk(rows_done)`` is called after each chunk is
        durably written (a progress hook).
        """
        chunks = self.chunks()
        total = len(self.records)
        from tqdm import tqdm

        # Drawn only on a terminal (tqdm's disable=None): in a log file its carriage-return redraws are
        # noise. Through QuietStream: a closed, full or broken stderr never aborts the rows.
        bar = tqdm(
            total=total,
            initial=len(self.done),
            unit="row",
            desc="generate",
            file=QuietStream(sys.stderr),
            disable=None if self.progress else True,
            dynamic_ncols=True,
            smoothing=0.1,
        )
        t0, tokens = time.perf_counter(), 0
        try:
            for chunk, results in executor(chunks):
                if len(results) != len(chunk.records):
                    raise RuntimeError(f"chunk {chunk.index}: {len(results)} results for {len(chunk.records)} prompts")
                ok = [k for k, r in enumerate(results) if not isinstance(r, BaseException)]
                if len(ok) < len(results):  # rows that failed alone: the others are written, the run fails at the end
                    for k in sorted(set(range(len(results))) - set(ok)):
                        self.failed.append((chunk.records[k].where, results[k]))
                        self._pending_out[chunk.positions[k]] = None  # stdout: not waited for
                    chunk = Chunk(
                        chunk.index,
                        [chunk.records[k] for k in ok],
                        [chunk.positions[k] for k in ok],
                        [chunk.seeds[k] for k in ok],
                    )
                    results = [results[k] for k in ok]
                self._write(chunk, self._rows(chunk, results))
                tokens += sum(int(r.get("stats", {}).get("tokens", len(r.get("tokens", [])))) for r in results)
                bar.update(len(chunk.records))
                elapsed = time.perf_counter() - t0
                bar.set_postfix_str(f"{tokens / elapsed:.1f} tok/s" if elapsed > 0 else "", refresh=False)
                if on_chunk is not None:
                    on_chunk(len(self.done))
            if self.failed:  # every other row is written: name the ones that failed
                raise self._failed_error()
        except OutputError as err:  # disk full, pipe closed: one line that says what is kept
            bar.close()
            self._count_on_disk()
            kept = self._kept_message() if self.partial is not None else ""  # stdout: err says how many
            raise (OutputError(f"{err}; {kept}") if kept else err) from None
        except BaseException:  # Ctrl-C, a model error, a bug: say what is kept, then let it through
            bar.close()
            self._count_on_disk()
            self._say_kept()
            raise
        bar.close()
        self.finish()
        return self.written

    def _count_on_disk(self) -> None:
        """Count as done the rows of this input that the partial file holds (what a rerun resumes).

        A Ctrl-C inside an append can land after its lines are written (during the fsync) but
        before they count in ``done``: then "N of M results are kept" would undercount, and a first
        chunk's rows would count as none (and the file would be removed as holding no row)."""
        if self._file is None or self.partial is None:
            return
        self.close()  # flushes what an interrupted append left in the buffer
        try:
            objs, _ = read_jsonl(self.partial, "partial file", OutputError)
        except OutputError:  # the run already failed: keep its error, count what ``done`` says
            return
        expected = {str(r.id): fp for r, fp in zip(self.records, self.fps)}
        for o in objs:
            if isinstance(o, dict) and "id" in o and (rid := str(o["id"])) not in self.done:
                if expected.get(rid) == o.get("fp"):
                    self.done[rid] = o
                    self.written += 1

    def _kept_message(self) -> str:
        if self.partial is None:  # standard output: nothing is kept to resume from, but say what got out
            return (
                f"{self.written} of {len(self.records)} results were written to standard output" if self.written else ""
            )
        if not self.done:
            return ""
        return (
            f"{len(self.done)} of {len(self.records)} results are kept in {self.partial}: "
            "rerun the same command to continue"
        )

    def _say_kept(self) -> None:
        if msg := self._kept_message():
            note(f"personajudge: {msg}")

    def finish(self) -> None:
        """All rows done: write them in input order to the output (atomically), remove the partial file."""
        if self.target is None or self.partial is None:  # set together: both None when writing to stdout
            return
        missing = [r.id for r in self.records if str(r.id) not in self.done]
        if missing:
            raise RuntimeError(f"rows {missing[:5]} were never generated")
        try:
            with atomic_write(self.target, "wb", overwrite=True) as f:
                for r in self.records:
                    row = dict(self.done[str(r.id)])
                    row.pop("fp", None)
                    f.write(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
        except OutputError as err:
            raise OutputError(
                f"{err}; all {len(self.records)} results are kept in {self.partial}: free some space "
                "and rerun the same command to write the output"
            ) from None
        self.close()
        try:
            os.unlink(self.partial)
        except FileNotFoundError:
            pass
        fsync_dir(self.partial.parent)


def run_jsonl(
    pj,
    records: Sequence[Record],
    *,
    preferences=None,
    batch_size: int = 8,
    output: str | None = None,
    overwrite: bool = False,
    force: bool = False,
    progress: bool = True,
    source: str | os.PathLike[str] | None = None,
) -> int:
    """Generate for ``records`` with a loaded ``pj`` in this process (resuming ``output``'s partial file).

    ``source``: the file the records were read from, refused as ``output`` (or as its partial file).

    Returns how many rows this call wrote. For Ray replicas see :class:`JsonlBatch` and
    :meth:`personajudge.distributed.ReplicaPool.executor`.
    """
    job = JsonlBatch(
        records,
        pj.config,
        preferences,
        batch_size=batch_size,
        output=output,
        overwrite=overwrite,
        force=force,
        progress=progress,
        source=source,
    )
    with job:
        return job.run(local_executor(pj, preferences))
