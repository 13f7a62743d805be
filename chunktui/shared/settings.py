"""Settings and their defaults (sampling, perturbation, progress): the one source for the engine, the CLI and the app.

Kept free of torch so the app (which never imports torch) shows the same
choices and defaults the engine applies. `engine/perturb.py` re-exports these.

Why graft defaults to 0.05: the sample dictionary's chunks are wide (at
layers 2-9 their subpopulations hold about 430-470 of 576 neurons), so a = 1
all but replaces the state and breaks the answer; 0.05 on every prompt token steers it while the text
stays fluent (`benchmarks/graft_effect.py`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from chunktui.shared.errors import ChunkError

# The one progress callback type: (stage, fraction in [0, 1] or None when unknown, message).
ProgressFn = Callable[[str, "float | None", str], None]


def no_progress(stage: str, fraction: float | None, message: str) -> None:
    """A progress callback that ignores everything."""


@dataclass
class Sampling:
    """How to pick tokens. temperature 0 is greedy. Same settings and seed: same tokens."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop_strings: tuple[str, ...] = ()
    stop_at_eos: bool = True

    def describe(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": self.seed, "stop_strings": list(self.stop_strings)}



MODES = ("graft", "amplify", "freeze", "suppress", "mean-ablate")
DEFAULT_MODE = "graft"
# a for graft/amplify (1 = the template exactly), b for freeze/suppress/mean-ablate (1 = all the way)
DEFAULT_STRENGTH = {"graft": 0.05, "amplify": 2.0, "freeze": 1.0, "suppress": 0.5, "mean-ablate": 1.0}
DEFAULT_LAYERS = "2-9"  # the paper's range; each layer uses the concept's chunk of that layer
POSITION_CHOICES = ("prompt", "prompt-last:4", "prompt[-4:-1]", "generated", "all")
DEFAULT_POSITIONS = "prompt"
# continuations per prompt in each arm (CLI `perturb --samples`, the Perturb pane's samples field, Engine.compare):
# one sample at temperature 0.8 is mostly sampling noise; 4 give an interval worth reading on one prompt
DEFAULT_SAMPLES = 4
# the control intervention (engine.perturb.control_chunks): "subpopulation" moves each PA chunk onto a random
# subpopulation of the same size (its template values shuffled onto it; a direction chunk gets a random direction
# of the same norm); "direction" replaces each position's edit by one of the same norm along a random direction
CONTROL_KINDS = ("subpopulation", "direction")
SWEEP_MAX = 12  # strengths in one sweep
SITES = ("residual", "attention")
DEFAULT_SITE = "residual"
# what rules do with the prompt (docs/rules.md): "off" (they watch generated tokens only), "watch" (an intervention
# whose condition holds on the prompt is on from the first generated token), "act" (as watch, and the prompt is read
# again with the edits its matches call for, so the first answer token is guarded too). Alerts and stops watch
# generated tokens only, whatever this says.
RULES_ON_PROMPT_CHOICES = ("off", "watch", "act")
# "off" by default: "act" lowered occurrence on the development split of sample_data/guard_prompts.jsonl, but on the
# held-out split its gain was within noise (-6 points, 95% -18..+6) while perplexity rose 75% and re-reading the
# prompt costs 12% of a 48-token stream (docs/rules.md); "watch" and "act" are there for who wants them
RULES_ON_PROMPT = "off"

_SLICE = re.compile(r"prompt\[\s*(-?\d+)?\s*:\s*(-?\d+)?\s*\]")


MAX_POSITIONS = 1 << 20  # prompt-last:K accepts K up to this (no model reads a longer prompt)


@dataclass(frozen=True)
class Positions:
    """Which token positions an intervention edits.

    `prompt` (every prompt token), `prompt-last:K` (the last K), `prompt[a:b]` (a Python slice over the prompt's
    tokens, negative indices from its end: `prompt[-4:-1]` is the three tokens before the last, the paper's
    question experiment), `generated` (every generated token), `all`. Prompt kinds edit the prefill pass only.
    """

    kind: str  # prompt | prompt-last | prompt-slice | generated | all
    k: int = 0
    start: int | None = None  # prompt-slice only
    stop: int | None = None

    @staticmethod
    def parse(spec: str) -> "Positions":
        spec = (spec or "").strip()
        if spec in ("prompt", "generated", "all"):
            return Positions(spec)
        m = re.fullmatch(r"prompt-last:(\d+)", spec)
        if m and int(m.group(1)) > MAX_POSITIONS:
            raise ChunkError(f"Bad positions '{spec}': K is at most {MAX_POSITIONS:,} (the longest context a model "
                             "reads); use 'prompt' for every prompt token.")
        if m and int(m.group(1)) > 0:
            return Positions("prompt-last", int(m.group(1)))
        m = _SLICE.fullmatch(spec)
        if m:
            start, stop = (int(g) if g is not None else None for g in m.groups())
            return Positions("prompt-slice", start=start, stop=stop)
        raise ChunkError(f"Bad positions '{spec}': use prompt, prompt-last:K (K >= 1), prompt[START:STOP] "
                         "(a Python slice over the prompt's tokens, e.g. prompt[-4:-1]: the three before the last), "
                         "generated or all.")

    def prompt_indices(self, n: int) -> list[int]:
        """The prompt-token indices (0..n-1) this edits in the prefill pass of an n-token prompt."""
        if self.kind in ("prompt", "all"):
            return list(range(n))
        if self.kind == "prompt-last":
            return list(range(max(0, n - self.k), n))
        if self.kind == "prompt-slice":
            return list(range(n))[self.start:self.stop]
        return []

    def meaning(self) -> str:
        """In words, for outputs: 'prompt[-4:-1]' -> 'the 3 prompt tokens before the last (prefill only)'."""
        if self.kind == "prompt":
            return "every prompt token (prefill only)"
        if self.kind == "prompt-last":
            return f"the last {self.k} prompt tokens (prefill only)"
        if self.kind == "generated":
            return "every generated token"
        if self.kind == "all":
            return "every prompt and generated token"
        start, stop = self.start, self.stop
        if start is not None and stop is not None and start < 0 and stop < 0 and stop > start:
            n, before = stop - start, -stop
            tail = "the last" if before == 1 else f"the last {before}"
            return f"the {n} prompt token{'s' if n > 1 else ''} before {tail} (prefill only)"
        return f"prompt tokens [{'' if start is None else start}:{'' if stop is None else stop}] as a Python slice (prefill only)"

    @property
    def edits_generated(self) -> bool:
        return self.kind in ("generated", "all")

    def __str__(self) -> str:
        if self.kind == "prompt-last":
            return f"prompt-last:{self.k}"
        if self.kind == "prompt-slice":
            return f"prompt[{'' if self.start is None else self.start}:{'' if self.stop is None else self.stop}]"
        return self.kind


def check_on_prompt(value: str) -> str:
    """`off`, `watch` or `act` (what rules do with the prompt); ChunkError otherwise."""
    value = (value or "").strip().lower()
    if value not in RULES_ON_PROMPT_CHOICES:
        raise ChunkError(f"Bad --on-prompt '{value}': use off (rules watch generated tokens only), watch (an "
                         "intervention whose condition holds on the prompt is on from the first answer token) or "
                         "act (the prompt is also read again with those edits, so the first answer token is "
                         "guarded).")
    return value


def check_site(site: str) -> str:
    """`residual` or `attention`; ChunkError otherwise."""
    site = (site or "").strip().lower()
    if site not in SITES:
        raise ChunkError(f"Bad site '{site}': use residual (the stream entering each block) or attention (the "
                         "input of each block's attention-side norm; the residual stream is left as it was).")
    return site


# --------------------------------------------------------------------------- protocols
# The paper's question experiment (swu32/Chunk-Interpretability, PA/grafting_effectiveness_across_contexts.ipynb,
# load_dictionary_and_perturb_batch / load_dictionary_and_freeze_batch), with matched sampling. docs/method.md
# section 3.4 states it and its confounds.
PROTOCOLS = ("default", "paper")
PAPER_PROTOCOL = {
    "site": "residual",  # forward pre-hook on decoder blocks: the stream entering the block
    "layers": "2-9",  # range(2, 10)
    "positions": "prompt[-4:-1]",  # modified_input[:, token_idx-3:token_idx] with token_idx=-1, prefill only
    "strength": {"graft": 1.0, "freeze": 1.0},  # graft: the template exactly; freeze: to 0
    "top_p": 0.9,  # both arms (the code: control 0.5, grafted 0.9; see PAPER_CONFOUNDS)
    # the code leaves temperature unset, so generate() takes the checkpoint's generation config; Meta's Llama 3
    # configs we know of set 0.6 (not verified for the base Meta-Llama-3-8B here)
    "temperature": 0.6,
    "chat": False,  # a raw TREC question fed to a base model, no chat template
    "max_new_tokens": 190,  # the code's max_length=200 counts the prompt (TREC questions: about 10 tokens)
    "chunk_layer_shift": 0,  # block l writes the chunk of layer l
    "control_top_p": None,  # None: the control arm samples like the perturbed arm
    "score_prompt": False,  # occurrence is scored on the continuation only
}
# The code's three deviations, added by --paper-confounds to measure how much they move the result.
PAPER_CONFOUNDS = {
    "chunk_layer_shift": 1,  # at block l the code writes the chunk learned at layer l-1 (layerchunk[l-1])
    "control_top_p": 0.5,  # get_model_response_batch samples the control with top-p 0.5, the grafted arm 0.9
    "score_prompt": True,  # batch_decode(output) includes the prompt, so the word is also looked for in it
}
CONFOUND_LABEL = ("PAPER CONFOUNDS ON (chunk of layer l-1 at block l; control top-p 0.5 vs perturbed 0.9; "
                  "scoring includes the prompt): for measuring their effect, not a fair comparison")


def protocol_settings(protocol: str | None, confounds: bool = False) -> dict:
    """The settings a protocol fixes (empty for 'default'), with the confounds when asked (they imply 'paper').

    Individual options override these: callers apply only the keys the user did not set.
    """
    protocol = (protocol or "default").strip().lower()
    if protocol not in PROTOCOLS:
        raise ChunkError(f"Unknown protocol '{protocol}': use {' or '.join(PROTOCOLS)}.")
    if confounds:
        protocol = "paper"  # the confounds are the paper code's: they come with its protocol
    out = dict(PAPER_PROTOCOL) if protocol == "paper" else {}
    if protocol == "paper":
        out["strength"] = dict(out["strength"])
    if confounds:
        out.update(PAPER_CONFOUNDS)
    return out


# chunktui's own defaults for the keys a protocol can fix (the CLI's and the app's defaults)
CHUNKTUI_PERTURB_DEFAULTS = {"site": DEFAULT_SITE, "layers": DEFAULT_LAYERS, "positions": DEFAULT_POSITIONS,
                             "strength": None, "top_p": 0.9, "temperature": 0.8, "chat": True,
                             "max_new_tokens": 48, "chunk_layer_shift": 0, "control_top_p": None,
                             "score_prompt": False}


def resolve_protocol(protocol: str | None, confounds: bool, mode: str, given: dict) -> dict:
    """Every perturbation setting: what the user set (`given`, None = not set) over the protocol over chunktui's
    defaults. `strength` None means the mode's default. Adds `protocol`, `paper_confounds` and `overridden`
    (the protocol's keys the user set otherwise), so outputs can print the whole of it."""
    fixed = protocol_settings(protocol, confounds)
    out = {}
    for key, default in CHUNKTUI_PERTURB_DEFAULTS.items():
        value = _fixed_value(fixed, key, default, mode)
        out[key] = given[key] if given.get(key) is not None else value
    out["strength"] = DEFAULT_STRENGTH[mode] if out["strength"] is None else out["strength"]
    out["positions_meaning"] = Positions.parse(out["positions"]).meaning()
    if confounds:
        out["label"] = CONFOUND_LABEL
    out["protocol"] = "paper" if (confounds or (protocol or "default").lower() == "paper") else "default"
    out["paper_confounds"] = bool(confounds)
    out["mode"] = mode
    out["overridden"] = overridden(out)
    return out


def _fixed_value(fixed: dict, key: str, default, mode: str):
    value = fixed.get(key, default)
    if key == "strength" and isinstance(value, dict):
        value = value.get(mode)  # the protocol fixes graft and freeze; other modes keep their default
    return value


def overridden(settings: dict) -> list[str]:
    """The keys of resolved `settings` that differ from what their protocol fixes (set by the user)."""
    fixed = protocol_settings(settings.get("protocol"), settings.get("paper_confounds", False))
    return [key for key in fixed if key in settings
            and settings[key] != _fixed_value(fixed, key, None, settings.get("mode", DEFAULT_MODE))]


def protocol_lines(settings: dict) -> list[str]:
    """The resolved settings as lines for a terminal or a report, the confound label first when they are on."""
    lines = [CONFOUND_LABEL] if settings.get("paper_confounds") else []
    shift = settings.get("chunk_layer_shift", 0)
    control = settings.get("control_top_p")
    lines.append(
        f"protocol {settings.get('protocol', 'default')}: site {settings.get('site')}, blocks {settings.get('layers')}"
        f"{' (chunk of layer l-%d at block l)' % shift if shift else ''}, positions {settings.get('positions')}, "
        f"strength {settings.get('strength')}, T={settings.get('temperature')}, top-p {settings.get('top_p')}"
        f"{' (control arm %s)' % control if control is not None else ' in both arms'}, "
        f"chat template {'on' if settings.get('chat') else 'off'}, max new tokens {settings.get('max_new_tokens')}, "
        f"scoring {'prompt + continuation' if settings.get('score_prompt') else 'the continuation only'}"
        + (f"; set by you: {', '.join(settings['overridden'])}" if settings.get("overridden") else ""))
    return lines


def launched_by_torchrun() -> bool:
    """This process is one rank of a `torchrun` (or `--procs K`) group: WORLD_SIZE > 1 and RANK set."""
    import os

    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
