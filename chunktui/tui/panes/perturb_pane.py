"""Perturb pane: graft or suppress chunks, regenerate, and compare both continuations side by side."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.suggester import SuggestFromList
from textual.widgets import Button, Checkbox, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option

from chunktui.shared.settings import (DEFAULT_LAYERS, DEFAULT_MODE, DEFAULT_POSITIONS, DEFAULT_STRENGTH, MODES,
                                              POSITION_CHOICES, Positions)
from chunktui.shared import validate
from chunktui.shared.protocol import Compare
from chunktui.tui.colours import token_style
from chunktui.tui.panes.stream_pane import DEFAULT_PROMPT, SamplingFields
from chunktui.tui.plain import plain, safe



class PerturbPane(Vertical):
    BINDINGS = [Binding("ctrl+r", "app.regenerate", "regenerate")]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.runs: list[dict] = []

    def compose(self) -> ComposeResult:
        with Horizontal(classes="form-row"):
            yield Label("Chunks", classes="field-label")
            yield Input("cheese", id="perturb-chunks", placeholder="labels or ids, comma-separated", compact=True)
            yield Select([(m, m) for m in MODES], value=DEFAULT_MODE, allow_blank=False, id="perturb-mode",
                         compact=True)
            yield Label("x", classes="field-label short")
            yield Input(str(DEFAULT_STRENGTH[DEFAULT_MODE]), id="perturb-strength", compact=True, classes="num w5")
        with Horizontal(classes="form-row"):
            yield Label("Layers", classes="field-label")
            yield Input(DEFAULT_LAYERS, id="perturb-layers", compact=True, classes="num w8")
            yield Label("at", classes="field-label short")
            yield Select([(p, p) for p in POSITION_CHOICES], value=DEFAULT_POSITIONS, allow_blank=False,
                         id="perturb-positions",
                         compact=True)
            yield Button("Regenerate", id="regenerate", variant="primary", compact=True)
        with Horizontal(classes="form-row"):
            yield Input(DEFAULT_PROMPT, id="perturb-prompt", placeholder="prompt", compact=True)
            yield Checkbox("chat", value=True, id="perturb-chat", compact=True)
        yield SamplingFields("perturb", tokens=40, temperature=0.8, top_p=0.9, seed=0)
        yield Static("", id="perturb-summary")
        with Horizontal(id="perturb-sides"):
            with VerticalScroll(classes="side"):
                yield Static(Text("control (no intervention)", style="dim"), id="side-control")
            with VerticalScroll(classes="side"):
                yield Static(Text("perturbed", style="dim"), id="side-perturbed")
        yield OptionList(id="perturb-history")

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "perturb-mode" and event.value in DEFAULT_STRENGTH:
            self.query_one("#perturb-strength", Input).value = str(DEFAULT_STRENGTH[str(event.value)])

    def set_labels(self, labels: list[str]) -> None:
        self.query_one("#perturb-chunks", Input).suggester = SuggestFromList(labels, case_sensitive=False)

    def request(self) -> Compare:
        """The typed request for the engine, checked by the engine's validators; ChunkError on a bad field."""
        q = lambda id_: self.query_one(f"#{id_}")  # noqa: E731
        names = validate.chunk_names(q("perturb-chunks").value)
        mode = str(q("perturb-mode").value)
        strength = validate.strength(q("perturb-strength").value, mode)  # blank: the mode's default
        prompt = validate.prompt_text(q("perturb-prompt").value.strip())
        layers = validate.layer_spec(q("perturb-layers").value.strip() or DEFAULT_LAYERS)
        positions = str(Positions.parse(str(q("perturb-positions").value)))
        return Compare(names=names, mode=mode, strength=strength, layers=layers, positions=positions, prompt=prompt,
                       sampling=self.query_one(SamplingFields).sampling(), chat=q("perturb-chat").value)

    def add_run(self, run: dict) -> None:
        self.runs.append(run)
        history = self.query_one("#perturb-history", OptionList)
        iv = run["intervention"]
        change = ", ".join(f"{label} Δlog p {c['delta_logprob']:+.2f}" for label, c in run["concepts"].items())
        history.add_option(Option(plain(f"{len(self.runs)}. {iv['mode']} x{iv['strength']:g} "
                                        f"{','.join(iv['labels'])} L{_span(iv['layers'])} @{iv['positions']}: {change}",
                                        one=True), id=str(len(self.runs) - 1)))
        history.highlighted = len(self.runs) - 1
        self.show_run(run)

    def show_run(self, run: dict, colours: dict[str, str] | None = None) -> None:
        iv = run["intervention"]
        summary = plain(f"{iv['mode']} x{iv['strength']:g} of {', '.join(iv['labels'])} at layers "
                        f"{_span(iv['layers'])}, positions {iv['positions']}; same seed and sampling in both arms",
                        style="dim", one=True)
        for label, c in run["concepts"].items():
            summary.append(f"\n{safe(label, one=True)}", style=token_style((colours or getattr(self.app, "colours", {})).get(label), no_color=self.app.no_color))
            summary.append(f"  log p(first token) {c['logprob_control']:.2f} → {c['logprob_perturbed']:.2f} "
                           f"(Δ {c['delta_logprob']:+.2f})   in text: {c['control_rate']:.0%} → "
                           f"{c['perturbed_rate']:.0%}")
        self.query_one("#perturb-summary", Static).update(summary)
        pair = run["pairs"][0] if run["pairs"] else None
        left, right = diff_texts(pair, self.app.no_color) if pair else (Text(""), Text(""))
        self.query_one("#side-control", Static).update(Text("control\n", style="bold dim") + left)
        self.query_one("#side-perturbed", Static).update(Text("perturbed\n", style="bold dim") + right)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option_list.id == "perturb-history" and event.option.id is not None:
            self.show_run(self.runs[int(event.option.id)])


def _span(layers: list[int]) -> str:
    if not layers:
        return "?"
    if layers == list(range(layers[0], layers[-1] + 1)) and len(layers) > 1:
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def diff_texts(pair: dict, no_color: bool = False) -> tuple[Text, Text]:
    """Both continuations with the differing runs marked (struck out on the left, underlined on the right)."""
    left, right = Text(), Text()
    removed = "strike" if no_color else "strike red"
    added = "bold underline" if no_color else "bold underline green"
    for op in pair.get("diff") or [{"op": "equal", "control": pair["control"], "perturbed": pair["perturbed"]}]:
        if op["op"] == "equal":
            left.append(safe(op["control"]))
            right.append(safe(op["perturbed"]))
        else:
            left.append(safe(op["control"]), style=removed)
            right.append(safe(op["perturbed"]), style=added)
    return left, right
