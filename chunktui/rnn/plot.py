"""Block-character line plots for the terminal (plain strings, no UI imports)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MARKS = "●○◆◇▲△"


def line_plot(series: dict[str, Sequence[float]], xs: Sequence[float] | None = None,
              width: int = 60, height: int = 12, lo: float | None = None,
              hi: float | None = None) -> str:
    """Curves on one grid; each series gets a mark, later series drawn on top.
    Returns lines: a y-axis, the grid, an x-axis and a legend."""
    ys = [np.asarray(v, float) for v in series.values()]
    n = max(len(y) for y in ys)
    xs = np.arange(n) if xs is None else np.asarray(xs, float)
    lo = min(float(np.nanmin(y)) for y in ys) if lo is None else lo
    hi = max(float(np.nanmax(y)) for y in ys) if hi is None else hi
    hi = hi if hi > lo else lo + 1.0
    grid = [[" "] * width for _ in range(height)]
    for mark, y in zip(MARKS, ys):
        for i, v in enumerate(y):
            col = round((xs[i] - xs[0]) / max(xs[-1] - xs[0], 1e-9) * (width - 1))
            row = height - 1 - round((min(max(v, lo), hi) - lo) / (hi - lo) * (height - 1))
            # Where two series meet, show it instead of hiding the earlier one.
            grid[row][col] = mark if grid[row][col] in (" ", mark) else "◉"
    lines = []
    for r, row in enumerate(grid):
        label = f"{hi:6.2f} " if r == 0 else f"{lo:6.2f} " if r == height - 1 else " " * 7
        lines.append(label + "│" + "".join(row))
    lines.append(" " * 7 + "└" + "─" * width)
    lines.append(" " * 8 + f"{xs[0]:<{width // 2}g}{xs[-1]:>{width - width // 2}g}")
    legend = "   ".join(f"{m} {name}" for m, name in zip(MARKS, series))
    lines.append(" " * 8 + legend + ("   ◉ overlap" if len(series) > 1 else ""))
    return "\n".join(lines)
