"""Chunk cards: what a chunk matches, in a form a person can read.

A card holds, for one chunk (any kind): its layer, how often it matches a
corpus (match rate), the token texts it matches most often, its top-matching
tokens with their context, and an automatic short label made from its most
frequent tokens ("the/a/an"). Cards are computed with the one packed matcher
(`matching.py`), so they agree with what the app and `chunktui scan` show.

The app's Chunks pane and reports read cards from `chunk.extra["card"]`
(written by discovery) or build them here for any dictionary and text.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch

from chunktui.engine.dictionary import Chunk
from chunktui.engine.corpus import HiddenStates
from chunktui.engine.matching import PackedDictionary

LABEL_TOKENS = 3  # at most this many token texts in an automatic label
LABEL_SHARE = 0.6  # ... or fewer, once they cover this share of the chunk's matches


@dataclass
class Example:
    """One matching token in its context: `before` + [token] + `after`."""

    token: str
    before: str
    after: str
    score: float  # matching score (>= 0 when it matches); for direction chunks log(cos / threshold)
    value: float  # cosine (direction) or deviation (PA)

    def to_json(self) -> dict:
        return {"token": self.token, "before": self.before, "after": self.after, "score": round(self.score, 4),
                "value": round(self.value, 4)}


@dataclass
class ChunkCard:
    id: str
    label: str
    layer: int
    kind: str
    matches: int  # tokens matched in the corpus
    tokens: int  # tokens in the corpus
    top_tokens: list[tuple[str, int]] = field(default_factory=list)  # most frequent matched token texts
    examples: list[Example] = field(default_factory=list)  # top-matching tokens, best first
    auto_label: str = ""

    @property
    def match_rate(self) -> float:
        return self.matches / self.tokens if self.tokens else 0.0

    def to_json(self) -> dict:
        return {"id": self.id, "label": self.label, "layer": self.layer, "kind": self.kind, "matches": self.matches,
                "tokens": self.tokens, "match_rate": round(self.match_rate, 6),
                "top_tokens": [[t, n] for t, n in self.top_tokens], "examples": [e.to_json() for e in self.examples],
                "auto_label": self.auto_label}

    @staticmethod
    def from_json(doc: dict) -> "ChunkCard":
        return ChunkCard(id=doc["id"], label=doc["label"], layer=int(doc["layer"]), kind=doc.get("kind", "direction"),
                         matches=int(doc.get("matches", 0)), tokens=int(doc.get("tokens", 0)),
                         top_tokens=[(str(t), int(n)) for t, n in doc.get("top_tokens", [])],
                         examples=[Example(e["token"], e["before"], e["after"], float(e["score"]), float(e["value"]))
                                   for e in doc.get("examples", [])],
                         auto_label=doc.get("auto_label", ""))

    def text(self) -> str:
        """A few plain lines for reports and the terminal."""
        head = (f"{self.label}  [{self.id}]  layer {self.layer}  {self.kind}  matches {self.matches}/{self.tokens} "
                f"({100 * self.match_rate:.2f}%)")
        tops = ", ".join(f"{t!r} {n}" for t, n in self.top_tokens) or "(matches nothing here)"
        lines = [head, f"  most frequent: {tops}"]
        for e in self.examples:
            lines.append(f"  {e.before}[{e.token}]{e.after}   ({e.value:.3f})")
        return "\n".join(lines)


def _shown(piece: str) -> str:
    """A token's text for display: stripped, lower-cased, whitespace shown as a mark."""
    text = piece.strip().lower()
    return text if text else "⏎" if "\n" in piece else "␣"


def auto_label(counts: Sequence[tuple[str, int]]) -> str:
    """A short label from the most frequent token texts: up to 3, fewer once they cover 60 % of matches."""
    counts = [(t, n) for t, n in counts if n > 0]
    if not counts:
        return "(none)"
    total = sum(n for _, n in counts)
    picked, covered = [], 0
    for text, n in counts[:LABEL_TOKENS]:
        picked.append(text)
        covered += n
        if covered >= LABEL_SHARE * total:
            break
    return "/".join(picked)


def _context(source: str, a: int, b: int, chars: int) -> tuple[str, str, str]:
    before = source[max(0, a - chars):a].replace("\n", " ")
    after = source[b:b + chars].replace("\n", " ")
    return before, source[a:b].replace("\n", " "), after


@torch.no_grad()
def build_cards(chunks: Sequence[Chunk], hs: HiddenStates, examples: int = 3, top: int = 5, context: int = 30,
                device: torch.device | str = "cpu") -> list[ChunkCard]:
    """A card for every chunk whose layer hs has (in the order given), from matching hs."""
    axis = {layer: s for s, layer in enumerate(hs.layers)}
    usable = [c for c in chunks if c.layer in axis]
    if not usable:
        return []
    packed = PackedDictionary(usable, hs.H.shape[-1], hs.layers, device)
    result = packed.match(hs.H)
    order = {id(c): i for i, c in enumerate(packed.chunks)}
    texts = [_shown(p) for p in hs.token_texts()]
    T = len(texts)
    cards = []
    for chunk in usable:
        c = order[id(chunk)]
        hit = result.hit[:, c].cpu()
        score = result.score[:, c].float().cpu()
        value = result.value[:, c].float().cpu()
        matched = hit.nonzero().flatten()
        counts = Counter(texts[i] for i in matched.tolist()).most_common()
        best = matched[score[matched].argsort(descending=True)[:examples]].tolist()
        shown = []
        for i in best:
            before, token, after = _context(hs.source, hs.tokens.starts[i], hs.tokens.ends[i], context)
            shown.append(Example(token=token, before=before, after=after, score=float(score[i]), value=float(value[i])))
        cards.append(ChunkCard(id=chunk.id, label=chunk.label, layer=chunk.layer, kind=chunk.kind,
                               matches=len(matched), tokens=T, top_tokens=counts[:top], examples=shown,
                               auto_label=auto_label(counts)))
    return cards


def stored_card(chunk: Chunk) -> ChunkCard | None:
    """The card written into the dictionary when the chunk was made (discovery), if any."""
    doc = chunk.extra.get("card") if isinstance(chunk.extra, dict) else None
    if not isinstance(doc, dict):
        return None
    try:
        card = ChunkCard.from_json(doc)
    except (KeyError, TypeError, ValueError):
        return None
    card.label, card.id = chunk.label, chunk.id  # the chunk's own names win
    return card


def cards_to_json(cards: Sequence[ChunkCard]) -> list[dict]:
    return [c.to_json() for c in cards]
