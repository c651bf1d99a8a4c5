"""JSONL batch mode of ``personajudge generate``: ``--input FILE.jsonl [--output FILE.jsonl]``.

Each input line is a JSON object with a ``"prompt"`` (a string or a list of
``{"role", "content"}`` messages) and optional ``"id"`` and ``"seed"``; blank
lines are skipped. All prompts run through
:meth:`~personajudge.PersonaJudge.generate_batch`, ``batch_size`` at
a time; each prompt gives one output line ``{"id", "prompt", "text", "tokens",
"finish_reason", "stats"}`` in input order.

Output safety: an existing ``--output`` file is never touched unless
``overwrite`` is set, and even then results go to ``<output>.partial`` first
(appended and flushed after every chunk, so progress is visible and survives a
crash) and replace the output only when every prompt is done.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from personajudge.core.errors import ConfigError, PersonaJudgeError
from personajudge.core.files import read_text
from personajudge.preferences import normalize_conversation

from .api import fresh_seed


@dataclass
class Record:
    id: Any
    prompt: str | list[dict[str, str]]
    seed: int | None
    where: str  # "file:line" for error messages


def read_records(path: str | os.PathLike[str]) -> list[Record]:
    """Parse and validate every line before any model is loaded; errors name ``file:line``."""
    p = Path(path)
    text = read_text(p, "input file", ConfigError)
    out: list[Record] = []
    ids: set[str] = set()
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(obj, dict):
            raise ConfigError(f"{where}: expected a JSON object with a \"prompt\" field")
        if "prompt" not in obj:
            raise ConfigError(f"{where}: missing the \"prompt\" field")
        prompt = obj["prompt"]
        if not isinstance(prompt, (str, list)):
            raise ConfigError(f"{where}: \"prompt\" must be a string or a list of chat messages")
        try:
            normalize_conversation(prompt)
        except PersonaJudgeError as err:
            raise ConfigError(f"{where}: {err}") from None
        seed = obj.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ConfigError(f"{where}: \"seed\" must be a non-negative integer")
        rid = obj.get("id", lineno)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise ConfigError(f"{where}: \"id\" must be a string or an integer")
        if str(rid) in ids:
            raise ConfigError(f"{where}: duplicate id {rid!r}")
        ids.add(str(rid))
        out.append(Record(rid, prompt, seed, where))
    if not out:
        raise ConfigError(f"input file {p} has no prompts")
    return out


def _open_output(output: str | None, overwrite: bool) -> tuple[IO[str], Path | None, Path | None]:
    if output is None or output == "-":
        return sys.stdout, None, None
    target = Path(output)
    if target.exists() and not overwrite:
        raise ConfigError(f"output file {target} already exists; pass --overwrite to replace it, "
                          "or choose another path")
    if target.is_dir():
        raise ConfigError(f"output path {target} is a directory")
    partial = target.with_name(target.name + ".partial")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        f = open(partial, "w", encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"cannot write {partial}: {err}") from None
    return f, target, partial


def run_jsonl(pj, records: Sequence[Record], *, preferences=None, batch_size: int = 8, output: str | None = None,
              overwrite: bool = False, progress: bool = True) -> int:
    """Generate for ``records`` in chunks, writing one JSON line per record. Returns how many were written."""
    if batch_size < 1:
        raise ConfigError("--batch-size must be at least 1")
    base = pj.config.decoding.seed
    seeds = [r.seed if r.seed is not None else (base + i if base is not None else fresh_seed())
             for i, r in enumerate(records)]
    f, target, partial = _open_output(output, overwrite)
    done = 0
    ok = False
    try:
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            results = pj.generate_batch([r.prompt for r in chunk], preferences=preferences,
                                        seeds=seeds[start:start + len(chunk)])
            for rec, res in zip(chunk, results):
                row = {"id": rec.id, "prompt": rec.prompt, **res.as_dict()}
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            done += len(chunk)
            if progress:
                tok = sum(r.stats.tokens for r in results)
                wall = results[0].stats.wall_time_s if results else 0.0
                print(f"[{done}/{len(records)}] {len(chunk)} prompt(s), {tok} tokens in {wall:.1f}s",
                      file=sys.stderr)
        ok = True
    finally:
        if target is not None:
            f.close()
            if ok:
                os.replace(partial, target)
            elif done:
                print(f"personajudge: {done} of {len(records)} results kept in {partial}", file=sys.stderr)
            else:
                partial.unlink(missing_ok=True)
    return done
