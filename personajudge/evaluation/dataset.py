"""Prompt datasets: the shipped P-Soups evaluation prompts, or any JSON/JSONL file with a ``prompt`` field.

A prompt item has an ``id`` (the file's ``id`` field, else its 0-based
position) and the ``prompt`` text. Ids must be unique: they are part of the
resumable run's row keys.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from personajudge.core.files import check_text, jsonl_lines, read_text

from .errors import DatasetError

#: Name of the built-in dataset (50 Koala prompts used by P-Soups and the Persona-judge paper).
PSOUPS = "psoups-koala-50"


@dataclass(frozen=True)
class PromptItem:
    id: str
    prompt: str

    @property
    def sha(self) -> str:
        """Short hash of the prompt text (a row is reused only for the same text)."""
        return hashlib.sha256(self.prompt.encode("utf-8")).hexdigest()[:16]


def _items(records: list, source: str, *, unescape: bool = False) -> list[PromptItem]:
    out: list[PromptItem] = []
    seen: set[str] = set()
    for i, rec in enumerate(records):
        where = f"{source}, record {i + 1}"
        if not isinstance(rec, dict):
            raise DatasetError(f"{where}: expected an object with a 'prompt' field")
        text = rec.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise DatasetError(f"{where}: missing or empty 'prompt' field")
        check_text(text, f"{where}: 'prompt'", DatasetError)
        pid = rec.get("id", i)
        if isinstance(pid, (dict, list, bool)):  # true would be the id "True"
            raise DatasetError(f"{where}: id must be a string or a number, got {json.dumps(pid)[:40]}")
        pid = str(pid).strip() if pid is not None else str(i)
        check_text(pid, f"{where}: id", DatasetError)
        if not pid or "|" in pid:
            raise DatasetError(f"{where}: id {pid!r} must be non-empty and must not contain '|'")
        if pid in seen:
            raise DatasetError(f"{where}: duplicate id {pid!r}; ids must be unique")
        seen.add(pid)
        # The shipped file keeps its source's literal "\n" escapes; they mean newlines.
        out.append(PromptItem(pid, text.replace("\\n", "\n") if unescape else text))
    if not out:
        raise DatasetError(f"{source} holds no prompts")
    return out


def builtin_prompts() -> list[PromptItem]:
    """The 50 P-Soups (Koala) evaluation prompts shipped with the package."""
    text = resources.files("personajudge.core").joinpath("data/psoups_koala_eval_50.json").read_text("utf-8")
    return _items(json.loads(text), PSOUPS, unescape=True)


def read_prompts(path: str | Path) -> list[PromptItem]:
    """Prompts from a JSONL file (one object per line) or a JSON file (a list of objects)."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():  # a run started in another folder names it from there
        raise DatasetError(f"dataset file not found: {p} (a relative path, read from the current folder {Path.cwd()})")
    text = read_text(p, "dataset file", DatasetError)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DatasetError(f"dataset file {p} is not valid JSON: {err}") from None
        except (ValueError, RecursionError) as err:  # an integer too long to convert, or nesting too deep
            raise DatasetError(
                f"dataset file {p} is not usable JSON: {str(err)[:120] or 'nested too deeply'}"
            ) from None
        return _items(data, str(p))
    records = []
    for n, line in enumerate(jsonl_lines(text), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DatasetError(
                f"{p}, line {n}: not valid JSON ({err.msg}); "
                "a JSONL dataset needs one object with a 'prompt' field per line"
            ) from None
        except (ValueError, RecursionError) as err:  # an integer too long to convert, or nesting too deep
            raise DatasetError(f"{p}, line {n}: not usable JSON ({str(err)[:120] or 'nested too deeply'})") from None
    return _items(records, str(p))


def load_prompts(dataset: str | Path | None = None, limit: int | None = None) -> list[PromptItem]:
    """The built-in prompts (``None`` or ``"psoups-koala-50"``) or a file, cut to the first ``limit``."""
    items = builtin_prompts() if dataset in (None, PSOUPS) else read_prompts(dataset)
    if limit is not None:
        if limit < 1:
            raise DatasetError(f"--limit must be at least 1, got {limit}")
        items = items[:limit]
    return items
