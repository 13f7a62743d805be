#!/usr/bin/env python3
"""Check sample_data/categories.jsonl: everyday questions in six classes shaped like TREC's coarse classes.

Each line is {"category": CLASS, "question": TEXT}; CLASS is one of abbreviation, description, entity, human,
location, numeric. Checks: at least 25 questions per class, no duplicates, each ends with '?', and no question
holds a concept word of concepts.txt (whole word, case-insensitive), so occurrence of a concept in a continuation
is never copied from the question.

Usage: python sample_data/tools/check_categories.py
"""
import json
import re
import sys
from collections import Counter
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent
CLASSES = ("abbreviation", "description", "entity", "human", "location", "numeric")
MIN_PER_CLASS = 25


def main() -> int:
    concepts = {line.strip() for line in (DATA / "concepts.txt").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")}
    rows = [json.loads(line) for line in (DATA / "categories.jsonl").read_text(encoding="utf-8").splitlines()
            if line.strip()]
    problems = []
    counts = Counter(r["category"] for r in rows)
    for cls in CLASSES:
        if counts[cls] < MIN_PER_CLASS:
            problems.append(f"{cls}: {counts[cls]} questions (< {MIN_PER_CLASS})")
    for cls in set(counts) - set(CLASSES):
        problems.append(f"unknown class {cls!r}")
    seen = set()
    for r in rows:
        q = r["question"]
        if q in seen:
            problems.append(f"duplicate: {q}")
        seen.add(q)
        if not q.endswith("?"):
            problems.append(f"not a question: {q}")
        hit = {w.lower() for w in re.findall(r"[A-Za-z]+", q)} & concepts
        if hit:
            problems.append(f"concept word {sorted(hit)} in: {q}")
    for cls in CLASSES:
        print(f"{cls:<14}{counts[cls]:>4}")
    for p in problems:
        print("FAIL", p)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
