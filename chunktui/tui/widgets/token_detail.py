"""One token in depth: per layer, its matched chunks (deviation against threshold) and the norm profile."""

from __future__ import annotations

import math

from rich.text import Text
from textual.widgets import Static

from chunktui.engine.session import Trace
from chunktui.tui.colours import spark, token_style


class TokenDetail(Static):
    DEFAULT_CSS = "TokenDetail { height: auto; }"

    def show(self, trace: Trace | None, colours: dict[str, str], cursor: int | None, layer: int | None,
             max_rows: int = 12) -> None:
        if trace is None or not len(trace) or cursor is None:
            self.update(Text("Select a token (← →) to see its chunks layer by layer.", style="dim"))
            return
        self.update(self._describe(trace, colours, cursor, layer, max_rows))

    def _describe(self, trace: Trace, colours: dict[str, str], cursor: int, layer: int | None,
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
        out.append(f" {min(step.norms):.0f}–{max(step.norms):.0f}", style="dim")
        if step.top:
            out.append("\nnext: ", style="dim")
            out.append("  ".join(f"{piece!r} {p:.2f}" for piece, p in step.top[:4]))
        if layer is not None:
            out.append(f"\nlayer {layer}: |h| {step.norms[layer]:.1f}", style="bold")
            at_layer = [c for c in range(len(cols)) if cols.layers[c] == layer]
            at_layer.sort(key=lambda c: -float(step.score[c]))
            if not at_layer:
                out.append("\n  no chunks at this layer", style="dim")
            for c in at_layer[:max_rows]:
                out.append_text(self._row(trace, step, c, colours, no_color))
            return out
        hits = [c for c in range(len(cols)) if bool(step.hit[c])]
        if not hits:
            out.append("\nno chunk matched at any layer", style="dim")
            return out
        by_layer: dict[int, list[int]] = {}
        for c in hits:
            by_layer.setdefault(cols.layers[c], []).append(c)
        shown = 0
        for l in sorted(by_layer):
            for c in sorted(by_layer[l], key=lambda c: -float(step.score[c])):
                if shown >= max_rows:
                    out.append(f"\n  … {len(hits) - shown} more (press [ ] to pick a layer)", style="dim")
                    return out
                out.append_text(self._row(trace, step, c, colours, no_color))
                shown += 1
        return out

    @staticmethod
    def _row(trace: Trace, step, c: int, colours, no_color) -> Text:
        cols = trace.columns
        hit = bool(step.hit[c])
        value, theta = float(step.value[c]), cols.thresholds[c]
        row = Text("\n")
        row.append(f"L{cols.layers[c]:<3}", style="dim")
        row.append(f" {cols.labels[c]} ", style=token_style(colours.get(cols.labels[c]) if hit else None,
                                                          no_color=no_color))
        if cols.kinds[c] == "pa":
            row.append(f" dev {value:.3g} {'≤' if hit else '>'} θ {theta:.3g}")
        elif cols.kinds[c] == "dsc":
            row.append(" in this DSC chunk (longest-match parse of the discretised states)" if hit
                       else " not in this DSC chunk")
            return row
        else:
            row.append(f" cos {value:.3f} {'≥' if hit else '<'} θ {theta:.3f}")
        score = float(step.score[c])
        if math.isfinite(score):
            row.append(f"  score {score:+.2f}", style="dim")
        return row
