"""How the app starts: one `AppOptions` object, built by the CLI, the benchmark, the screenshots and the tests.

`AppOptions()` is a bare start (nothing filled in); `AppOptions.for_users(...)`
fills in what users get by default: the sample dictionary, the sample
sequences, and the dictionary folders the picker searches.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from chunktui.shared.specs import DEFAULT_MODEL


@dataclass
class AppOptions:
    model_spec: str = DEFAULT_MODEL
    dict_path: str | None = None  # the dictionary loaded with the model
    device: str = "auto"
    dtype: str = "auto"
    dict_dirs: list[Path] = field(default_factory=list)  # folders the dictionary picker lists
    sequences_path: str = ""  # the Step pane's file
    show_timing: bool = True  # False in tests and snapshots: no machine-dependent figures on screen
    autoload: bool = True  # load the model as soon as the engine is up
    threads: int | None = None  # the engine process's torch threads
    engine_mode: str = "process"  # "thread" in tests: the same server and protocol, in a thread
    prompt: str | None = None  # `tui --prompt`: stream this as soon as the model is loaded
    max_new_tokens: int | None = None
    open_step: bool = False  # `tui --file`: open on the Step pane
    stop_at_eos: bool = True
    restore: bool = False  # `tui --restore`
    journal: bool = True  # journal the session (off for the benchmark)
    placement: dict = field(default_factory=dict)  # device_map, max_memory, offload_folder, offline

    def __post_init__(self) -> None:
        self.model_spec = self.model_spec or DEFAULT_MODEL
        self.dict_path = str(self.dict_path) if self.dict_path else None
        self.dict_dirs = [Path(d) for d in (self.dict_dirs or [])]
        self.sequences_path = str(self.sequences_path or "")
        self.placement = dict(self.placement or {})

    @classmethod
    def for_users(cls, **fields) -> "AppOptions":
        """The app as users get it: unset dictionary, sequences and picker folders get the samples' defaults.

        Defaults: the built-in model, the sample dictionary (none for the reflection RNN, which brings its own),
        the sample sequences, and every `*.chunks.safetensors` in sample_data/ and the working folder offered
        in the dictionary picker.
        """
        from chunktui.paths import DEFAULT_DICT_NAME, sample_path

        unknown = set(fields) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise TypeError(f"unknown app options: {', '.join(sorted(unknown))}")
        rnn = (fields.get("model_spec") or "").strip().lower().startswith("rnn:")
        if fields.get("dict_dirs") is None:
            fields["dict_dirs"] = [sample_path(DEFAULT_DICT_NAME).parent, Path.cwd()]
        if fields.get("dict_path") is None and not rnn:
            fields["dict_path"] = str(sample_path(DEFAULT_DICT_NAME))
        if fields.get("sequences_path") is None:
            fields["sequences_path"] = str(sample_path("rnn_sequences.txt" if rnn else "sequences.jsonl"))
        if fields.get("placement") is None:
            fields.pop("placement", None)
        return cls(**fields)
