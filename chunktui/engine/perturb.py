"""Perturbation (docs/method.md section 3): grafting and suppressing chunks in the residual stream.

An `Intervention` edits H[l] (the stream entering block l) through a forward
pre-hook on block l, so the residual connection carries the edit forward and
edited keys/values stay in the KV cache. For a PA chunk with subpopulation M
and template mu:

    graft / amplify   h[M] <- h[M] + a * (mu[M] - h[M])     a = 1 graft, a > 1 amplify
    freeze / suppress h[M] <- (1 - b) * h[M]                b = 1 freeze
    mean-ablate       h[M] <- h[M] + b * (mean[M] - h[M])   mean = corpus mean of layer l

For a direction chunk (unit u, typical projection p):

    graft / amplify   h <- h + a * (p - <h, u>) u
    freeze / suppress h <- h - b * <h, u> u

Positions: `prompt` (all prompt tokens), `prompt-last:K` (the last K prompt
tokens), `prompt[a:b]` (a Python slice over the prompt's tokens; the paper's
`prompt[-4:-1]`), `generated` (every generated token), `all`. Hooks are
removed on every exit path.

Sites: `residual` (above) or `attention`: the same edit on the input of each
block's attention-side norm (`ModelLayout.attention_norm`), so attention reads
the edited values while the residual stream, and so the MLP and later blocks'
skip connections, carry the unedited ones.
"""

from __future__ import annotations

import contextlib
import difflib
import re
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from chunktui.engine.dictionary import Chunk, ChunkDictionary
from chunktui.shared.errors import ChunkError
from chunktui.engine.hooks import block_hooks
from chunktui.engine.devices import module_device
from chunktui.engine.models import LoadedModel
from chunktui.shared.settings import DEFAULT_STRENGTH, MODES, Positions, check_site  # noqa: F401  (one source of truth)
from chunktui.engine.streaming import PhaseFlag, decode
from chunktui.shared.settings import Sampling
from chunktui.engine.tokens import encode_prompt, eos_ids

@dataclass
class Intervention:
    """Which chunks to write or wipe, how strongly, at which layers and positions."""

    chunks: list[Chunk]  # one or more per layer
    mode: str = "graft"
    strength: float | None = None
    positions: Positions = field(default_factory=lambda: Positions("prompt"))
    layer_means: torch.Tensor | None = None  # (L+1, d) corpus means, for mean-ablate
    site: str = "residual"  # residual | attention
    chunk_layer_shift: int = 0  # block l writes the chunk of layer l - shift (the paper's code: 1)

    def __post_init__(self):
        self.site = check_site(self.site)
        if self.mode not in MODES:
            raise ChunkError(f"Unknown mode '{self.mode}': use one of {', '.join(MODES)}.")
        if self.strength is None:
            self.strength = DEFAULT_STRENGTH[self.mode]
        if not self.chunks:
            raise ChunkError("The intervention names no chunks.")
        if self.mode == "mean-ablate" and self.layer_means is None:
            raise ChunkError("mean-ablate needs the corpus mean of each layer, and this dictionary has none; "
                             "rebuild it with this version of chunktui.")

    @property
    def layers(self) -> list[int]:
        """The blocks edited."""
        return sorted({c.layer + self.chunk_layer_shift for c in self.chunks})

    def describe(self) -> dict:
        out = {"mode": self.mode, "strength": self.strength, "positions": str(self.positions),
               "layers": self.layers, "site": self.site, "chunks": [c.id for c in self.chunks],
               "labels": sorted({c.label for c in self.chunks})}
        if self.chunk_layer_shift:
            out["chunk_layer_shift"] = self.chunk_layer_shift
            out["chunk_layers"] = sorted({c.layer for c in self.chunks})
        return out


def select_chunks(dictionary: ChunkDictionary, names: Sequence[str], layers: Sequence[int] | None) -> list[Chunk]:
    """Chunks by id or label. With `layers`, each layer uses that concept's chunk of the same layer."""
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise ChunkError("Name at least one chunk (by label or id).")
    known_labels = set(dictionary.labels())
    known_ids = {c.id for c in dictionary.chunks}
    unknown = [n for n in names if n not in known_labels and n not in known_ids]
    if unknown:
        raise ChunkError(f"No chunk named {', '.join(repr(u) for u in unknown)} in {dictionary.path.name if dictionary.path else 'the dictionary'}; "
                         f"labels include {', '.join(sorted(known_labels)[:12])}.")
    chunks = dictionary.select(names, layers=list(layers) if layers is not None else None)
    if layers is None:
        # a bare label means every layer it has; an id means that chunk
        return chunks
    missing = sorted(set(layers) - {c.layer for c in chunks})
    if not chunks:
        raise ChunkError(f"{', '.join(names)} has no chunk at layers {list(layers)}.")
    if missing:
        pass  # layers where the concept has no chunk are simply not edited
    return chunks


class _LayerEdit:
    """Precomputed edit for one layer: PA subpopulations and direction chunks."""

    def __init__(self, chunks: list[Chunk], mode: str, strength: float, mean: torch.Tensor | None, device, dtype):
        self.device = torch.device(device)
        self.mode, self.strength = mode, float(strength)
        self.pa = [(c.subpopulation.long().to(device), c.template.to(device, torch.float32)) for c in chunks if c.kind == "pa"]
        self.dirs = [(c.direction.to(device, torch.float32) / c.direction.float().norm(), float(c.typical or 0.0))
                     for c in chunks if c.kind == "direction"]
        self.mean = mean.to(device, torch.float32) if mean is not None else None
        if mode == "mean-ablate" and (self.mean is None or not torch.isfinite(self.mean).all()):
            raise ChunkError("mean-ablate: the dictionary has no corpus mean for this layer; rebuild it with "
                             "hidden states collected at every layer it edits.")

    def apply(self, h: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """h: (B, T, d); where: (B, T) bool -> edited copy (float math, original dtype)."""
        out = h.float().clone()
        a = self.strength
        sel = where[..., None]
        for neurons, template in self.pa:
            sub = out[..., neurons]  # (B, T, m)
            if self.mode in ("graft", "amplify"):
                new = sub + a * (template - sub)
            elif self.mode in ("freeze", "suppress"):
                new = (1.0 - a) * sub
            else:  # mean-ablate
                new = sub + a * (self.mean[neurons] - sub)
            out[..., neurons] = torch.where(sel, new, sub)
        for u, typical in self.dirs:
            proj = (out * u).sum(-1, keepdim=True)  # (B, T, 1)
            if self.mode in ("graft", "amplify"):
                delta = a * (typical - proj) * u
            elif self.mode in ("freeze", "suppress"):
                delta = -a * proj * u
            else:
                delta = a * (((self.mean * u).sum()) - proj) * u
            out = torch.where(sel, out + delta, out)
        return out.to(h.dtype)


@contextlib.contextmanager
def intervene(loaded: LoadedModel, intervention: Intervention | None, phase: PhaseFlag,
              prompt_lengths: Sequence[int] | None = None) -> Iterator[None]:
    """Install the intervention's edit hooks (`hooks.block_hooks`) for the duration of the block; always removed."""
    if intervention is None:
        yield
        return
    layout = loaded.layout
    bad = [l for l in intervention.layers if l >= layout.n_layers]
    if bad:
        raise ChunkError(f"Layer {bad[0]} is the output of the final norm; interventions edit the stream entering "
                         f"blocks 0..{layout.n_layers - 1}.")
    positions = intervention.positions

    def make_hook(edit: _LayerEdit):
        def hook(module, args, kwargs):
            # On a dispatched model the stream arrives from the previous block's device; the edit runs where
            # this block computes (its templates live there), which is where accelerate would move it anyway.
            key = None if args else next(k for k in ("hidden_states", "input", "x") if k in kwargs)
            h = args[0] if args else kwargs[key]
            if h.device != edit.device:
                h = h.to(edit.device)
            B, T, _ = h.shape
            if phase.phase == "prefill":
                if positions.kind == "generated":
                    return None
                where = prefill_mask(positions, B, T, prompt_lengths, h.device)
            else:
                if not positions.edits_generated:
                    return None
                where = torch.ones(B, T, dtype=torch.bool, device=h.device)
            new = edit.apply(h, where)
            if args:
                return (new,) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs, **{key: new})
            return args, kwargs
        return hook

    edits = {}
    shift = intervention.chunk_layer_shift
    for layer in intervention.layers:
        chunks = [c for c in intervention.chunks if c.layer + shift == layer]
        mean = intervention.layer_means[layer - shift] if intervention.layer_means is not None else None
        device = module_device(layout.blocks[layer], loaded.device)  # this block's device, when dispatched
        edits[layer] = make_hook(_LayerEdit(chunks, intervention.mode, intervention.strength, mean, device, loaded.dtype))
    with block_hooks(layout, edits=edits, site=intervention.site):
        yield


def prefill_mask(positions: Positions, batch: int, width: int, prompt_lengths: Sequence[int] | None,
                 device=None) -> torch.Tensor:
    """(batch, width) bool: the prefill columns `positions` edits. Prompts are left-padded to `width`; padding
    is never edited. Without `prompt_lengths` every row is taken to fill the width."""
    lengths = list(prompt_lengths) if prompt_lengths is not None else [width] * batch
    where = torch.zeros(batch, width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        n = min(int(n), width)
        for i in positions.prompt_indices(n):
            where[row, width - n + i] = True
    return where.to(device) if device is not None else where


# --------------------------------------------------------------------------- comparison runner


def occurs(word: str, text: str) -> bool:
    """Whole word, case-insensitive."""
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text, flags=re.IGNORECASE) is not None


def first_token_ids(loaded: LoadedModel, word: str) -> list[int]:
    """First token of the word as the model would write it: mid-sentence or opening an answer, either case."""
    tok = loaded.tokenizer
    out = []
    cap = word[:1].upper() + word[1:]
    for form in (" " + word, " " + cap, word, cap):
        ids = tok(form, add_special_tokens=False)["input_ids"]
        if ids and ids[0] not in out:
            out.append(ids[0])
    return out


def token_diff(tokenizer, a: list[int], b: list[int]) -> list[dict]:
    """Token-level diff of two continuations: equal / replace / delete / insert runs with their text."""
    ops = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        ops.append({"op": tag, "control": tokenizer.decode(a[i1:i2]), "perturbed": tokenizer.decode(b[j1:j2])})
    return ops


@dataclass
class Continuation:
    prompt: str
    seed: int
    ids: list[int]
    text: str


def run_arm(loaded: LoadedModel, prompts: list[str], seeds_per_prompt: int, sampling: Sampling,
            intervention: Intervention | None, chat: bool = True, batch_size: int = 16,
            cancel: threading.Event | None = None, progress=None) -> list[Continuation]:
    """Generate every (prompt, seed) row, batched and left-padded. Row seeds are the same in every arm."""
    rows = [(p, sampling.seed + s) for p in prompts for s in range(seeds_per_prompt)]
    encoded = {p: encode_prompt(loaded, p, chat) for p in prompts}
    stops = eos_ids(loaded)
    out: list[Continuation] = []
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        ids = [encoded[p] for p, _ in batch]
        phase = PhaseFlag()
        generated: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        with intervene(loaded, intervention, phase, prompt_lengths=[len(i) for i in ids]):
            steps = decode(loaded, ids, sampling, seeds=[s for _, s in batch], cancel=cancel, phase=phase)
            for step in steps:
                for i, t in enumerate(step.tokens.tolist()):
                    if not done[i]:
                        generated[i].append(t)
                        done[i] = t in stops
                if all(done):
                    break
            steps.close()
        for (p, s), g in zip(batch, generated):
            text = loaded.tokenizer.decode([t for t in g if t not in stops], skip_special_tokens=True)
            out.append(Continuation(prompt=p, seed=s, ids=g, text=text))
        if progress is not None:
            progress(min(b + batch_size, len(rows)), len(rows))
    return out


@torch.no_grad()
def next_token_logprobs(loaded: LoadedModel, prompts: list[str], intervention: Intervention | None, chat: bool = True,
                        batch_size: int = 16) -> torch.Tensor:
    """(P, V) log-probabilities of the first answer token after each prompt, with the intervention in place."""
    out = []
    pad = loaded.tokenizer.pad_token_id or 0
    from chunktui.engine.streaming import left_pad

    for b in range(0, len(prompts), batch_size):
        rows = [encode_prompt(loaded, p, chat) for p in prompts[b:b + batch_size]]
        ids, mask = left_pad(rows, pad)
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        phase = PhaseFlag()
        with intervene(loaded, intervention, phase, prompt_lengths=[len(r) for r in rows]):
            logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False).logits
        out.append(logits[:, -1].float().log_softmax(-1).cpu())
    return torch.cat(out)


def scored_text(row: Continuation, score_prompt: bool = False) -> str:
    """What occurrence is scored on: the continuation, or prompt + continuation (the paper code's confound)."""
    return f"{row.prompt} {row.text}" if score_prompt else row.text


@dataclass
class ComparisonReport:
    settings: dict
    intervention: dict
    concepts: dict  # label -> {control_rate, perturbed_rate, delta_rate, logprob_control, logprob_perturbed, delta_logprob}
    pairs: list[dict]
    protocol: dict | None = None  # the resolved protocol settings (Engine.compare), printed in full

    def to_json(self) -> dict:
        out = {"settings": self.settings, "intervention": self.intervention, "concepts": self.concepts,
               "pairs": self.pairs}
        if self.protocol is not None:
            out["protocol"] = self.protocol
        return out


def compare(loaded: LoadedModel, intervention: Intervention, prompts: list[str], samples: int = 1,
            sampling: Sampling | None = None, chat: bool = True, batch_size: int = 16,
            control: list[Continuation] | None = None, cancel: threading.Event | None = None,
            progress=None, control_sampling: Sampling | None = None, score_prompt: bool = False,
            match_dictionary: ChunkDictionary | None = None) -> ComparisonReport:
    """Same prompts, sampling settings and seeds with and without the intervention.

    `control_sampling` (the paper code's confound: top-p 0.5 in the control arm) and `score_prompt` (the word is
    also looked for in the prompt, as the code's batch_decode of prompt + continuation does) exist to measure
    those deviations; both are recorded in the settings."""
    if not prompts:
        raise ChunkError("No prompts to compare on.")
    sampling = sampling or Sampling(max_new_tokens=48, temperature=0.8, top_p=0.9)
    control_sampling = control_sampling or sampling
    if control is None:
        control = run_arm(loaded, prompts, samples, control_sampling, None, chat, batch_size, cancel,
                             progress=(lambda d, t: progress("control", d / t)) if progress else None)
    perturbed = run_arm(loaded, prompts, samples, sampling, intervention, chat, batch_size, cancel,
                           progress=(lambda d, t: progress("perturbed", d / t)) if progress else None)
    lp_control = next_token_logprobs(loaded, prompts, None, chat, batch_size)
    lp_perturbed = next_token_logprobs(loaded, prompts, intervention, chat, batch_size)
    concepts = {}
    for label in sorted({c.label for c in intervention.chunks}):
        ids = first_token_ids(loaded, label)
        lc = lp_control[:, ids].logsumexp(-1)  # probability of any first-token form, in log space
        lpert = lp_perturbed[:, ids].logsumexp(-1)
        c_rate = sum(occurs(label, scored_text(c, score_prompt)) for c in control) / len(control)
        p_rate = sum(occurs(label, scored_text(c, score_prompt)) for c in perturbed) / len(perturbed)
        concepts[label] = {"control_rate": c_rate, "perturbed_rate": p_rate, "delta_rate": p_rate - c_rate,
                           "logprob_control": float(lc.mean()), "logprob_perturbed": float(lpert.mean()),
                           "delta_logprob": float((lpert - lc).mean()),
                           "first_tokens": [loaded.tokenizer.decode([i]) for i in ids], "rows": len(control)}
    pairs = []
    for c, p in zip(control, perturbed):
        pairs.append({"prompt": c.prompt, "seed": c.seed, "control": c.text, "perturbed": p.text,
                      "diff": token_diff(loaded.tokenizer, c.ids, p.ids)})
    if match_dictionary is not None:  # what changed, layer by layer (`layer_match_diff`)
        for pair, c, p in zip(pairs, control, perturbed):
            pair["layer_diff"] = layer_match_diff(loaded, match_dictionary, intervention,
                                                  encode_prompt(loaded, c.prompt, chat), c, p)
    settings = dict(sampling.describe(), chat=chat, samples=samples, prompts=len(prompts),
                    identical_sampling_both_arms=control_sampling == sampling, scoring_includes_prompt=score_prompt)
    if control_sampling != sampling:
        settings["control_sampling"] = control_sampling.describe()
    return ComparisonReport(settings=settings,
                            intervention=intervention.describe(), concepts=concepts, pairs=pairs)


# --------------------------------------------------------------------------- what changed, layer by layer


@torch.no_grad()
def replay_states(loaded: LoadedModel, prompt_ids: list[int], generated: list[int],
                  intervention: Intervention | None) -> torch.Tensor:
    """(len(generated), L+1, d): each generated token's states as its run computed them (the state of a token is
    the one computed when it is fed), with the run's intervention in place: the prompt in a prefill pass, the
    generated tokens in one decode pass over the KV cache, so edits fall where they fell in the run."""
    from chunktui.engine.hooks import ResidualRecorder
    from chunktui.engine.streaming import _cache_arg, _cache_out

    layout = loaded.layout
    if not generated:
        return torch.zeros(0, layout.n_states, loaded.hidden_size)
    phase = PhaseFlag()
    with intervene(loaded, intervention, phase, prompt_lengths=[len(prompt_ids)]):
        out = loaded.model(input_ids=torch.tensor([prompt_ids], device=loaded.device), use_cache=True)
        phase.phase = "decode"
        with ResidualRecorder(layout) as rec:
            loaded.model(input_ids=torch.tensor([generated], device=loaded.device), use_cache=True,
                         **{_cache_arg(loaded.model): _cache_out(out)})
        return rec.states()[0].float().cpu()


def layer_match_diff(loaded: LoadedModel, dictionary: ChunkDictionary, intervention: Intervention,
                     prompt_ids: list[int], control: Continuation, perturbed: Continuation) -> dict:
    """For each generated token and layer: the chunks matched in the control run and in the perturbed run, and
    their difference (appeared: matched only when perturbed; disappeared: only in the control).

    Tokens are paired by index; `diverged_at` is the first index where the two texts' tokens differ (None when
    they agree throughout) and each token says whether it is still `aligned` (same token, same prefix). Only
    layers where either run matched something are listed."""
    from chunktui.engine.matching import PackedDictionary

    stops = eos_ids(loaded)
    a = [t for t in control.ids if t not in stops]
    b = [t for t in perturbed.ids if t not in stops]
    layers = list(range(loaded.layout.n_states))
    packed = PackedDictionary(dictionary.chunks, loaded.hidden_size, layers)
    hits = []
    for ids, iv in ((a, None), (b, intervention)):
        states = replay_states(loaded, prompt_ids, ids, iv)
        hits.append(packed.match(states).hit.cpu() if len(ids) else torch.zeros(0, len(packed.chunks), dtype=torch.bool))
    names = [c.id for c in packed.chunks]
    chunk_layer = [c.layer for c in packed.chunks]
    diverged = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if diverged is None and len(a) != len(b):
        diverged = min(len(a), len(b))
    tokens = []
    tok = loaded.tokenizer
    for i in range(min(len(a), len(b))):
        per_layer = {}
        by_layer: dict[int, tuple[list[str], list[str]]] = {}
        for side, row in enumerate((hits[0][i], hits[1][i])):
            for c in row.nonzero().flatten().tolist():
                by_layer.setdefault(chunk_layer[c], ([], []))[side].append(names[c])
        for layer in sorted(by_layer):
            ca, cb = sorted(by_layer[layer][0]), sorted(by_layer[layer][1])
            if ca or cb:
                per_layer[str(layer)] = {"control": ca, "perturbed": cb, "appeared": sorted(set(cb) - set(ca)),
                                         "disappeared": sorted(set(ca) - set(cb))}
        tokens.append({"index": i, "control": tok.decode([a[i]]), "perturbed": tok.decode([b[i]]),
                       "aligned": diverged is None or i < diverged, "layers": per_layer})
    return {"diverged_at": diverged, "tokens": tokens}
