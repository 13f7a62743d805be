#!/usr/bin/env python3
"""Check the chunktui sample corpora.

Prints word counts of train.txt / heldout.txt, per-concept whole-word
occurrence counts, and checks questions.txt for concept words.
Exits non-zero if any minimum is not met.

Usage: python sample_data/tools/check_counts.py
"""
import re
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent

MIN_WORDS = 5000
MIN_DEFAULT = {"train": 25, "heldout": 15}
MIN_SPECIAL = {
    "cheese": {"train": 40, "heldout": 25},
    "cake": {"train": 40, "heldout": 25},
    "cheesecake": {"train": 25, "heldout": 15},
}
# Compound / plural forms that should be present somewhere in each corpus.
COMPOUNDS = ["cheeses", "cakes", "cupcake", "pancake", "cheesecakes",
             "cheeseburger", "cheese cake"]
MIN_QUESTIONS = 70
SENT_END = re.compile(r"[.!?][\"')]*$")
WORD = re.compile(r"[A-Za-z]+")


def load_concepts():
    out = []
    for line in (DATA / "concepts.txt").read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        out.append(line)
    return out


def words(text):
    return [w.lower() for w in WORD.findall(text)]


def main():
    ok = True
    concepts = load_concepts()
    if len(concepts) < 34:
        print(f"FAIL: only {len(concepts)} concepts (need >= 34)")
        ok = False
    for c in concepts:
        if c != c.lower() or not c.isalpha():
            print(f"FAIL: concept {c!r} is not a lower-case single word")
            ok = False
    if len(set(concepts)) != len(concepts):
        print("FAIL: duplicate concepts")
        ok = False

    texts = {}
    counts = {}
    for name in ("train", "heldout"):
        path = DATA / f"{name}.txt"
        raw = path.read_text(encoding="utf-8")
        texts[name] = raw
        paras = [p for p in raw.splitlines() if p.strip()]
        w = words(raw)
        print(f"{name}.txt: {len(w)} words, {len(paras)} paragraphs, "
              f"{len(raw)} chars")
        if len(w) < MIN_WORDS:
            print(f"FAIL: {name}.txt has {len(w)} words (< {MIN_WORDS})")
            ok = False
        for i, p in enumerate(paras, 1):
            if not SENT_END.search(p.strip()):
                print(f"FAIL: {name}.txt paragraph {i} does not end a sentence: "
                      f"...{p.strip()[-40:]!r}")
                ok = False
        try:
            raw.encode("ascii")
        except UnicodeEncodeError:
            print(f"note: {name}.txt contains non-ASCII characters")
        from collections import Counter
        counts[name] = Counter(w)
        low = raw.lower()
        for comp in COMPOUNDS:
            n = len(re.findall(r"\b" + re.escape(comp) + r"\b", low))
            if n == 0:
                print(f"FAIL: {name}.txt lacks compound/plural form {comp!r}")
                ok = False

    # shared sentences between corpora
    def sents(t):
        return {s.strip().lower() for s in re.split(r"(?<=[.!?])\s+", t)
                if len(s.split()) >= 6}
    shared = sents(texts["train"]) & sents(texts["heldout"])
    if shared:
        print(f"FAIL: {len(shared)} sentences shared between train and heldout:")
        for s in sorted(shared)[:10]:
            print("   ", s)
        ok = False

    print()
    print(f"{'concept':<12} {'train':>6} {'min':>4} {'heldout':>8} {'min':>4}")
    mins = {}
    for c in concepts:
        row = []
        for name in ("train", "heldout"):
            need = MIN_SPECIAL.get(c, MIN_DEFAULT)[name]
            have = counts[name][c]
            mins.setdefault(name, []).append(have)
            row.append((have, need))
            if have < need:
                ok = False
        flag = "" if all(h >= n for h, n in row) else "  <-- FAIL"
        print(f"{c:<12} {row[0][0]:>6} {row[0][1]:>4} {row[1][0]:>8} "
              f"{row[1][1]:>4}{flag}")
    print(f"min per-concept count: train={min(mins['train'])} "
          f"heldout={min(mins['heldout'])}")
    for comp in COMPOUNDS:
        pat = r"\b" + re.escape(comp) + r"\b"
        nt = len(re.findall(pat, texts["train"].lower()))
        nh = len(re.findall(pat, texts["heldout"].lower()))
        print(f"  form {comp!r}: train={nt} heldout={nh}")

    qpath = DATA / "questions.txt"
    if qpath.exists():
        qs = [q.strip() for q in qpath.read_text(encoding="utf-8").splitlines()
              if q.strip()]
        print(f"\nquestions.txt: {len(qs)} questions")
        if len(qs) < MIN_QUESTIONS:
            print(f"FAIL: fewer than {MIN_QUESTIONS} questions")
            ok = False
        if len(set(q.lower() for q in qs)) != len(qs):
            print("FAIL: duplicate questions")
            ok = False
        cset = set(concepts)
        for q in qs:
            if not q.endswith("?"):
                print(f"FAIL: question does not end with '?': {q!r}")
                ok = False
            # whole words, and also concept words inside longer words
            # (e.g. 'cheesecake', 'rainy', 'sunday') are reported.
            hit = [w for w in words(q) if w in cset]
            if hit:
                print(f"FAIL: question contains concept word(s) {hit}: {q!r}")
                ok = False
            sub = sorted({c for c in concepts for w in words(q)
                          if c in w and w != c and len(c) >= 4})
            if sub:
                print(f"  note: question has a concept inside a longer word "
                      f"{sub}: {q!r}")
    else:
        print("\nFAIL: questions.txt missing")
        ok = False

    print("\nRESULT:", "PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
