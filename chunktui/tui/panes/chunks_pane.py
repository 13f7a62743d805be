"""Chunks pane: the dictionary as a filterable, sortable table; a chosen chunk's matches in the current text,
its score plot, and where it fires in a corpus (the best contexts, searched by the engine).

Keyboard: `/` the filter, Enter on a row chooses the chunk, `s` cycles the sort column; Tab reaches the text
preview (↑ ↓ PgUp PgDn scroll it), the corpus field and the list of contexts.
"""

from __future__ import annotations

from pathlib import Path

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, DataTable, Input, Label, OptionList, Static
from textual.widgets.option_list import Option

from chunktui.tui.colours import token_style
from chunktui.tui.widgets.score_plot import ScorePlot
from chunktui.tui.widgets.token_view import TokenView, printable

from chunktui.tui.plain import plain

COLUMNS = [("label", "label"), ("layer", "layer"), ("kind", "kind"), ("size", "size"), ("threshold", "θ"),
           ("tp", "fit TP"), ("fp", "fit FP")]
HELDOUT_COLUMNS = [("htp", "held TP"), ("hfp", "held FP")]  # when the dictionary stores held-out figures
FIRES_K = 10  # contexts shown
FIRES_CHARS = 40  # characters of context either side of the token


def _key(chunk, column: str):
    """chunk: a protocol.ChunkInfo (the engine lists its chunks without tensors)."""
    rate = lambda x: -1.0 if x is None else x  # noqa: E731
    return {"label": chunk.label, "layer": chunk.layer, "kind": chunk.kind, "size": chunk.size,
            "threshold": float(chunk.threshold), "tp": rate(chunk.tp_rate), "fp": rate(chunk.fp_rate),
            "htp": rate(chunk.heldout_tp), "hfp": rate(chunk.heldout_fp)}[column]


class ChunkPreview(TokenView, can_focus=True):
    """The current text with the chosen chunk's matches; focusable, so the keys scroll it."""


class ChunksPane(Vertical):
    BINDINGS = [Binding("s", "sort", "Sort"), Binding("slash", "filter", "Filter")]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.chunks: list = []
        self.columns = list(COLUMNS)
        self.sort_column = "layer"
        self.sort_reverse = False
        self.chosen_id: str | None = None
        self.fires = None  # the engine's TopFound on screen

    def compose(self) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label("Filter", classes="field-label")
            yield Input(id="chunk-filter", placeholder="label, or label@layer, or layer number (e.g. cheese, 4)",
                        compact=True)
            yield Label("", id="chunk-count")
        yield DataTable(id="chunk-table", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="chunk-focus"):
            with Vertical(id="chunk-left"):
                yield ChunkPreview(id="chunk-tokens")
                yield ScorePlot(id="chunk-plot")
            with Vertical(id="fires-box"):
                with Horizontal(classes="form-row"):
                    yield Label("Fires in", classes="field-label")
                    yield Input(id="fires-corpus", placeholder="sample held-out text (Enter: search)", compact=True)
                    yield Checkbox("all layers", id="fires-all", compact=True)
                    yield Button("Find", id="fires-find", compact=True)
                yield Static("", id="fires-status")
                yield OptionList(id="fires-list")

    def on_mount(self) -> None:
        self._add_columns()
        self.query_one("#fires-status", Static).update(
            Text("Choose a chunk (Enter) to see the contexts where it fires most, in the sample held-out text "
                 "or a file of your own.", style="dim"))

    def _add_columns(self) -> None:
        table = self.query_one(DataTable)
        for key, title in self.columns:
            table.add_column(title, key=key)

    def set_chunks(self, chunks: list) -> None:
        self.chunks = list(chunks)
        self.chosen_id = None
        columns = COLUMNS + (HELDOUT_COLUMNS if any(c.heldout_tp is not None for c in self.chunks) else [])
        if columns != self.columns:
            self.columns = columns
            self.query_one(DataTable).clear(columns=True)
            self._add_columns()
            if self.sort_column not in [k for k, _ in columns]:
                self.sort_column, self.sort_reverse = "layer", False
        self.refill()

    def refill(self) -> None:
        table = self.query_one(DataTable)
        table.clear()
        query = self.query_one("#chunk-filter", Input).value.strip().lower()
        rows = [c for c in self.chunks if self._wanted(c, query)]
        rows.sort(key=lambda c: (_key(c, self.sort_column), c.layer, c.label), reverse=self.sort_reverse)
        held = len(self.columns) > len(COLUMNS)
        rate = lambda x, f: "—" if x is None else format(x, f)  # noqa: E731
        for c in rows:
            cells = [plain(c.label, one=True), str(c.layer), plain(c.kind, one=True), str(c.size), f"{c.threshold:.3g}", rate(c.tp_rate, ".2f"),
                     rate(c.fp_rate, ".3f")]
            if held:
                cells += [rate(c.heldout_tp, ".2f"), rate(c.heldout_fp, ".3f")]
            table.add_row(*cells, key=c.id)
        arrow = "↓" if self.sort_reverse else "↑"
        corpora = sorted({c.heldout_corpus for c in self.chunks if c.heldout_corpus})
        where = f" · held out on {', '.join(corpora)}" if corpora else ""
        self.query_one("#chunk-count", Label).update(  # Text: a corpus name is never read as markup
            plain(f"{len(rows)} of {len(self.chunks)} · sort {self.sort_column} {arrow}{where}"))

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
        keys = [k for k, _ in self.columns]
        i = keys.index(self.sort_column)
        if i == len(keys) - 1:
            self.sort_reverse = not self.sort_reverse
        self.sort_column = keys[(i + 1) % len(keys)]
        self.refill()

    def action_filter(self) -> None:
        self.query_one("#chunk-filter", Input).focus()

    # ------------------------------------------------------------------ the chosen chunk in the current text

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
        view.show_from(self.interesting_start(trace, column))
        self._focus = (trace, colours, column, chunk)
        plot.show([], colours.get(chunk.label), f"{chunk.id}: {sum(trace.chunk_hits(column))} matches; "
                                                 "scores on their way from the engine…")

    @staticmethod
    def interesting_start(trace, column: int) -> int:
        """Where the preview starts: the chunk's first match, else the first generated token, else the user's text
        (after a chat template's system prompt), else the start."""
        hits = trace.chunk_hits(column)
        first = next((t for t, hit in enumerate(hits) if hit), None)
        if first is not None:
            return first
        generated = next((t for t, s in enumerate(trace.steps) if s.generated), None)
        if generated is not None:
            return generated
        title = trace.title.strip()[:12]
        if title and title in trace.text:  # the prompt's own words, past the template
            at, pos = trace.text.index(title), 0
            for t, s in enumerate(trace.steps):
                pos += len(s.text)
                if pos > at:
                    return t
        return 0

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
                                       f"'{trace.title[:30]}' ({hits} matches; ≥ 0 = match)")

    # ------------------------------------------------------------------ where the chunk fires in a corpus

    def fires_request(self, chunk) -> tuple[str, str | None]:
        """(name, corpus) to search for the chosen chunk: its id, or its label with "all layers"; None: the sample."""
        name = chunk.label if self.query_one("#fires-all", Checkbox).value else chunk.id
        corpus = self.query_one("#fires-corpus", Input).value.strip() or None
        return name, corpus

    def show_fires_status(self, text: str, style: str = "dim") -> None:
        self.query_one("#fires-status", Static).update(Text(text, style=style))

    def clear_fires(self, text: str, style: str = "dim") -> None:
        self.fires = None
        self.query_one("#fires-list", OptionList).clear_options()
        self.show_fires_status(text, style)

    def show_fires(self, found, colours: dict[str, str], show_timing: bool = True) -> None:
        """The engine's TopFound: a line of figures, then one option per context, the firing token marked."""
        self.fires = found
        corpus = Path(found.corpus).name
        share = 100 * found.matches / found.tokens if found.tokens else 0.0
        layers = found.layers
        where = f"layer {layers[0]}" if len(layers) == 1 else f"{len(layers)} layers"
        line = (f"{found.name} ({where}) fires on {found.matches} of {found.tokens} tokens of {corpus} "
                f"({share:.2f}%); best {len(found.examples)} of {found.contexts} contexts")
        if show_timing and not found.cached:
            line += f" · {found.seconds:.1f} s"
        self.show_fires_status(line, style="")
        options = self.query_one("#fires-list", OptionList)
        options.clear_options()
        no_color = self.app.no_color
        for i, e in enumerate(found.examples):
            prompt = Text(no_wrap=False)
            prompt.append(f"L{e.layer} {e.score:+.2f}", style="bold")
            if e.layers > 1:
                prompt.append(f" {e.agree}/{e.layers} layers", style="dim")
            prompt.append("  ")
            prompt.append(printable(e.before))
            mark = token_style(colours.get(e.label), no_color=no_color) + (Style(reverse=True) if no_color else Style())
            prompt.append(printable(e.token), style=mark)
            prompt.append(printable(e.after))
            options.add_option(Option(prompt, id=str(i)))
        if not found.examples:
            self.show_fires_status(f"{found.name} ({where}) fires nowhere in the {found.tokens} tokens of {corpus}.",
                                   style="")
