"""Model pane: spec, device, dtype, Load with progress; the model card; the dictionary picker."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.suggester import SuggestFromList
from textual.widgets import Button, Checkbox, Input, Label, OptionList, ProgressBar, Select, Static
from textual.widgets.option_list import Option

from chunktui.shared import specs
from chunktui.shared.specs import catalog

from chunktui.tui.plain import plain, safe

# what the engine accepts; the engine process sends its own list once it is up (set_catalog)
CATALOG = catalog()
DEVICE_MAPS = ["none", *specs.DEVICE_MAPS]
DEVICES = list(specs.DEVICE_CHOICES)
DTYPES = list(specs.DTYPE_CHOICES)


class ModelPane(Vertical):
    BINDINGS = [Binding("ctrl+l", "app.load", "load")]

    def __init__(self, spec: str, device: str, dtype: str, placement: dict | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.spec, self.device, self.dtype = spec, device, dtype
        self.placement = dict(placement or {})  # device_map, max_memory, offload_folder, offline (from the CLI)
        self.entries: list = []  # protocol.DictionaryEntry
        self._card_text: Text | None = None  # the card as last drawn

    def compose(self) -> ComposeResult:
        aliases = CATALOG
        with Horizontal(classes="form-row"):
            yield Label("Model", classes="field-label")
            yield Input(self.spec, id="model-spec", placeholder="alias, .gguf, folder or owner/name",
                        suggester=SuggestFromList(aliases, case_sensitive=False), compact=True)
            yield Select([(d, d) for d in DEVICES], value=self.device if self.device in DEVICES else "auto",
                         allow_blank=False, id="model-device", compact=True)
            yield Select([(d, d) for d in DTYPES], value=self.dtype if self.dtype in DTYPES else "auto",
                         allow_blank=False, id="model-dtype", compact=True)
            yield Button("Load", id="model-load", variant="primary", compact=True)
        with Horizontal(classes="form-row"):  # placement, with accelerate's meanings (see the README)
            yield Label("Shard", classes="field-label")
            current = self.placement.get("device_map") or "none"
            yield Select([(m, m) for m in DEVICE_MAPS], value=current if current in DEVICE_MAPS else "none",
                         allow_blank=False, id="model-device-map", compact=True)
            yield Label("max memory", classes="field-label short")
            yield Input(self.placement.get("max_memory") or "", id="model-max-memory", placeholder="0=70GiB,cpu=200GiB",
                        compact=True)
            yield Label("offload", classes="field-label short")
            yield Input(self.placement.get("offload_folder") or "", id="model-offload", placeholder="folder",
                        compact=True)
            yield Checkbox("offline", value=bool(self.placement.get("offline")), id="model-offline", compact=True)
        with Horizontal(classes="form-row"):
            yield ProgressBar(total=1.0, show_eta=False, id="load-progress")
            yield Label("", id="load-stage")
        yield Static(Text("built-in: " + ", ".join(aliases), style="dim"), classes="hint")
        with Horizontal(id="model-body"):
            with VerticalScroll(id="model-card-box"):
                yield Static("No model loaded.", id="model-card")
            with Vertical(id="dict-box"):
                yield Label("Dictionaries (Enter to use)", classes="box-title")
                yield OptionList(id="dict-list")
                with Horizontal(classes="form-row"):
                    yield Input(id="dict-path", placeholder="add a dictionary file…", compact=True)
                    yield Button("Add", id="dict-add", compact=True)
                yield Static("", id="dict-why")

    def set_catalog(self, catalog: list[str]) -> None:
        self.query_one("#model-spec", Input).suggester = SuggestFromList(catalog, case_sensitive=False)
        self.query_one(".hint", Static).update(Text("built-in: " + ", ".join(catalog), style="dim"))

    # ------------------------------------------------------------------ values

    def values(self) -> tuple[str, str, str]:
        spec = self.query_one("#model-spec", Input).value.strip()
        return spec, str(self.query_one("#model-device", Select).value), str(self.query_one("#model-dtype", Select).value)

    def placement_values(self) -> dict:
        """The placement fields as load_model keywords (the engine checks them and explains bad ones)."""
        device_map = str(self.query_one("#model-device-map", Select).value)
        return {"device_map": None if device_map == "none" else device_map,
                "max_memory": self.query_one("#model-max-memory", Input).value.strip() or None,
                "offload_folder": self.query_one("#model-offload", Input).value.strip() or None,
                "offline": bool(self.query_one("#model-offline", Checkbox).value)}

    def show_progress(self, stage: str, fraction: float | None, text: str) -> None:
        bar = self.query_one("#load-progress", ProgressBar)
        if fraction is None:
            bar.update(total=None)
        else:
            bar.update(total=1.0, progress=fraction)
        self.query_one("#load-stage", Label).update(plain(f"{stage}: {text}", one=True))

    def show_card(self, card: dict | None, show_timing: bool = True, memory: list[dict] | None = None) -> None:
        if card is None:
            self._card_text = None
            self.query_one("#model-card", Static).update("No model loaded.")
            return
        code = card.get("model_code")
        forward = {"chunktui-llama": "chunktui's LLaMA (= transformers')", "transformers": "transformers"}.get(code, code)
        rows = [("name", card["name"]), ("architecture", card["architecture"]),
                *([("forward", forward)] if forward else []), ("layers", str(card["layers"])),
                ("width", str(card["width"])), ("parameters", f"{card['parameters'] / 1e6:.2f} M"),
                ("device", card["device"]), ("dtype", card["dtype"]), ("memory", f"{card['memory_mb']:.1f} MB"),
                ("load time", f"{card['load_seconds']:.2f} s" if show_timing else "—"),
                ("chat template", "yes" if card["chat_template"] else "no"), ("source", str(card.get("source", "")))]
        if card.get("placement"):
            rows.insert(rows.index(("device", card["device"])) + 1, ("placement", str(card["placement"])))
        for r in memory or []:  # per device: weights, KV cache so far, values kept per token; free of total
            gib = lambda n: "?" if n is None else f"{n / 2**30:.2f} GiB"  # noqa: E731
            free = "" if r.get("free") is None else f"; {gib(r['free'])} free of {gib(r['total'])}"
            peak = "" if not r.get("peak") else f"; peak {gib(r['peak'])}"
            rows.append((f"mem {r['device']}", f"weights {gib(r['weights'])}, KV cache {gib(r['kv_cache'])}, "
                                               f"kept {gib(r['states'])}{free}{peak}"))
        card_text = Text()
        for key, value in rows:
            card_text.append(f"{key:<14}", style="bold")
            card_text.append(f"{safe(value, one=True)}\n")
        box = self.query_one("#model-card", Static)
        if card_text == self._card_text:
            return
        self._card_text = card_text
        # a job's end brings new memory figures; while another pane is shown the card is not laid out now (a
        # layout pass of the whole screen, ~10 ms, just as the stream ends): the pane's showing lays it out
        box.update(card_text, layout=box.is_on_screen)

    def show_dictionaries(self, entries: list, current: str | None) -> None:
        """Valid dictionaries are selectable; the others are greyed out with the reason."""
        self.entries = entries
        options = self.query_one("#dict-list", OptionList)
        options.clear_options()
        highlight = None
        for i, entry in enumerate(entries):
            name = Path(entry.path).name
            if entry.problem is None:
                mark = "● " if (current and Path(current) == Path(entry.path)) or len(entries) == 1 else "  "
                prompt = plain(f"{mark}{name}  ({entry.chunks} chunks, {entry.concepts} concepts)", one=True)
                if mark.strip():
                    highlight = i
            else:
                prompt = plain(f"✗ {name}: {entry.problem}", style="dim")
            options.add_option(Option(prompt, id=str(i), disabled=entry.problem is not None))
        if highlight is not None:
            options.highlighted = highlight
        valid = sum(e.problem is None for e in entries)
        why = f"{valid} of {len(entries)} usable with this model" if entries else "no dictionaries found"
        self.query_one("#dict-why", Static).update(plain(why, style="dim"))
