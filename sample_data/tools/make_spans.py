#!/usr/bin/env python3
"""Build sample_data/spans.jsonl from tools/spans_source.txt.

Source lines contain inline markup [[label: words]]. The markup is removed
and character offsets (end exclusive) are computed for each marked span.
Every span is verified: text[start:end] == marked words.

Usage: python sample_data/tools/make_spans.py
"""
import json
import re
import sys
from collections import Counter
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
SRC = TOOLS / "spans_source.txt"
OUT = TOOLS.parent / "spans.jsonl"
MARK = re.compile(r"\[\[([a-z_]+):\s*([^\]]+?)\]\]")
MIN_LINES = 150
MIN_PER_LABEL = 80


def parse(line):
    text, spans, pos = [], [], 0
    for m in MARK.finditer(line):
        text.append(line[pos:m.start()])
        start = sum(len(t) for t in text)
        words = m.group(2)
        text.append(words)
        spans.append([start, start + len(words), m.group(1)])
        pos = m.end()
    text.append(line[pos:])
    return "".join(text), spans


def main():
    records = []
    for n, line in enumerate(SRC.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "[[" in MARK.sub("", line) or "]]" in MARK.sub("", line):
            sys.exit(f"line {n}: malformed markup: {line}")
        text, spans = parse(line)
        expected = [m.group(2) for m in MARK.finditer(line)]
        for (s, e, lab), want in zip(spans, expected):
            assert text[s:e] == want, (n, text, s, e, want)
            # spans must sit on word boundaries
            assert s == 0 or not text[s - 1].isalnum(), (n, want)
            assert e == len(text) or not text[e].isalnum(), (n, want)
        records.append({"text": text, "spans": spans})
    with OUT.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    labels = Counter(lab for r in records for _, _, lab in r["spans"])
    print(f"wrote {OUT.name}: {len(records)} lines, spans per label: "
          f"{dict(labels)}")
    ok = len(records) >= MIN_LINES and len(labels) >= 3 and all(
        v >= MIN_PER_LABEL for v in labels.values())
    # re-read and verify
    for line in OUT.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        for s, e, lab in r["spans"]:
            assert 0 <= s < e <= len(r["text"])
    if not ok:
        print("FAIL: need >= %d lines and >= %d spans for each of >= 3 labels"
              % (MIN_LINES, MIN_PER_LABEL))
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
