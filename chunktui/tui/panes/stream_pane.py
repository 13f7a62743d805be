"""Stream pane: a prompt, sampling settings and seed; Generate and Stop; the live trace."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Checkbox, Input, Label, Static

from chunktui.shared import validate
from chunktui.shared.protocol import Generate
from chunktui.shared.settings import Sampling
from chunktui.tui.widgets.trace_view import TraceView

DEFAULT_PROMPT = "What is your favourite food, and how do you cook it?"


class SamplingFields(Horizontal):
    """Tokens, temperature, top-p, seed: shared by Stream and Perturb."""

    def __init__(self, prefix: str, tokens: int = 40, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
                 **kwargs) -> None:
        super().__init__(classes="form-row sampling", **kwargs)
        self.prefix = prefix
        self.defaults = (tokens, temperature, top_p, seed)

    def compose(self) -> ComposeResult:
        tokens, temperature, top_p, seed = self.defaults
        for name, value, width in (("tokens", tokens, 5), ("temp", temperature, 5), ("top-p", top_p, 5),
                                   ("seed", seed, 6)):
            yield Label(name, classes="field-label short")
            yield Input(str(value), id=f"{self.prefix}-{name}", compact=True, classes=f"num w{width}")

    def sampling(self) -> Sampling:
        """Checked by the engine's validators (the same rules as the CLI's options)."""
        q = lambda name: self.query_one(f"#{self.prefix}-{name}", Input).value.strip()  # noqa: E731
        return validate.sampling(q("tokens"), q("temp"), q("top-p"), q("seed"))


class StreamPane(Vertical):
    BINDINGS = [Binding("ctrl+g", "app.generate", "generate")]

    def compose(self) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Input(DEFAULT_PROMPT, id="prompt", placeholder="prompt (Enter to generate)", compact=True)
            yield Button("Generate", id="generate", variant="primary", compact=True)
            yield Button("Stop", id="stop", variant="error", compact=True, disabled=True)
        with Horizontal(classes="form-row"):
            yield SamplingFields("stream")
            yield Checkbox("chat", value=True, id="chat", compact=True)
        yield TraceView(placeholder="Type a prompt and press Enter (or Generate). Tokens appear here, coloured "
                                    "by their strongest chunk.", id="stream-trace")
        firings = Static("", id="stream-firings", markup=False)  # rule firings: shown once a rule fires
        firings.display = False
        yield firings

    def show_firings(self, firings: list[dict], stopped_by: str | None = None) -> None:
        """The latest rule firings under the trace (underlined tokens in the trace are where they fired)."""
        view = self.query_one("#stream-firings", Static)
        if not firings:
            view.display = False
            return
        from chunktui.shared.rules import format_layers

        lines = [f"{f.get('rule')} @ token {f.get('token')} {f.get('text', '')!r} layers "
                 f"{format_layers(f.get('layers', [])) or '-'}: {f.get('action')}" for f in firings[-5:]]
        head = f"{len(firings)} rule firing{'s' if len(firings) != 1 else ''}"
        if stopped_by:
            head += f"; stopped by rule {stopped_by}"
        view.update("\n".join([head] + lines))
        view.display = True

    def request(self) -> Generate:
        """The typed request for the engine (the app gives it a trace id); ChunkError on a bad field."""
        prompt = validate.prompt_text(self.query_one("#prompt", Input).value)
        return Generate(trace_id=0, prompt=prompt, sampling=self.query_one(SamplingFields).sampling(),
                        chat=self.query_one("#chat", Checkbox).value)

    def set_running(self, running: bool) -> None:
        self.query_one("#generate", Button).disabled = running
        self.query_one("#stop", Button).disabled = not running
