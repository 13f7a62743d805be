"""Chunks pane: the dictionary as a filterable, sortable table; a chosen chunk's matches and score plot."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import DataTable, Input, Label, Static

from chunktui.tui.widgets.score_plot import ScorePlot
from chunktui.tui.widgets.token_view import TokenView

from chunktui.tui.plain import plain

COLUMNS = [("label", "label"), ("layer", "layer"), ("kind", "kind"), ("size", "size"), ("threshold", "θ"),
           ("tp", "fit TP"), ("fp", "fit FP")]


def _key(chunk, column: str):
    """chunk: a protocol.ChunkInfo (the engine lists its chunks without tensors)."""
    return {"label": chunk.label, "layer": chunk.layer, "kind": chunk.kind, "size": chunk.size,
            "threshold": float(chunk.threshold), "tp": -1.0 if chunk.tp_rate is None else chunk.tp_rate,
            "fp": -1.0 if chunk.fp_rate is None else chunk.fp_rate}[column]


class ChunksPane(Vertical):
    BINDINGS = [Binding("s", "sort", "Sort"), Binding("slash", "filter", "Filter")]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.chunks: list = []
        self.sort_column = "layer"
        self.sort_reverse = False
        self.chosen_id: str | None = None

    def compose(self) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label("Filter", classes="field-label")
            yield Input(id="chunk-filter", placeholder="label, or label@layer, or layer number (e.g. cheese, 4)",
                        compact=True)
            yield Label("", id="chunk-count")
        table = DataTable(id="chunk-table", cursor_type="row", zebra_stripes=True)
        yield table
        with Vertical(id="chunk-focus"):
            with VerticalScroll(id="chunk-text"):
                yield TokenView(id="chunk-tokens")
            yield ScorePlot(id="chunk-plot")

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for key, title in COLUMNS:
            table.add_column(title, key=key)

    def set_chunks(self, chunks: list) -> None:
        self.chunks = list(chunks)
        self.chosen_id = None
        self.refill()

    def refill(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        query = self.query_one("#chunk-filter", Input).value.strip().lower()
        rows = [c for c in self.chunks if self._wanted(c, query)]
        rows.sort(key=lambda c: (_key(c, self.sort_column), c.layer, c.label), reverse=self.sort_reverse)
        for c in rows:
            tp, fp = c.tp_rate, c.fp_rate
            table.add_row(plain(c.label, one=True), str(c.layer), plain(c.kind, one=True), str(c.size), f"{c.threshold:.3g}",
                          "—" if tp is None else f"{tp:.2f}", "—" if fp is None else f"{fp:.3f}", key=c.id)
        arrow = "↓" if self.sort_reverse else "↑"
        self.query_one("#chunk-count", Label).update(
            plain(f"{len(rows)} of {len(self.chunks)} · sort {self.sort_column} {arrow}"))

    @staticmethod
    def _wanted(chunk, query: str) -> bool:
        if not query:
            return True
        if query.isdigit():
            return chunk.layer == int(query)
        if "@" in query:
            return chunk.id.lower().startswith(query)
        return query in chunk.label.lower()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "chunk-filter":
            self.refill()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "chunk-filter":
            self.query_one(DataTable).focus()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        column = str(event.column_key.value)
        if column == self.sort_column:
            self.sort_reverse = not self.sort_reverse
        else:
            self.sort_column, self.sort_reverse = column, False
        self.refill()

    def action_sort(self) -> None:
        """Cycle the sort column (and direction after the last column)."""
        keys = [k for k, _ in COLUMNS]
        i = keys.index(self.sort_column)
        if i == len(keys) - 1:
            self.sort_reverse = not self.sort_reverse
        self.sort_column = keys[(i + 1) % len(keys)]
        self.refill()

    def action_filter(self) -> None:
        self.query_one("#chunk-filter", Input).focus()

    def show_focus(self, trace, colours: dict[str, str], column: int | None, chunk) -> None:
        """Where the chosen chunk matches in the current text; its scores follow from the engine (show_scores)."""
        view = self.query_one("#chunk-tokens", TokenView)
        plot = self.query_one(ScorePlot)
        if chunk is None:
            view.show(None, colours, placeholder="Choose a chunk (Enter) to see where it matches in the current text.")
            plot.show([], None, "")
            return
        if trace is None or not len(trace):
            view.show(None, colours, placeholder=f"{chunk.id}: no text yet. Generate (Stream) or open a sequence "
                                                 "(Step), then come back.")
            plot.show([], None, "")
            return
        if column is None:
            view.show(None, colours, placeholder=f"{chunk.id} is not in the pack of the current text.")
            plot.show([], None, "")
            return
        view.show(trace, colours, only_column=column)
        self._focus = (trace, colours, column, chunk)
        plot.show([], colours.get(chunk.label), f"{chunk.id}: {sum(trace.chunk_hits(column))} matches; "
                                                 "scores on their way from the engine…")

    def show_scores(self, scores, trace) -> None:
        """The engine's scores of the chosen chunk across the current text."""
        focus = getattr(self, "_focus", None)
        if focus is None or focus[0] is not trace or focus[2] != scores.column:
            return
        _, colours, column, chunk = focus
        hits = sum(trace.chunk_hits(column))
        about = f"{chunk.card} " if chunk.card else ""  # discovered chunks carry a card
        if not scores.available:
            self.query_one(ScorePlot).show([], colours.get(chunk.label), f"{about}{chunk.id}: {hits} matches "
                                           "(scores not held by the engine any more)")
            return
        self.query_one(ScorePlot).show(scores.scores, colours.get(chunk.label),
                                       f"{about}{chunk.id} score across {len(scores.scores)} tokens of "
                                       f"'{trace.title[:30]}' ({hits} matches; bar up = match)")
