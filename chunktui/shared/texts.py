"""Reading user text files: corpora and files of sequences, with a clear message for every bad file.

No torch here: the app's Step pane reads sequence files in the UI process.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import Iterator

from chunktui.shared.errors import CorpusError

# limits every reader states when it refuses something (README "Limits")
MAX_LINE_BYTES = 4 * 2**20  # the longest JSON Lines record read (spans, sequences, journals)
MAX_JSON_DEPTH = 64  # the deepest nesting of arrays/objects in any JSON a user hands in
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def check_input_file(path: str | Path, what: str = "file", error=CorpusError) -> Path:
    """`path` if it is a readable regular file; else `error` naming the real problem.

    Not there, a folder, a symlink loop, a FIFO / device / socket ('-' and /dev/zero among them),
    no permission to read: each has its own message.
    """
    text = str(path)
    if text == "-":
        raise error(f"'-' (standard input) cannot be read as a {what}: give a file path.")
    path = Path(path).expanduser()
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise error(f"{path} is a symbolic link loop: it never reaches a file.") from None
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            if path.is_symlink():
                raise error(f"{path} is a symbolic link to a file that does not exist.") from None
            raise error(f"{path} does not exist. Give a {what}.") from None
        if err.errno == errno.EACCES:
            raise error(f"{path} cannot be reached (permission denied on a folder above it).") from None
        raise error(f"Could not read {path}: {err.strerror or err}.") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path} is a folder, not a {what}.")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode) else "a character device" if
                stat.S_ISCHR(st.st_mode) else "a block device" if stat.S_ISBLK(st.st_mode) else "a socket" if
                stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise error(f"{path} is {kind}, not a {what}: give a regular file.")
    if not os.access(path, os.R_OK):
        raise error(f"{path} cannot be read (permission denied).")
    return path


def decode_utf8(data: bytes, name: str, error=CorpusError) -> str:
    """Strict UTF-8; the error names the file, the line and the byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        col = err.start - (data.rfind(b"\n", 0, err.start) + 1)
        raise error(f"{name} is not UTF-8 text: {err.reason} at line {line}, byte {err.start} "
                    f"(byte {col} of the line, 0x{data[err.start]:02x}).") from None


def read_text(path: str | Path, what: str = "UTF-8 text file") -> str:
    path = check_input_file(path, what)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CorpusError(f"Could not read {path}: {err.strerror or err}.") from None
    text = decode_utf8(data, str(path))
    if not text.strip():
        raise CorpusError(f"The corpus {path} is empty.")
    return text


def _depth_ok(value, limit: int = MAX_JSON_DEPTH) -> bool:
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            if depth > limit:
                return False
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict) else item))
    return True


def _lone_surrogates(value) -> int:
    """How many strings (keys and values) of a parsed JSON value hold a lone surrogate."""
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            count += bool(re.search("[\ud800-\udfff]", item))
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return count


def _replace_surrogates(value):
    from chunktui.shared.safe import unsurrogate

    if isinstance(value, str):
        return unsurrogate(value)
    if isinstance(value, list):
        return [_replace_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {unsurrogate(k): _replace_surrogates(v) for k, v in value.items()}
    return value


def loads_json(text: str, surrogates: str = "replace"):
    """json.loads with the limits every loader shares; a bad document raises ValueError with a plain reason.

    - nesting deeper than MAX_JSON_DEPTH (or deep enough to exhaust Python's stack): "nested too deeply";
    - NaN / Infinity literals are refused (not JSON);
    - lone surrogates ("\\ud800", not a character): replaced by U+FFFD (`surrogates="replace"`), or refused
      (`"refuse"`: offsets into the text must stay meaningful to the caller, who says which line).
    """
    def no_constant(name):
        raise ValueError(f"{name} is not a JSON number")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except RecursionError:
        raise ValueError(f"nested too deeply (more than {MAX_JSON_DEPTH} levels of arrays/objects)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})") from None
    if not _depth_ok(value):
        raise ValueError(f"nested too deeply (more than {MAX_JSON_DEPTH} levels of arrays/objects)")
    if _SURROGATE_ESCAPE.search(text) and _lone_surrogates(value):
        if surrogates == "refuse":
            raise ValueError("holds a lone surrogate (an escape such as \\ud800 that is half of a character)")
        value = _replace_surrogates(value)
    return value


def jsonl_records(body: str, name: str, surrogates: str = "refuse") -> Iterator[tuple[int, object]]:
    """(line number, value) for each non-blank line of a JSON Lines text; a bad line is a CorpusError naming it."""
    for lineno, line in enumerate(body.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise CorpusError(f"{name}:{lineno}: the line is {len(line):,} characters long; the longest line read is "
                              f"{MAX_LINE_BYTES // 2**20} MiB. Split the text into records of one context each.")
        try:
            yield lineno, loads_json(line, surrogates)
        except ValueError as err:
            raise CorpusError(f"{name}:{lineno}: {err}.") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, object]]:
    """The one JSONL reader: (line number, value) per record of a UTF-8 .jsonl file (see `read_text`)."""
    path = Path(path).expanduser()
    yield from jsonl_records(read_text(path, "JSON Lines file"), str(path))


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


def merge_duplicate_words(words: list[str], option: str = "--words") -> tuple[list[str], str | None]:
    """Words for concepts with duplicates merged (cheese, cheese, Cheese are one concept: the labeller matches a
    word and its capitalised form alike), and a note saying what was merged; words that are not valid text
    (bytes that are not UTF-8 in the command line) are refused."""
    from chunktui.shared.safe import has_lone_surrogate, visible

    kept: dict[str, str] = {}
    merged: list[str] = []
    for word in words:
        w = word.strip()
        if not w:
            continue
        if has_lone_surrogate(w):
            raise CorpusError(f"{option}: '{visible(w)}' holds bytes that are not UTF-8 text; give the words in UTF-8.")
        key = w.casefold()
        if key in kept:
            merged.append(f"{visible(w)} (same as {visible(kept[key])})")
            continue
        kept[key] = w
    note = f"{option}: merged duplicate words: {', '.join(merged)}" if merged else None
    return list(kept.values()), note
