#!/usr/bin/env python3
"""Build sample_data/pos.jsonl from tools/pos_source.txt.

pos_source.txt holds one sentence per line as whitespace-separated
word/TAG tokens (Universal POS tags), e.g.  The/DET cat/NOUN sat/VERB ./PUNCT
Lines starting with '#' are comments. The tag is the part after the LAST '/'.

The script detokenises (no space before . , ! ? ; : ) and clitics like 's,
no space after opening brackets/quotes), computes character offsets and
checks that every non-space character is covered by exactly one span and
that spans do not overlap.

Usage: python sample_data/tools/make_pos.py
"""
import json
import sys
from collections import Counter
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
SRC = TOOLS / "pos_source.txt"
OUT = TOOLS.parent / "pos.jsonl"
UPOS = {"NOUN", "VERB", "ADJ", "ADV", "PRON", "DET", "ADP", "AUX", "CCONJ",
        "SCONJ", "NUM", "PART", "PROPN", "INTJ", "PUNCT", "SYM", "X"}
NO_SPACE_BEFORE = {".", ",", "!", "?", ";", ":", ")", "'s", "n't", "'"}
NO_SPACE_AFTER = {"("}
MIN_WORDS = 2500


def build(tokens):
    text, spans = "", []
    prev = None
    for word, tag in tokens:
        if prev is not None and word not in NO_SPACE_BEFORE \
                and prev not in NO_SPACE_AFTER:
            text += " "
        start = len(text)
        text += word
        spans.append([start, len(text), tag])
        prev = word
    return text, spans


def check(text, spans):
    covered = [0] * len(text)
    last_end = 0
    for s, e, _ in spans:
        assert s >= last_end, ("overlap or unsorted", text, s, e)
        last_end = e
        for i in range(s, e):
            covered[i] += 1
    for i, ch in enumerate(text):
        if ch.isspace():
            assert covered[i] == 0, ("space inside span", text, i)
        else:
            assert covered[i] == 1, ("char not covered once", text, i, ch)


def main():
    records, tags, nwords = [], Counter(), 0
    for n, line in enumerate(SRC.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        toks = []
        for item in line.split():
            word, sep, tag = item.rpartition("/")
            if not sep or not word or tag not in UPOS:
                sys.exit(f"line {n}: bad token {item!r}")
            if tag == "PUNCT" and any(c.isalnum() for c in word):
                sys.exit(f"line {n}: PUNCT on a word {item!r}")
            if tag != "PUNCT" and not any(c.isalnum() for c in word):
                sys.exit(f"line {n}: punctuation not tagged PUNCT {item!r}")
            toks.append((word, tag))
        if toks[-1][1] != "PUNCT":
            sys.exit(f"line {n}: sentence does not end with punctuation")
        text, spans = build(toks)
        check(text, spans)
        for (s, e, t), (w, _) in zip(spans, toks):
            assert text[s:e] == w
        records.append({"text": text, "spans": spans})
        tags.update(t for _, t in toks)
        nwords += sum(1 for _, t in toks if t != "PUNCT")
    with OUT.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    total = sum(tags.values())
    print(f"wrote {OUT.name}: {len(records)} sentences, {total} tokens, "
          f"{nwords} words (non-PUNCT)")
    print("tags:", dict(tags.most_common()))
    if nwords < MIN_WORDS:
        print(f"FAIL: fewer than {MIN_WORDS} words")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
