"""One token in depth: per layer, its matched chunks (deviation against threshold) and the norm profile.

The step (streamed to the UI) gives the strongest chunk per layer; the full
per-chunk deviations stay in the engine and arrive as a `Detail` when a token
is selected. Until then (and for a token the engine no longer holds) the
view shows what the step has.
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static

from chunktui.shared.session import Trace
from chunktui.tui.colours import spark, token_style

from chunktui.tui.plain import safe


class TokenDetail(Static):
    DEFAULT_CSS = "TokenDetail { height: 9; overflow: hidden; }"  # fixed size: updates need no layout pass

    def show(self, trace: Trace | None, colours: dict[str, str], cursor: int | None, layer: int | None,
             detail=None, max_rows: int = 12) -> None:
        if trace is None or not len(trace) or cursor is None or cursor >= len(trace):
            self.update(Text("Select a token (← →) to see its chunks layer by layer.", style="dim"), layout=False)
            return
        self.update(self._describe(trace, colours, cursor, layer, detail, max_rows), layout=False)

    def _describe(self, trace: Trace, colours: dict[str, str], cursor: int, layer: int | None, detail,
                  max_rows: int) -> Text:
        no_color = self.app.no_color
        step = trace.steps[cursor]
        cols = trace.columns
        out = Text()
        out.append(f"token {step.index} ", style="bold")
        out.append(repr(step.text), style=token_style(colours.get(trace.label_at(cursor)), no_color=no_color))
        out.append("  generated" if step.generated else "  prompt", style="dim")
        if step.logprob is not None:
            out.append(f"  log p {step.logprob:.2f}", style="dim")
        out.append("\n|h| ", style="dim")
        out.append(spark(step.norms))
        if step.norms:
            out.append(f" {min(step.norms):.0f}–{max(step.norms):.0f}", style="dim")
        if step.top:
            out.append("\nnext: ", style="dim")
            out.append("  ".join(f"{piece!r} {p:.2f}" for piece, p in step.top[:4]))
        if layer is not None and layer < len(step.norms):
            out.append(f"\nlayer {layer}: |h| {step.norms[layer]:.1f}", style="bold")
        usable = detail is not None and detail.available and detail.index == cursor and detail.layer == layer
        if usable:
            if not detail.rows:
                out.append("\n  no chunks at this layer" if layer is not None else "\nno chunk matched at any layer",
                           style="dim")
            for row in detail.rows:
                out.append_text(self._row(cols, row.column, row.value, row.score, row.hit, colours, no_color))
            if layer is None and detail.total_hits > len(detail.rows):
                out.append(f"\n  … {detail.total_hits - len(detail.rows)} more (press [ ] to pick a layer)",
                           style="dim")
            return out
        # what the step itself holds: the strongest chunk per layer
        layers = [layer] if layer is not None else range(len(step.layer_chunk))
        shown = 0
        for l in layers:
            c = step.layer_chunk[l] if l < len(step.layer_chunk) else -1
            if c < 0:
                continue
            if shown >= max_rows:
                out.append("\n  …", style="dim")
                break
            row = Text(f"\nL{l:<3}", style="dim")
            row.append(f" {safe(cols.labels[c], one=True)} ", style=token_style(colours.get(cols.labels[c]), no_color=no_color))
            row.append(f"  score {step.layer_score[l]:+.2f}", style="dim")
            out.append_text(row)
            shown += 1
        if not shown:
            out.append("\nno chunk matched" + (" at this layer" if layer is not None else " at any layer"),
                       style="dim")
        if detail is not None and not detail.available:
            out.append("\n(deviations not held by the engine any more)", style="dim")
        return out

    @staticmethod
    def _row(cols, c: int, value: float, score: float, hit: bool, colours, no_color) -> Text:
        theta = cols.thresholds[c]
        row = Text("\n")
        row.append(f"L{cols.layers[c]:<3}", style="dim")
        row.append(f" {safe(cols.labels[c], one=True)} ", style=token_style(colours.get(cols.labels[c]) if hit else None,
                                                          no_color=no_color))
        if cols.kinds[c] == "pa":
            row.append(f" dev {value:.3g} {'≤' if hit else '>'} θ {theta:.3g}")
        elif cols.kinds[c] == "dsc":
            row.append(" in this DSC chunk (longest-match parse of the discretised states)" if hit
                       else " not in this DSC chunk")
            return row
        else:
            row.append(f" cos {value:.3f} {'≥' if hit else '<'} θ {theta:.3f}")
        if math.isfinite(score):
            row.append(f"  score {score:+.2f}", style="dim")
        return row
