"""Perturb pane: graft or suppress chunks, regenerate, and compare the arms side by side.

Each run generates `samples` continuations per arm with the same seeds in every
arm and reports the concept's occurrence in each arm with a Wilson 95%
interval, the fluency of each arm (perplexity under the unperturbed model,
degenerate answers), an optional random control intervention (seeded by the
sampling seed) and an optional strength sweep. Runs journalled by earlier
versions (one sample, no intervals) still show, marked as such.
"""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.suggester import SuggestFromList
from textual.widgets import Button, Checkbox, Input, Label, OptionList, Select, Static
from textual.widgets.option_list import Option

from chunktui.shared import validate
from chunktui.shared.perturb_stats import rate_text
from chunktui.shared.protocol import Compare
from chunktui.shared.reports import layer_diff_lines
from chunktui.shared.settings import (CONTROL_KINDS, DEFAULT_LAYERS, DEFAULT_MODE, DEFAULT_POSITIONS, DEFAULT_SAMPLES,
                                      DEFAULT_SITE, DEFAULT_STRENGTH, MODES, POSITION_CHOICES, SITES, Positions,
                                      check_site)
from chunktui.tui.colours import token_style
from chunktui.tui.panes.stream_pane import DEFAULT_PROMPT, SamplingFields
from chunktui.tui.plain import plain, safe

NO_CONTROL = "no control"


class PerturbPane(Vertical):
    BINDINGS = [Binding("ctrl+r", "app.regenerate", "regenerate")]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.runs: list[dict] = []
        self._mode = DEFAULT_MODE  # the mode the strength field was last set for

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
            yield Select([(s, s) for s in SITES], value=DEFAULT_SITE, allow_blank=False, id="perturb-site",
                         compact=True, tooltip="residual: the stream entering each block; attention: only what "
                                               "each block's attention reads (the residual stream is left as it was)")
            yield Button("Regenerate", id="regenerate", variant="primary", compact=True)
        with Horizontal(classes="form-row"):
            yield Input(DEFAULT_PROMPT, id="perturb-prompt", placeholder="prompt", compact=True)
            yield Checkbox("chat", value=True, id="perturb-chat", compact=True)
        yield SamplingFields("perturb", tokens=40, temperature=0.8, top_p=0.9, seed=0)
        with Horizontal(classes="form-row"):
            yield Label("samples", classes="field-label")
            yield Input(str(DEFAULT_SAMPLES), id="perturb-samples", compact=True, classes="num w5")
            yield Label("sweep", classes="field-label short")
            yield Input("", id="perturb-sweep", placeholder="strengths a,b,c (blank: one)", compact=True)
            yield Select([(NO_CONTROL, NO_CONTROL)] + [(f"random {k}", k) for k in CONTROL_KINDS], value=NO_CONTROL,
                         allow_blank=False, id="perturb-control", compact=True)
        yield Static("", id="perturb-summary")
        with Horizontal(id="perturb-sides"):
            with VerticalScroll(classes="side"):
                yield Static(Text("control (no intervention)", style="dim"), id="side-control")
            with VerticalScroll(classes="side"):
                yield Static(Text("perturbed", style="dim"), id="side-perturbed")
        yield OptionList(id="perturb-history")

    def on_select_changed(self, event: Select.Changed) -> None:
        if event.select.id == "perturb-mode" and event.value in DEFAULT_STRENGTH:
            self.mode_changed(str(event.value))

    def mode_changed(self, mode: str) -> str | None:
        """Keep a strength the user typed when the new mode accepts it; otherwise use the new mode's default and
        say so. A field left at the old mode's default (or blank) follows the new mode's default quietly."""
        field = self.query_one("#perturb-strength", Input)
        old, self._mode = self._mode, mode
        typed = field.value.strip()
        untouched = not typed or _same_number(typed, DEFAULT_STRENGTH.get(old))
        if old == mode or (not untouched and _fits(typed, mode)):
            return None  # kept as typed
        default = f"{DEFAULT_STRENGTH[mode]:g}"
        field.value = default
        if untouched:
            return None
        message = (f"Strength {typed} is not valid for {mode}; it is now {mode}'s default, {default} "
                   f"({validate.STRENGTH_RULES[mode][2]}).")
        if self.is_attached:
            self.app.notify(message, title="Strength changed", severity="warning", timeout=6, markup=False)
        return message

    def set_labels(self, labels: list[str]) -> None:
        self.query_one("#perturb-chunks", Input).suggester = SuggestFromList(labels, case_sensitive=False)

    def request(self) -> Compare:
        """The typed request for the engine, checked by the engine's validators; ChunkError on a bad field."""
        q = lambda id_: self.query_one(f"#{id_}")  # noqa: E731
        names = validate.chunk_names(q("perturb-chunks").value)
        mode = str(q("perturb-mode").value)
        sweep = validate.strengths(q("perturb-sweep").value, mode, "sweep")
        strength = validate.strength(q("perturb-strength").value, mode)  # blank: the mode's default
        prompt = validate.prompt_text(q("perturb-prompt").value.strip())
        layers = validate.layer_spec(q("perturb-layers").value.strip() or DEFAULT_LAYERS)
        positions = str(Positions.parse(str(q("perturb-positions").value)))
        samples = validate.samples(q("perturb-samples").value.strip() or DEFAULT_SAMPLES)
        sampling = self.query_one(SamplingFields).sampling()
        if sampling.seed + samples - 1 > validate.SEED_MAX:
            raise validate.InvalidValue(f"seed {sampling.seed} with {samples} samples runs past the largest seed "
                                        f"({validate.SEED_MAX}).")
        control = str(q("perturb-control").value)
        site = check_site(str(q("perturb-site").value))
        return Compare(names=names, mode=mode, strength=strength, layers=layers, positions=positions, prompt=prompt,
                       sampling=sampling, chat=q("perturb-chat").value, samples=samples, sweep=sweep,
                       control=None if control == NO_CONTROL else control, control_seed=sampling.seed, site=site)

    def show_progress(self, fraction: float | None, text: str) -> None:
        """A running comparison: which arm, batch or prompt, and how far."""
        done = "" if fraction is None else f" ({100 * min(max(fraction, 0.0), 1.0):.0f}%)"
        self.query_one("#perturb-summary", Static).update(Text(f"running: {text}{done}", style="dim"))

    def stopped(self, why: str) -> None:
        """A run failed or was cancelled: say so, with the last run's summary (if any) below."""
        line = Text(f"{why}; the last run stays shown.", style="dim") if self.runs else Text(why, style="dim")
        if self.runs:
            colours = getattr(self.app, "colours", {})
            line = Text.assemble(line, "\n", run_summary(self.runs[-1], colours, self.app.no_color)) \
                if not self.runs[-1].get("sweep") else line
        self.query_one("#perturb-summary", Static).update(line)

    def add_run(self, run: dict) -> None:
        self.runs.append(run)
        history = self.query_one("#perturb-history", OptionList)
        history.add_option(Option(plain(f"{len(self.runs)}. {run_line(run)}", one=True), id=str(len(self.runs) - 1)))
        history.highlighted = len(self.runs) - 1
        self.show_run(run)

    def show_run(self, run: dict, colours: dict[str, str] | None = None) -> None:
        colours = colours or getattr(self.app, "colours", {})
        summary = run_summary(run, colours, self.app.no_color)
        first = run["pairs"][0] if run.get("pairs") else None
        lines = layer_diff_lines(first, limit=3) if first else []  # what changed, layer by layer
        if lines:
            diff = Text("\n".join(safe(line, one=True) for line in lines), style="dim")
            summary = Text.assemble(summary, "\n", diff) if isinstance(summary, Text) else Group(summary, diff)
        self.query_one("#perturb-summary", Static).update(summary)
        left, right = Text(), Text()
        fluency_of = lambda pair, arm: (pair.get("fluency") or {}).get(arm) or {}  # noqa: E731
        for i, pair in enumerate(run["pairs"]):
            if i:
                left.append("\n\n")
                right.append("\n\n")
            a, b = diff_texts(pair, self.app.no_color)
            left.append(_sample_head(pair, fluency_of(pair, "control"), len(run["pairs"]))).append_text(a)
            right.append(_sample_head(pair, fluency_of(pair, "perturbed"), len(run["pairs"]))).append_text(b)
            if "random" in pair:
                right.append(Text("\nrandom control: ", style="dim italic")).append(safe(pair["random"]), style="italic")
        self.query_one("#side-control", Static).update(Text("control\n", style="bold dim") + left)
        self.query_one("#side-perturbed", Static).update(Text("perturbed\n", style="bold dim") + right)

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        if event.option_list.id == "perturb-history" and event.option.id is not None:
            self.show_run(self.runs[int(event.option.id)])


def _same_number(text: str, value: float | None) -> bool:
    try:
        return value is not None and float(text) == float(value)
    except ValueError:
        return False


def _fits(text: str, mode: str) -> bool:
    try:
        return validate.strength(text, mode) is not None
    except validate.InvalidValue:
        return False


def _sample_head(pair: dict, fluency: dict, n: int) -> Text:
    bits = [f"seed {pair['seed']}"]
    if fluency.get("perplexity") is not None:
        bits.append(f"ppl {fluency['perplexity']:.1f}")
    if fluency.get("degenerate"):
        bits.append(f"degenerate: {fluency['degenerate']}")
    return Text(" · ".join(bits) + "\n", style="dim") if n > 1 or fluency else Text("")


def _strengths(run: dict) -> str:
    entries = run.get("sweep") or [{"strength": run["intervention"]["strength"]}]
    return ",".join(f"{e['strength']:g}" for e in entries)


def run_line(run: dict) -> str:
    """One history line: what was done and, per concept, the change in occurrence with its interval."""
    iv = run["intervention"]
    n = (run.get("settings") or {}).get("samples", 1)
    changes = []
    for label, c in run["concepts"].items():
        change = f"{label} {rate_text(c['control_rate'])}→{rate_text(c['perturbed_rate'])}"
        if c.get("delta_ci"):
            change += f" (Δ {rate_text(c['delta_rate'], c['delta_ci'], signed=True)})"
        changes.append(change + f" Δlog p {c['delta_logprob']:+.2f}")
    return (f"{iv['mode']} x{_strengths(run)} {','.join(iv['labels'])} L{_span(iv['layers'])} @{iv['positions']} "
            f"{iv.get('site', 'residual')} n={n}: " + "; ".join(changes))


def _fluency_bit(f: dict | None) -> str:
    if not f:
        return "?"
    ppl = "?" if f.get("perplexity") is None else f"{f['perplexity']:.1f}"
    return f"ppl {ppl}, degenerate {f.get('degenerate', 0)}/{f.get('rows', 0)}"


def run_summary(run: dict, colours: dict[str, str], no_color: bool = False):
    """The summary above the two sides: settings, occurrence per arm with Wilson 95% intervals, first-token
    log-probabilities, fluency per arm; a table when the run is a sweep. Older runs show what they have."""
    iv = run["intervention"]
    settings = run.get("settings") or {}
    n = settings.get("samples", 1)
    control = run.get("control_intervention")
    head = Text(f"{iv['mode']} x{_strengths(run)} of {', '.join(iv['labels'])} at layers {_span(iv['layers'])}, "
                f"positions {iv['positions']}, {iv.get('site', 'residual')} site · {n} sample{'s' if n != 1 else ''} "
                "per arm, same seeds in every arm",
                style="dim")
    if control:
        head.append(f" · random control: {control['kind']} (seed {control['seed']})", style="dim")
    if run.get("sweep"):
        return _sweep_table(run, head, colours, no_color)
    out = head
    for label, c in run["concepts"].items():
        out.append(f"\n{safe(label, one=True)}", style=token_style(colours.get(label), no_color=no_color))
        if c.get("control_ci"):
            out.append(f"  in text (Wilson 95%): control {rate_text(c['control_rate'], c['control_ci'])} → perturbed "
                       f"{rate_text(c['perturbed_rate'], c['perturbed_ci'])}, Δ "
                       f"{rate_text(c['delta_rate'], c['delta_ci'], signed=True)}")
            if "random_rate" in c:
                out.append(f" · random {rate_text(c['random_rate'], c['random_ci'])}")
        else:  # a run from before intervals: one sample, no interval
            out.append(f"  in text: {c['control_rate']:.0%} → {c['perturbed_rate']:.0%} ({n} sample, no interval)")
        out.append(f"\n  log p(first token) {c['logprob_control']:.2f} → {c['logprob_perturbed']:.2f} "
                   f"(Δ {c['delta_logprob']:+.2f})")
        if "logprob_random" in c:
            out.append(f" · random {c['logprob_random']:.2f}")
    fluency = run.get("fluency") or {}
    if fluency:
        arms = [a for a in ("control", "perturbed", "random") if a in fluency]
        out.append("\nfluency (ppl under the unperturbed model): " +
                   " · ".join(f"{a} {_fluency_bit(fluency[a])}" for a in arms))
    return out


def _sweep_table(run: dict, head: Text, colours: dict[str, str], no_color: bool):
    from rich.console import Group

    table = Table(box=None, pad_edge=False, show_edge=False, padding=(0, 1), header_style="dim")
    with_random = any("random" in (e.get("fluency") or {}) for e in run["sweep"])
    for col in ["x", "concept", "control", "perturbed", "Δ"] + (["random"] if with_random else []) + \
            ["Δlog p", "ppl", "degenerate"]:
        table.add_column(col, justify="left" if col in ("x", "concept") else "right", no_wrap=True)
    for e in run["sweep"]:
        f = (e.get("fluency") or {}).get("perturbed") or {}
        for label, c in e["concepts"].items():
            row = [f"{e['strength']:g}", Text(label, style=token_style(colours.get(label), no_color=no_color)),
                   rate_text(c["control_rate"], c.get("control_ci")), rate_text(c["perturbed_rate"], c.get("perturbed_ci")),
                   rate_text(c["delta_rate"], c.get("delta_ci"), signed=True)]
            if with_random:
                row.append(rate_text(c.get("random_rate"), c.get("random_ci")))
            row += [f"{c['delta_logprob']:+.2f}", "?" if f.get("perplexity") is None else f"{f['perplexity']:.1f}",
                    f"{f.get('degenerate', 0)}/{f.get('rows', 0)}"]
            table.add_row(*row)
    base = (run.get("fluency") or {}).get("control")
    foot = Text(f"rates: Wilson 95%; ppl under the unperturbed model; control arm {_fluency_bit(base)}", style="dim")
    return Group(head, table, foot)


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
