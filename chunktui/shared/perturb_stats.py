"""Error bars and fluency checks for perturbation runs (no torch: the app and the CLI read them too).

Intervals. An arm's occurrence rate is k of n continuations that contain the
concept word. Its interval is the Wilson score interval at 95% (z = 1.96).
The rows of an arm are the prompts x samples continuations, drawn with
different seeds; for a fixed set of prompts they are independent, so the
interval covers sampling noise on these prompts (it does not say how the rate
would move on other prompts). The change between two arms gets Newcombe's
hybrid score interval (method 10 of Newcombe 1998), built from the two Wilson
intervals; it treats the arms as independent, which is conservative here
because both arms share prompts and seeds.

Degenerate answers. A continuation is degenerate when its words (lower-cased
runs of letters and digits, `\\w+`) show one of:
  - empty: no word at all;
  - loop: the same run of 1 to 3 words repeated at least 3 times back to back
    ("cheese cheese cheese", "your call your call your call");
  - low variety: at least 12 words, of which fewer than 35% are distinct.
These rules were fixed before any run was measured; the control arm's share
is the baseline (how often the unperturbed model trips them).
"""

from __future__ import annotations

import math
import re

Z95 = 1.959963984540054
INTERVAL = "Wilson score 95% per arm; change: Newcombe hybrid score 95% (arms treated as independent)"
DEGENERATE_RULE = ("no word; or a run of 1-3 words repeated 3+ times back to back; or >= 12 words with fewer than "
                   "35% distinct (words: lower-cased \\w+ runs)")
LOOP_MAX_N, LOOP_REPEATS, VARIETY_MIN_WORDS, VARIETY_MIN_SHARE = 3, 3, 12, 0.35

_WORD = re.compile(r"\w+")


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval for k successes in n trials; (0, 1) when n is 0."""
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is not between 0 and n={n}")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)  # exact ends: no round-off crumbs at 0 and 1
    hi = 1.0 if k == n else min(1.0, centre + half)
    return lo, hi


def newcombe_difference(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Interval for p2 - p1 (Newcombe's hybrid score method from the two Wilson intervals)."""
    p1, p2 = (k1 / n1 if n1 else 0.0), (k2 / n2 if n2 else 0.0)
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p2 - p1
    lo = d - math.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2)
    hi = d + math.sqrt((u2 - p2) ** 2 + (p1 - l1) ** 2)
    return max(-1.0, lo), min(1.0, hi)


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text or "")]


def degenerate_reason(text: str) -> str | None:
    """Why a continuation is degenerate ("empty", "loop", "low variety"), or None when it is not."""
    ws = words(text)
    if not ws:
        return "empty"
    for n in range(1, LOOP_MAX_N + 1):
        for start in range(0, len(ws) - n * LOOP_REPEATS + 1):
            gram = ws[start:start + n]
            if all(ws[start + r * n:start + (r + 1) * n] == gram for r in range(1, LOOP_REPEATS)):
                return "loop"
    if len(ws) >= VARIETY_MIN_WORDS and len(set(ws)) / len(ws) < VARIETY_MIN_SHARE:
        return "low variety"
    return None


def is_degenerate(text: str) -> bool:
    return degenerate_reason(text) is not None


def pct(x: float | None) -> str:
    return "?" if x is None else f"{100 * x:.0f}%"


def rate_text(rate: float | None, ci: list | tuple | None = None, signed: bool = False, sep: str = " ") -> str:
    """"25% [7-59]" (a rate with its interval, in percent); signed for a change: "+25 [-10,+60]"."""
    if rate is None:
        return "?"
    if signed:
        head = f"{100 * rate:+.0f}"
        return head if not ci else f"{head}{sep}[{100 * ci[0]:+.0f},{100 * ci[1]:+.0f}]"
    return pct(rate) if not ci else f"{pct(rate)}{sep}[{100 * ci[0]:.0f}-{100 * ci[1]:.0f}]"


def fluency_text(f: dict | None) -> str:
    """"ppl 4.1, degenerate 1/8" for an arm's fluency summary."""
    if not f:
        return "?"
    ppl = f.get("perplexity")
    return f"ppl {'?' if ppl is None else format(ppl, '.1f')}, degenerate {f.get('degenerate', 0)}/{f.get('rows', 0)}"
