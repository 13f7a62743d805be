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
POSITION_CHOICES = ("prompt", "prompt-last:4", "generated", "all")
DEFAULT_POSITIONS = "prompt"


MAX_POSITIONS = 1 << 20  # prompt-last:K accepts K up to this (no model reads a longer prompt)


@dataclass(frozen=True)
class Positions:
    kind: str  # prompt | prompt-last | generated | all
    k: int = 0

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
        raise ChunkError(f"Bad positions '{spec}': use prompt, prompt-last:K (K >= 1), generated or all.")

    def __str__(self) -> str:
        return f"prompt-last:{self.k}" if self.kind == "prompt-last" else self.kind
