"""The token-level colour decision, as plain data (no torch): which concept a token shows, and how sure.

A dictionary holds one chunk per concept and layer, each calibrated on its own
(a false-positive rate per chunk). A token is compared with every chunk, so
"any chunk matched" is wrong far more often than any one chunk is. The
decision a token's colour follows instead pools a concept's layers:

    evidence_C(t) = sum over the voting layers l of clip(score_{C@l}(t), -cap, +cap)

where score = ln(threshold / deviation) (>= 0 exactly when the chunk matches),
so each layer votes between -cap and +cap. Layer 0 (the embedding: a lookup
of the token itself, not a state) does not vote by default. A token shows C
when evidence_C(t) >= required_C; when several concepts pass, the one furthest
above its requirement wins. `required_C` is calibrated on the training text
(`engine/calibrate.py`) so that at most `budget` of the training tokens that
are not C get C, and at most `budget` of the tokens that are no concept at all
get any colour.

The confidence shown beside a match is the training precision at that level of
evidence: of the training tokens whose evidence for C was at least this high,
the share that were C (and how many there were).

Dictionaries made before this rule have none stored: they get the fallback
`TokenRule.uncalibrated`, which colours a token when any chunk at a voting
layer matches, and says so.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

RULE_KIND = "layer-evidence"
DEFAULT_BUDGET = 0.01  # at most 1% of the training tokens that are no concept get a colour
DEFAULT_CAP = 2.0  # each layer votes in [-2, +2] (a deviation e^2 ~ 7.4 times inside or outside the threshold)
EXPLAIN_SCORE = "score = ln(threshold / deviation): above 0 the chunk matches; +0.7 means half the threshold"


@dataclass
class TokenRule:
    """How a token's colour is decided from its chunk scores (stored in the dictionary's notes)."""

    kind: str = RULE_KIND  # layer-evidence (calibrated) | any-layer (uncalibrated fallback)
    voting_layers: list[int] | None = None  # None: every layer except 0
    cap: float = DEFAULT_CAP
    required: dict[str, float] = field(default_factory=dict)  # label -> evidence needed
    budget: float = DEFAULT_BUDGET
    per_label: dict[str, dict] = field(default_factory=dict)  # label -> training figures (see calibrate)
    overall: dict = field(default_factory=dict)  # tokens, non_concept, coloured_non_concept, rate
    source: dict = field(default_factory=dict)  # corpus, tokens, context mode of the calibration text
    note: str = ""

    @property
    def calibrated(self) -> bool:
        return self.kind == RULE_KIND

    @staticmethod
    def uncalibrated(layers: list[int], note: str | None = None) -> "TokenRule":
        voting = [l for l in layers if l != 0] or list(layers)
        return TokenRule(kind="any-layer", voting_layers=voting, note=note or (
            "this dictionary has no calibrated colour rule: a token is coloured when any chunk at layers 1+ matches, "
            "which is wrong far more often than one chunk is; add one with `chunktui calibrate` (or rebuild)"))

    def voting(self, layers: list[int]) -> list[int]:
        """The layers (of those given) whose chunks vote."""
        if self.voting_layers is not None:
            chosen = set(self.voting_layers)
            return [l for l in layers if l in chosen]
        return [l for l in layers if l != 0] or list(layers)

    def describe(self) -> str:
        """One line for a legend or a report."""
        if not self.calibrated:
            return self.note
        o = self.overall
        rate = o.get("rate")
        measured = f"; {rate:.2%} of them on its training text" if isinstance(rate, (int, float)) else ""
        return (f"a token shows a concept when the concept's chunks at layers {span_text(self.voting_layers)} agree "
                f"enough (evidence calibrated to colour at most {self.budget:.1%} of non-concept tokens"
                f"{measured})")

    def confidence(self, label: str | None, evidence: float | None) -> tuple[float, int] | None:
        """(precision, n): of the training tokens with at least this evidence for `label`, the share that were it."""
        stats = self.per_label.get(label) if label is not None else None
        if not stats or evidence is None or not self.calibrated:
            return None
        pos, neg = stats.get("pos_evidence") or [], stats.get("neg_evidence") or []
        top = max(pos[-1] if pos else float("-inf"), neg[-1] if neg else float("-inf"))
        level = min(float(evidence), top)
        tp = len(pos) - bisect.bisect_left(pos, level)
        fp = len(neg) - bisect.bisect_left(neg, level)
        if tp + fp == 0:
            return None
        # stored positives may be a sample of all of them: scale back to counts
        scale = stats.get("positives", len(pos)) / max(len(pos), 1)
        tp_n = tp * scale
        return tp_n / (tp_n + fp), int(round(tp_n + fp))

    def to_json(self) -> dict:
        return {"kind": self.kind, "voting_layers": self.voting_layers, "cap": self.cap, "required": self.required,
                "budget": self.budget, "per_label": self.per_label, "overall": self.overall, "source": self.source,
                "note": self.note}

    @staticmethod
    def from_json(obj: dict) -> "TokenRule":
        if not isinstance(obj, dict):
            raise ValueError("the colour rule is not a JSON object")
        kind = str(obj.get("kind", RULE_KIND))
        if kind not in (RULE_KIND, "any-layer"):
            raise ValueError(f"unknown colour rule kind {kind!r}")
        voting = obj.get("voting_layers")
        if voting is not None and not (isinstance(voting, list) and all(isinstance(x, int) for x in voting)):
            raise ValueError("voting_layers must be a list of layer numbers")
        required = obj.get("required") or {}
        if not isinstance(required, dict) or not all(isinstance(v, (int, float)) for v in required.values()):
            raise ValueError("required must map labels to numbers")
        per_label = obj.get("per_label") or {}
        if not isinstance(per_label, dict):
            raise ValueError("per_label must be a JSON object")
        return TokenRule(kind=kind, voting_layers=voting, cap=float(obj.get("cap", DEFAULT_CAP)),
                         required={str(k): float(v) for k, v in required.items()},
                         budget=float(obj.get("budget", DEFAULT_BUDGET)), per_label=per_label,
                         overall=obj.get("overall") or {}, source=obj.get("source") or {}, note=str(obj.get("note", "")))


def confidence_text(rule: "TokenRule | None", label: str | None, evidence: float | None, agree: int | None,
                    voters: int | None = None) -> str:
    """'27/30 layers · 96% right on training (n 45)': what the main views print beside a match."""
    parts = []
    if agree is not None and agree >= 0:
        parts.append(f"{agree}/{voters} layers" if voters else f"{agree} layers")
    conf = rule.confidence(label, evidence) if rule is not None else None
    if conf is not None:
        p, n = conf
        parts.append(f"{p:.0%} right in training (n {n})")
    elif rule is not None and not rule.calibrated:
        parts.append("uncalibrated")
    return " · ".join(parts)


def span_text(layers) -> str:
    if not layers:
        return "1+"
    layers = sorted(layers)
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))
