"""One colour per concept, the same in the CLI, the app and exported reports (no torch, no UI imports)."""

from __future__ import annotations

import colorsys

# a palette that reads on dark and light terminals; the first labels take these in turn
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1",
           "#000075", "#808080"]


def _extra(i: int) -> str:
    """The i-th colour past the fixed palette: hues a golden angle apart, three lightness bands, all distinct."""
    hue = (0.11 + i * 0.381966) % 1.0
    light, sat = ((0.72, 0.85), (0.55, 0.75), (0.82, 0.6))[(i // 7) % 3]
    r, g, b = colorsys.hls_to_rgb(hue, light, sat)
    return "#{:02x}{:02x}{:02x}".format(round(r * 255), round(g * 255), round(b * 255))


def palette(n: int) -> list[str]:
    """n colours, no two the same (the fixed palette first, then generated ones that skip any repeat)."""
    out = list(PALETTE[:n])
    seen = set(out)
    i = 0
    while len(out) < n:
        c = _extra(i)
        i += 1
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


def label_colours(labels: list[str]) -> dict[str, str]:
    """Labels sorted, then coloured in turn, so a concept's colour depends only on the dictionary's labels;
    every label gets its own colour, however many there are."""
    names = sorted(set(labels))
    return dict(zip(names, palette(len(names))))
