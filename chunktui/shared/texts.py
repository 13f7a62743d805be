"""Reading user text files: corpora and files of sequences, with a clear message for every bad file.

No torch here: the app's Step pane reads sequence files in the UI process.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

from chunktui.shared.errors import CorpusError


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path} does not exist (or is a folder). Give a UTF-8 text file.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except OSError as err:
        raise CorpusError(f"Could not read {path}: {err.strerror or err}.") from None
    if not text.strip():
        raise CorpusError(f"The corpus {path} is empty.")
    return text


def jsonl_records(body: str, name: str) -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON Lines text; a bad line is a CorpusError naming it."""
    for lineno, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{name}:{lineno}: not valid JSON ({err.msg}).") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """The one JSONL reader: (line number, value) per record of a UTF-8 .jsonl file (see `read_text`)."""
    path = Path(path).expanduser()
    yield from jsonl_records(read_text(path), str(path))


def read_sequences(path: str | Path) -> list[tuple[str, str]]:
    """(id, text) pairs from a .jsonl file ({"id", "text"} per line) or a text file (one per non-empty line)."""
    path = Path(path).expanduser()
    body = read_text(path)  # missing, unreadable, non-UTF-8 and empty files get their message there
    out: list[tuple[str, str]] = []
    if path.suffix.lower() in (".jsonl", ".json"):
        for lineno, rec in jsonl_records(body, path.name):
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise CorpusError(f"{path.name}:{lineno}: expected an object with a \"text\" field.")
            out.append((str(rec.get("id", f"line {lineno}")), rec["text"]))
    else:
        out = [(f"line {lineno}", line.strip()) for lineno, line in enumerate(body.splitlines(), 1) if line.strip()]
    if not out:
        raise CorpusError(f"{path} holds no sequences.")
    return out


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a text file (one per non-empty line; lines starting with # are skipped) or a .jsonl file
    (an object per line with a "prompt" field, or "text")."""
    path = Path(path).expanduser()
    body = read_text(path)
    if path.suffix.lower() == ".jsonl":
        out = []
        for lineno, rec in jsonl_records(body, path.name):
            value = rec.get("prompt", rec.get("text")) if isinstance(rec, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise CorpusError(f"{path.name}:{lineno}: expected an object with a \"prompt\" (or \"text\") field.")
            out.append(value.strip())
    else:
        out = [p.strip() for p in body.splitlines() if p.strip() and not p.strip().startswith("#")]
    if not out:
        raise CorpusError(f"{path} holds no prompts (blank lines and lines starting with # are skipped).")
    return out
