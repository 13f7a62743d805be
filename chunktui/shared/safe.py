"""Text from users, files and models made safe to show: on a terminal, in the app, in reports.

Nothing a prompt, a corpus, a dictionary label, a file name or a model's output
holds may reach a terminal as a control sequence (ESC[2J clears the screen,
OSC 52 writes the clipboard), reorder what a reader sees (bidi overrides) or
break an encoder (lone surrogates). `visible` maps each such character to a
visible stand-in and leaves everything else as it was:

- C0 controls (newline kept unless `newlines=False`; tab kept unless `tab` is given)
  -> the Control Pictures block (ESC -> U+241B, NUL -> U+2400);
- DEL -> U+2421; C1 controls (U+0080..U+009F, the 8-bit CSI among them) -> the text "\\x9b";
- bidirectional overrides, embeddings, isolates and marks (U+202A..U+202E, U+2066..U+2069,
  U+200E, U+200F, U+061C) -> the text "\\u202e";
- lone surrogates ("\\ud800" in JSON, or bytes decoded with surrogateescape) -> U+FFFD.

Markup is a separate matter: the app and the CLI show user text as plain
Text/Content objects (never parsed as markup); `visible` only handles what
reaches the terminal byte for byte. No torch and no UI imports.
"""

from __future__ import annotations

import re

BIDI = "\u200e\u200f\u061c\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f" + BIDI + "\ud800-\udfff]")


def _stand_in(c: int) -> str:
    if c < 32:
        return chr(0x2400 + c)
    if c == 127:
        return "\u2421"
    if 0xD800 <= c <= 0xDFFF:
        return "\ufffd"
    if c <= 0x9F:
        return f"\\x{c:02x}"
    return f"\\u{c:04x}"


def visible(text, newlines: bool = True, tab: str | None = "\t") -> str:
    """`text` with control, bidi-override and lone-surrogate characters replaced by visible stand-ins.

    newlines=False also replaces "\\n" (one-line places: a status bar, a table cell, a file name in a
    message); `tab` is what a tab becomes (None: its visible symbol).
    """
    text = text if isinstance(text, str) else str(text)
    if not _UNSAFE.search(text):
        return text

    def sub(m: re.Match) -> str:
        ch = m.group()
        if ch == "\n" and newlines:
            return ch
        if ch == "\t" and tab is not None:
            return tab
        return _stand_in(ord(ch))

    return _UNSAFE.sub(sub, text)


def one_line(text, limit: int | None = None) -> str:
    """`visible` for one-line places, cut to `limit` characters with an ellipsis."""
    text = visible(text, newlines=False, tab=" ")
    return text if limit is None or len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def unsurrogate(text: str) -> str:
    """Lone surrogates (which no UTF-8 encoder accepts) replaced by U+FFFD; other text unchanged."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text) if re.search("[\ud800-\udfff]", text) else text


def has_unsafe(text: str) -> bool:
    """True when `visible` would change `text` (a tab or newline counts: one-line fields)."""
    return bool(_UNSAFE.search(text))


def has_lone_surrogate(text: str) -> bool:
    return bool(re.search("[\ud800-\udfff]", text))
