"""One token in depth: the concept it shows and why, then every layer's raw match, and the norm profile.

The step (streamed to the UI) gives the strongest chunk per layer, the concept
the colour rule shows and its evidence; the full per-chunk deviations stay in
the engine and arrive as a `Detail` when a token is selected (in the
all-layers view: the shown concept's chunk at every layer, matched or not, and
the best match of any other concept there). Until then (and for a token the
engine no longer holds) the view shows what the step has.

The panel takes the height its column gives it (it grows with the terminal)
and scrolls (mouse wheel, or shift+↑ shift+↓ from the trace). It draws on
Textual's line API: the text is wrapped once per change, a new text repaints
only the lines that differ, and a longer or shorter text changes the scroll
range without a layout pass of the screen (a key that moves the cursor costs
a few lines, not a screen).
"""

from __future__ import annotations

import math

from rich.text import Text
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.visual import Visual, visualize

from chunktui.shared.evidence import EXPLAIN_SCORE
from chunktui.shared.session import Trace
from chunktui.tui.colours import spark, token_style
from chunktui.tui.widgets.lines import set_virtual_size

from chunktui.tui.plain import safe

PLACEHOLDER = "Select a token (← →) to see its chunks layer by layer."


class TokenDetail(ScrollView, can_focus=False):
    DEFAULT_CSS = "TokenDetail { height: 1fr; min-height: 5; overflow-x: hidden; scrollbar-size-vertical: 1; }"

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._text = Text(PLACEHOLDER, style="dim")
        self._strips: list[Strip] = []  # the text wrapped to the panel's width
        self._wrapped: tuple | None = None  # (text, width) the strips were made for
        self._key: tuple | None = None  # (trace, cursor, layer) shown: another one scrolls back to the top

    @property
    def content(self) -> Text:
        """What the panel shows."""
        return self._text

    def show(self, trace: Trace | None, colours: dict[str, str], cursor: int | None, layer: int | None,
             detail=None, max_rows: int = 12) -> None:
        if not self.is_mounted:
            return
        if trace is None or not len(trace) or cursor is None or cursor >= len(trace):
            self._set_text(Text(PLACEHOLDER, style="dim"))
            return
        key = (id(trace), cursor, layer)
        if self._key != key:
            self._key = key
            self.scroll_home(animate=False)
        self._set_text(self._describe(trace, colours, cursor, layer, detail, max_rows))

    # ------------------------------------------------------------------ drawing (line API)

    def _set_text(self, text: Text) -> None:
        if text == self._text and self._wrapped is not None:
            return  # the same text: nothing to repaint
        self._text = text
        old = self._strips
        if not self._wrap():
            return
        if len(old) != len(self._strips):
            self.refresh()  # the scroll range changed: every line may move
            return
        top = int(self.scroll_offset.y)
        for y in range(top, min(len(self._strips), top + self.size.height)):
            if old[y] != self._strips[y]:
                self.refresh_lines(y)

    def _wrap(self) -> bool:
        """Wrap the text to the panel (narrower by the scrollbar when it is longer than the panel); False when
        the panel has no size yet (wrapped when it gets one)."""
        width, height = self.container_size
        if not width or not self.is_mounted:
            self._wrapped = None
            return False
        visual = visualize(self, self._text, markup=False)
        style = self.visual_style
        strips = Visual.to_strips(self, visual, width, None, style)
        if len(strips) > height and self.styles.overflow_y == "auto" and width > 1:
            width -= self.styles.scrollbar_size_vertical
            strips = Visual.to_strips(self, visual, width, None, style)
        self._strips, self._wrapped = strips, (self._text, width)
        set_virtual_size(self, Size(width, len(strips)))
        return True

    def on_resize(self) -> None:
        self._wrap()
        self.refresh()

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width or self.size.width
        if self._wrapped is None:
            self._wrap()
        line = y + int(self.scroll_offset.y)
        base = self.visual_style.rich_style
        if line >= len(self._strips):
            return Strip.blank(width, base)
        return self._strips[line].adjust_cell_length(width, base)

    def _describe(self, trace: Trace, colours: dict[str, str], cursor: int, layer: int | None, detail,
                  max_rows: int) -> Text:
        no_color = self.app.no_color
        step = trace.steps[cursor]
        cols = trace.columns
        shown = trace.label_at(cursor)
        out = Text()
        out.append(f"token {step.index} ", style="bold")
        out.append(repr(step.text), style=token_style(colours.get(shown), no_color=no_color))
        out.append("  generated" if step.generated else "  prompt", style="dim")
        if step.logprob is not None:
            out.append(f"  log p {step.logprob:.2f}", style="dim")
        out.append_text(self._verdict(cols, step, shown, colours, no_color))
        if layer is not None and layer < len(step.norms):
            out.append(f"\nlayer {layer}: |h| {step.norms[layer]:.1f}", style="bold")
        out.append_text(self._layers(trace, colours, cursor, layer, detail, max_rows, shown, no_color))
        out.append("\n|h| ", style="dim")
        out.append(spark(step.norms))
        if step.norms:
            out.append(f" {min(step.norms):.0f}–{max(step.norms):.0f}", style="dim")
        if step.top:
            out.append("\nnext: ", style="dim")
            out.append("  ".join(f"{piece!r} {p:.2f}" for piece, p in step.top[:4]))
        return out

    def _layers(self, trace: Trace, colours, cursor: int, layer: int | None, detail, max_rows: int,
                shown: str | None, no_color: bool) -> Text:
        """Every layer's raw match (all-layers view), or every chunk at one layer."""
        step = trace.steps[cursor]
        cols = trace.columns
        out = Text()
        usable = detail is not None and detail.available and detail.index == cursor and detail.layer == layer
        if usable:
            if not detail.rows:
                out.append("\n  no chunks at this layer" if layer is not None else "\nno chunk matched at any layer",
                           style="dim")
            elif layer is None:
                out.append("\nlayer ✓ chunk  deviation vs θ  score", style="dim")
            voting = self._voting(cols)
            for row in detail.rows:
                out.append_text(self._row(cols, row.column, row.value, row.score, row.hit, colours, no_color,
                                          mine=shown is not None and cols.labels[row.column] == shown,
                                          votes=voting is None or cols.layers[row.column] in voting))
            if layer is None and detail.total_hits > sum(r.hit for r in detail.rows):
                more = detail.total_hits - sum(r.hit for r in detail.rows)
                out.append(f"\n  + {more} weaker matches ([ ] picks a layer)", style="dim")
            if detail.rows:
                out.append(f"\n{EXPLAIN_SCORE}", style="dim italic")
            return out
        # what the step itself holds: the strongest chunk per layer
        layers = [layer] if layer is not None else range(len(step.layer_chunk))
        rows = 0
        for l in layers:
            c = step.layer_chunk[l] if l < len(step.layer_chunk) else -1
            if c < 0:
                continue
            if rows >= max(max_rows, len(step.layer_chunk)):
                out.append("\n  …", style="dim")
                break
            row = Text(f"\nL{l:<3}", style="dim")
            row.append(f" {safe(cols.labels[c], one=True)} ", style=token_style(colours.get(cols.labels[c]), no_color=no_color))
            row.append(f"  score {step.layer_score[l]:+.2f}", style="dim")
            out.append_text(row)
            rows += 1
        if not rows:
            out.append("\nno chunk matched" + (" at this layer" if layer is not None else " at any layer"),
                       style="dim")
        if detail is not None and not detail.available:
            out.append("\n(deviations not held by the engine any more)", style="dim")
        return out

    @staticmethod
    def _voting(cols) -> set[int] | None:
        rule = cols.token_rule()
        if rule is None:
            return None
        return set(rule.voting(sorted(set(cols.layers))))

    @staticmethod
    def _verdict(cols, step, shown: str | None, colours, no_color) -> Text:
        """The colour rule's decision: the concept, agreeing layers, training precision, evidence vs needed."""
        out = Text("\n")
        rule = cols.token_rule()
        if shown is None:
            out.append("no concept shown", style="bold")
            if rule is not None and rule.calibrated:
                out.append(" (no concept's layers agree enough)", style="dim")
            return out
        out.append(f" {shown} ", style=token_style(colours.get(shown), no_color=no_color))
        conf = cols.confidence(shown, step)
        if conf:
            out.append(f" {conf}")
        elif rule is None:
            out.append(" strongest raw match", style="dim")
        if rule is not None and rule.calibrated and step.evidence is not None and shown in rule.required:
            voting = rule.voting(sorted(set(cols.layers)))
            from chunktui.shared.evidence import span_text

            out.append(f"\nevidence {step.evidence:.1f} ≥ {rule.required[shown]:.1f} needed (layers "
                       f"{span_text(voting)} vote)", style="dim")
        elif rule is not None and not rule.calibrated:
            out.append("\nuncalibrated: no colour rule stored (chunktui calibrate)", style="dim")
        return out

    @staticmethod
    def _row(cols, c: int, value: float, score: float, hit: bool, colours, no_color, mine: bool = False,
             votes: bool = True) -> Text:
        theta = cols.thresholds[c]
        row = Text("\n")
        row.append(f"L{cols.layers[c]:<3}", style="dim" if not mine else "")
        row.append("✓" if hit else "·", style="bold" if hit else "dim")
        row.append(f" {safe(cols.labels[c], one=True)} ", style=token_style(colours.get(cols.labels[c]) if hit else None,
                                                          no_color=no_color))
        if cols.kinds[c] == "pa":
            row.append(f" {value:.3g} {'≤' if hit else '>'} θ {theta:.3g}")
        elif cols.kinds[c] == "dsc":
            row.append(" in this DSC chunk (longest-match parse of the discretised states)" if hit
                       else " not in this DSC chunk")
            return row
        else:
            row.append(f" cos {value:.3f} {'≥' if hit else '<'} θ {theta:.3f}")
        if math.isfinite(score):
            row.append(f"  {score:+.2f}", style="dim")
        return row
