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

A control intervention (`control_intervention`) edits as much, somewhere
else: `subpopulation` moves each PA chunk onto a random subpopulation of the
same size (its template values shuffled onto it) and each direction chunk
onto a random direction of the same norm; `direction` keeps the real edit's
norm at every position but points it along a random unit direction (one per
layer). Both are seeded. `compare` runs the arms (control = no edit,
perturbed, and the random control when asked) with the same prompts, sampling
settings and per-row seeds, at one strength or a sweep, and reports each
arm's occurrence rate with a Wilson interval and its fluency
(`shared.perturb_stats`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
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
from chunktui.shared.settings import (CONTROL_KINDS, DEFAULT_SAMPLES, DEFAULT_STRENGTH, MODES,  # noqa: F401
                                      Positions, ProgressFn, check_site)  # (one source of truth)
from chunktui.shared import perturb_stats as stats
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
    # a control intervention (see `control_intervention`): its kind and seed; "direction" is applied by the hooks
    control: str | None = None
    control_seed: int = 0
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
        if self.control is not None:
            out["control"] = {"kind": self.control, "seed": self.control_seed}
        return out


def _direction_seed(seed: int, layer: int) -> int:
    return (int(seed) * 1_000_003 + int(layer) * 7_919 + 17) % (2**63 - 1)


def random_direction(width: int, seed: int, layer: int) -> torch.Tensor:
    """The control's unit direction at one layer (float32, CPU): the same for the same seed and layer."""
    g = torch.Generator().manual_seed(_direction_seed(seed, layer))
    v = torch.randn(width, generator=g)
    return v / v.norm()


def control_chunks(chunks: Sequence[Chunk], width: int, seed: int) -> list[Chunk]:
    """Random stand-ins of the same size: a PA chunk's template values on a random subpopulation of the same
    size (shuffled onto it), a direction chunk's typical projection along a random direction of the same norm.
    One generator, seeded once, walks the chunks in order: the same chunks and seed give the same stand-ins."""
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for c in chunks:
        if c.kind == "pa":
            m = int(c.subpopulation.numel())
            if m > width:
                raise ChunkError(f"{c.id}: its subpopulation ({m}) is wider than the model ({width}).")
            neurons = torch.randperm(width, generator=g)[:m].sort().values
            template = c.template.float()[torch.randperm(m, generator=g)]
            out.append(dataclasses.replace(c, id=f"random:{c.id}", subpopulation=neurons, template=template))
        else:
            v = torch.randn(c.direction.numel(), generator=g)
            v = v / v.norm() * c.direction.float().norm()
            out.append(dataclasses.replace(c, id=f"random:{c.id}", direction=v))
    return out


def control_intervention(intervention: Intervention, kind: str, seed: int, width: int) -> Intervention:
    """The control arm's intervention: as large an edit as `intervention`, somewhere random (module docstring)."""
    if kind not in CONTROL_KINDS:
        raise ChunkError(f"Unknown control '{kind}': use {' or '.join(CONTROL_KINDS)}.")
    chunks = control_chunks(intervention.chunks, width, seed) if kind == "subpopulation" else intervention.chunks
    return dataclasses.replace(intervention, chunks=chunks, control=kind, control_seed=int(seed))


def describe_control(real: Intervention, control: Intervention) -> dict:
    """What the control arm edits, with how much of each random subpopulation overlaps the real one."""
    out = {"kind": control.control, "seed": control.control_seed}
    if control.control == "subpopulation":
        out["what"] = ("each PA chunk's template values shuffled onto a random subpopulation of the same size; "
                       "each direction chunk's typical projection along a random direction of the same norm")
        overlaps = []
        for r, c in zip(real.chunks, control.chunks):
            if r.kind == "pa":
                same = len(set(r.subpopulation.tolist()) & set(c.subpopulation.tolist()))
                overlaps.append(same / max(1, r.subpopulation.numel()))
        if overlaps:
            out["mean_overlap_with_real_subpopulation"] = sum(overlaps) / len(overlaps)
    else:
        out["what"] = ("at every edited position the real edit's norm, along a random unit direction "
                       "(one per layer)")
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

    def __init__(self, chunks: list[Chunk], mode: str, strength: float, mean: torch.Tensor | None, device, dtype,
                 redirect: torch.Tensor | None = None):
        self.device = torch.device(device)
        # the "direction" control: each position's edit keeps its norm and points along this unit vector
        self.redirect = redirect.to(device, torch.float32) if redirect is not None else None
        self.mode, self.strength = mode, float(strength)
        self.pa = [(c.subpopulation.long().to(device), c.template.to(device, torch.float32)) for c in chunks if c.kind == "pa"]
        self.dirs = [(c.direction.to(device, torch.float32) / c.direction.float().norm(), float(c.typical or 0.0))
                     for c in chunks if c.kind == "direction"]
        self.mean = mean.to(device, torch.float32) if mean is not None else None
        if mode == "mean-ablate" and (self.mean is None or not torch.isfinite(self.mean).all()):
            raise ChunkError("mean-ablate: the dictionary has no corpus mean for this layer; rebuild it with "
                             "hidden states collected at every layer it edits.")

    def apply(self, h: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
        """h: (B, T, d); where: (B, T) bool, or None for every position -> edited copy (float math, original dtype)."""
        out = h.float().clone()
        a = self.strength
        if where is None:  # every position: no selection to compute (the decode steps of an active edit)
            where = torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device) if self.redirect is not None else None
        sel = where[..., None] if where is not None else None
        for neurons, template in self.pa:
            sub = out[..., neurons]  # (B, T, m)
            if self.mode in ("graft", "amplify"):
                new = sub + a * (template - sub)
            elif self.mode in ("freeze", "suppress"):
                new = (1.0 - a) * sub
            else:  # mean-ablate
                new = sub + a * (self.mean[neurons] - sub)
            out[..., neurons] = torch.where(sel, new, sub) if sel is not None else new
        for u, typical in self.dirs:
            proj = (out * u).sum(-1, keepdim=True)  # (B, T, 1)
            if self.mode in ("graft", "amplify"):
                delta = a * (typical - proj) * u
            elif self.mode in ("freeze", "suppress"):
                delta = -a * proj * u
            else:
                delta = a * (((self.mean * u).sum()) - proj) * u
            out = torch.where(sel, out + delta, out) if sel is not None else out + delta
        if self.redirect is not None:
            base = h.float()
            size = (out - base).norm(dim=-1, keepdim=True)  # (B, T, 1): how far the real edit moved each state
            out = torch.where(sel, base + size * self.redirect, base)
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
        redirect = (random_direction(layout.hidden_size, intervention.control_seed, layer)
                    if intervention.control == "direction" else None)
        edits[layer] = make_hook(_LayerEdit(chunks, intervention.mode, intervention.strength, mean, device, loaded.dtype,
                                            redirect=redirect))
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
            cancel: threading.Event | None = None, progress=None, name: str = "arm") -> list[Continuation]:
    """Generate every (prompt, seed) row, batched and left-padded. Row seeds are the same in every arm.

    `progress(fraction, message)` (optional) hears of every batch as it starts, of every decoding step (same
    message, so a plain log can keep one line per message), and of every prompt whose rows are all done."""
    rows = [(i, p, sampling.seed + s) for i, p in enumerate(prompts) for s in range(seeds_per_prompt)]
    encoded = {p: encode_prompt(loaded, p, chat) for p in prompts}
    stops = eos_ids(loaded)
    out: list[Continuation] = []
    total, n_prompts = len(rows), len(prompts)
    for b in range(0, total, batch_size):
        batch = rows[b:b + batch_size]
        if cancel is not None and cancel.is_set():
            break
        message = (f"{name}: continuations {b + 1}-{b + len(batch)} of {total} "
                   f"(prompt{'s' if batch[0][0] != batch[-1][0] else ''} {batch[0][0] + 1}"
                   f"{'-' + str(batch[-1][0] + 1) if batch[0][0] != batch[-1][0] else ''} of {n_prompts})")
        if progress is not None:
            progress(b / total, message)
        ids = [encoded[p] for _, p, _ in batch]
        phase = PhaseFlag()
        generated: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        with intervene(loaded, intervention, phase, prompt_lengths=[len(i) for i in ids]):
            steps = decode(loaded, ids, sampling, seeds=[s for _, _, s in batch], cancel=cancel, phase=phase)
            for n_step, step in enumerate(steps, 1):
                for i, t in enumerate(step.tokens.tolist()):
                    if not done[i]:
                        generated[i].append(t)
                        done[i] = t in stops
                if progress is not None:
                    progress((b + len(batch) * min(1.0, n_step / max(1, sampling.max_new_tokens))) / total, message)
                if all(done):
                    break
            steps.close()
        for (_, p, s), g in zip(batch, generated):
            text = loaded.tokenizer.decode([t for t in g if t not in stops], skip_special_tokens=True)
            out.append(Continuation(prompt=p, seed=s, ids=g, text=text))
        if progress is not None:
            finished = [i for i in sorted({i for i, _, _ in batch})
                        if b + len(batch) >= total or rows[b + len(batch)][0] != i]
            for i in finished:
                progress(len(out) / total, f"{name}: prompt {i + 1}/{n_prompts} done ({len(out)}/{total} continuations)")
    return out


def _takes_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.no_grad()
def continuation_nll(loaded: LoadedModel, rows: Sequence[Continuation], chat: bool = True,
                     batch_size: int = 8) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, tokens) of each continuation's generated tokens (the stop token
    included) under the unperturbed model at temperature 1, its prompt as context: what fluency is measured by."""
    from chunktui.engine.streaming import left_pad

    pad = loaded.tokenizer.pad_token_id or 0
    encoded: dict[str, list[int]] = {}
    out: list[tuple[float, int]] = []
    for b in range(0, len(rows), batch_size):
        batch = rows[b:b + batch_size]
        seqs = []
        for r in batch:
            if r.prompt not in encoded:
                encoded[r.prompt] = encode_prompt(loaded, r.prompt, chat)
            seqs.append(encoded[r.prompt] + list(r.ids))
        ids, mask = left_pad(seqs, pad)
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        longest = max(len(r.ids) for r in batch)
        if longest == 0:
            out.extend((0.0, 0) for _ in batch)
            continue
        # left padding lines every row's answer up at the end: the last longest + 1 positions predict them all
        keep = {"logits_to_keep": longest + 1} if _takes_logits_to_keep(loaded.model) else {}
        logits = loaded.model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=False,
                              **keep).logits
        width, kept = ids.shape[1], logits.shape[1]
        for i, r in enumerate(batch):
            g = len(r.ids)
            if g == 0:
                out.append((0.0, 0))
                continue
            logp = logits[i, kept - g - 1:kept - 1].float().log_softmax(-1)
            target = ids[i, width - g:].to(logp.device)
            out.append((float(-logp.gather(-1, target[:, None]).sum()), g))
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
    concepts: dict  # label -> rates, hits and intervals per arm, first-token log-probabilities (see `compare`)
    pairs: list[dict]
    fluency: dict = field(default_factory=dict)  # arm -> perplexity, tokens, degenerate count / share / interval
    control_intervention: dict | None = None  # what the random control arm edited (None: no control arm)
    sweep: list[dict] | None = None  # one entry per strength, when a sweep was asked for
    protocol: dict | None = None  # the resolved protocol settings (Engine.compare), printed in full

    def to_json(self) -> dict:
        out = {"settings": self.settings, "intervention": self.intervention, "concepts": self.concepts,
               "pairs": self.pairs, "fluency": self.fluency, "control_intervention": self.control_intervention}
        if self.sweep is not None:
            out["sweep"] = self.sweep
        if self.protocol is not None:
            out["protocol"] = self.protocol
        return out


FLUENCY_MEASURE = ("perplexity: exp of the mean negative log-likelihood per generated token (stop token included) "
                   "under the unperturbed model at temperature 1, the prompt as context; degenerate: "
                   + stats.DEGENERATE_RULE)


def _ppl(nll: float, tokens: int) -> float | None:
    return math.exp(nll / tokens) if tokens else None


def fluency_summary(rows: Sequence[Continuation], nll: Sequence[tuple[float, int]]) -> dict:
    """An arm's fluency: pooled perplexity under the unperturbed model, and its degenerate answers."""
    tokens = sum(n for _, n in nll)
    reasons = [stats.degenerate_reason(r.text) for r in rows]
    k = sum(r is not None for r in reasons)
    lo, hi = stats.wilson(k, len(rows))
    per_row = sorted(p for p in (_ppl(s, n) for s, n in nll) if p is not None)
    return {"perplexity": _ppl(sum(s for s, _ in nll), tokens), "median_row_perplexity":
            per_row[len(per_row) // 2] if per_row else None, "tokens": tokens, "rows": len(rows), "degenerate": k,
            "degenerate_share": k / len(rows) if rows else 0.0, "degenerate_ci": [lo, hi],
            "degenerate_reasons": {r: reasons.count(r) for r in sorted({r for r in reasons if r})}}


def concept_stats(label: str, first_ids: list[int], arms: dict[str, list[Continuation]],
                  logprobs: dict[str, torch.Tensor], score_prompt: bool = False) -> dict:
    """Occurrence of `label` in each arm (hits, rate, Wilson interval), changes against the control with
    Newcombe intervals, and the first-token log-probability per arm. The keys of a run without a control
    intervention are those earlier versions wrote, plus hits and intervals."""
    n = len(arms["control"])
    hits = {name: sum(occurs(label, scored_text(r, score_prompt)) for r in rows) for name, rows in arms.items()}
    lp = {name: t[:, first_ids].logsumexp(-1) for name, t in logprobs.items()}  # any first-token form
    out = {"rows": n, "first_tokens": None}
    for name in arms:
        out[f"{name}_hits"] = hits[name]
        out[f"{name}_rate"] = hits[name] / n if n else 0.0
        out[f"{name}_ci"] = list(stats.wilson(hits[name], n))
        out[f"logprob_{name}"] = float(lp[name].mean())
    out["delta_rate"] = out["perturbed_rate"] - out["control_rate"]
    out["delta_ci"] = list(stats.newcombe_difference(hits["control"], n, hits["perturbed"], n))
    out["delta_logprob"] = float((lp["perturbed"] - lp["control"]).mean())
    if "random" in arms:
        out["random_delta_rate"] = out["random_rate"] - out["control_rate"]
        out["random_delta_ci"] = list(stats.newcombe_difference(hits["control"], n, hits["random"], n))
        out["random_delta_logprob"] = float((lp["random"] - lp["control"]).mean())
    return out


def _row_fluency(text: str, nll: tuple[float, int]) -> dict:
    return {"perplexity": _ppl(*nll), "degenerate": stats.degenerate_reason(text)}


def compare(loaded: LoadedModel, intervention: Intervention, prompts: list[str], samples: int = DEFAULT_SAMPLES,
            sampling: Sampling | None = None, chat: bool = True, batch_size: int = 16,
            control: list[Continuation] | None = None, cancel: threading.Event | None = None,
            progress: ProgressFn | None = None, *, control_kind: str | None = None, control_seed: int = 0,
            strengths: Sequence[float] | None = None, control_sampling: Sampling | None = None,
            score_prompt: bool = False, match_dictionary: ChunkDictionary | None = None) -> ComparisonReport:
    """Same prompts, sampling settings and seeds with and without the intervention.

    control: the unperturbed arm when already generated (reused across concepts by benchmarks).
    control_kind: "subpopulation" or "direction" adds a random control arm (`control_intervention`, seeded by
    control_seed) at every strength. strengths: a sweep; the report's top level is then the first strength and
    `sweep` holds every strength (the first included). progress(stage, fraction, message): optional, hears of
    every batch, decoding step and finished prompt of every arm.
    `control_sampling` (the paper code's confound: top-p 0.5 in the control arm) and `score_prompt` (the word is
    also looked for in the prompt, as the code's batch_decode of prompt + continuation does) exist to measure
    those deviations; both are recorded in the settings. `match_dictionary` adds each pair's layer-by-layer
    match diff (`layer_match_diff`) at the first strength."""
    if not prompts:
        raise ChunkError("No prompts to compare on.")
    if control_kind is not None and control_kind not in CONTROL_KINDS:
        raise ChunkError(f"Unknown control '{control_kind}': use {' or '.join(CONTROL_KINDS)}.")
    sampling = sampling or Sampling(max_new_tokens=48, temperature=0.8, top_p=0.9)
    swept = bool(strengths)
    strengths = [float(x) for x in strengths] if swept else [intervention.strength]
    cancelled = lambda: cancel is not None and cancel.is_set()  # noqa: E731

    control_sampling = control_sampling or sampling

    def arm(name: str, iv: Intervention | None, arm_sampling: Sampling = sampling) -> list[Continuation]:
        hear = (lambda frac, message: progress(name, frac, message)) if progress else None
        return run_arm(loaded, prompts, samples, arm_sampling, iv, chat, batch_size, cancel, progress=hear,
                       name=name)

    def scored(name: str, rows: list[Continuation]) -> list[tuple[float, int]]:
        if progress:
            progress("fluency", None, f"fluency: scoring the {name} arm under the unperturbed model")
        return continuation_nll(loaded, rows, chat)

    if control is None:
        control = arm("control", None, control_sampling)
    control_nll = scored("control", control)
    lp_control = next_token_logprobs(loaded, prompts, None, chat, batch_size)
    labels = sorted({c.label for c in intervention.chunks})
    first_ids = {label: first_token_ids(loaded, label) for label in labels}
    first_text = {label: [loaded.tokenizer.decode([i]) for i in first_ids[label]] for label in labels}
    entries, described_control = [], None
    for strength in strengths:
        if cancelled():
            break
        iv = dataclasses.replace(intervention, strength=strength)
        tag = f" x{strength:g}" if swept else ""
        arms = {"control": control, "perturbed": arm(f"perturbed{tag}", iv)}
        lps = {"control": lp_control, "perturbed": next_token_logprobs(loaded, prompts, iv, chat, batch_size)}
        nlls = {"control": control_nll, "perturbed": scored(f"perturbed{tag}", arms["perturbed"])}
        if control_kind is not None and not cancelled():
            random_iv = control_intervention(iv, control_kind, control_seed, loaded.hidden_size)
            described_control = describe_control(iv, random_iv)
            arms["random"] = arm(f"random{tag}", random_iv)
            lps["random"] = next_token_logprobs(loaded, prompts, random_iv, chat, batch_size)
            nlls["random"] = scored(f"random{tag}", arms["random"])
        if cancelled():
            break
        concepts = {}
        for label in labels:
            concepts[label] = concept_stats(label, first_ids[label], arms, lps, score_prompt)
            concepts[label]["first_tokens"] = first_text[label]
        fluency = {name: fluency_summary(rows, nlls[name]) for name, rows in arms.items()}
        pairs = []
        for i, (c, pert) in enumerate(zip(arms["control"], arms["perturbed"])):
            pair = {"prompt": c.prompt, "seed": c.seed, "control": c.text, "perturbed": pert.text}
            if not entries:  # the token diff and the layer diff, for the top-level strength's pairs
                pair["diff"] = token_diff(loaded.tokenizer, c.ids, pert.ids)
                if match_dictionary is not None:  # what changed, layer by layer (`layer_match_diff`)
                    pair["layer_diff"] = layer_match_diff(loaded, match_dictionary, iv,
                                                          encode_prompt(loaded, c.prompt, chat), c, pert)
            pair["fluency"] = {name: _row_fluency(rows[i].text, nlls[name][i]) for name, rows in arms.items()}
            if "random" in arms:
                pair["random"] = arms["random"][i].text
            pairs.append(pair)
        entries.append({"strength": strength, "intervention": iv.describe(), "concepts": concepts,
                        "fluency": fluency, "pairs": pairs})
    settings = dict(sampling.describe(), chat=chat, samples=samples, prompts=len(prompts),
                    identical_sampling_both_arms=control_sampling == sampling,
                    identical_sampling_all_arms=control_sampling == sampling, scoring_includes_prompt=score_prompt,
                    interval=stats.INTERVAL, fluency_measure=FLUENCY_MEASURE,
                    cancelled=cancelled())
    if control_sampling != sampling:
        settings["control_sampling"] = control_sampling.describe()
    if not entries:  # cancelled before any perturbed arm finished
        return ComparisonReport(settings=settings, intervention=intervention.describe(), concepts={}, pairs=[])
    top = entries[0]
    sweep = None
    if swept:
        sweep = [{k: v for k, v in e.items() if k != "pairs"} | {"pairs": [
            {k: v for k, v in pair.items() if k != "diff"} for pair in e["pairs"]]} for e in entries]
    return ComparisonReport(settings=settings, intervention=top["intervention"], concepts=top["concepts"],
                            pairs=top["pairs"], fluency=top["fluency"], control_intervention=described_control,
                            sweep=sweep)


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
