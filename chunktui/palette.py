"""One colour per concept, the same in the CLI, the app and exported reports (no torch, no UI imports)."""

from __future__ import annotations

# a palette that reads on dark and light terminals; concept i gets colour i mod len
PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000", "#ffd8b1",
           "#000075", "#808080"]


def label_colours(labels: list[str]) -> dict[str, str]:
    """Labels sorted, then coloured in turn, so a concept's colour depends only on the dictionary's labels."""
    return {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(sorted(set(labels)))}
