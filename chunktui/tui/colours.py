"""Token styles shared by every view: the CLI's palette, plus shapes that survive NO_COLOR."""

from __future__ import annotations

from rich.style import Style

from chunktui.palette import label_colours

__all__ = ["label_colours", "token_style", "strength_glyph", "SPARK"]

SPARK = "▁▂▃▄▅▆▇█"
# match strength (score = log(threshold / deviation) >= 0 on a hit) -> glyph; no hit is a dim dot
_GLYPHS = [(3.0, "█"), (1.5, "▓"), (0.5, "▒"), (0.0, "░")]


def token_style(colour: str | None, cursor: bool = False, no_color: bool = False) -> Style:
    """A matched token: black on its concept's colour (underlined without colour); the cursor is reversed."""
    style = Style()
    if colour is not None:
        style = Style(bold=True, underline=True) if no_color else Style(bold=True, color="black", bgcolor=colour)
    if cursor:
        style += Style(reverse=True)
    return style


def strength_glyph(score: float) -> str:
    for lower, glyph in _GLYPHS:
        if score >= lower:
            return glyph
    return "·"


def spark(values: list[float]) -> str:
    """A one-line sparkline, scaled to the values' own range."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(SPARK[min(len(SPARK) - 1, int((v - lo) / span * (len(SPARK) - 1) + 0.5))] for v in values)
