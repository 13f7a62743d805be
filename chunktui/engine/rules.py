"""Rules in the decode loop: conditions compiled to tensor operations over a token's (layers x chunks) hits.

`RuleProgram` turns parsed rules (`chunktui.shared.rules`) into

- one (K*S, C) 0/1 matrix: term k's chunk columns, placed at their layer axis position s. A token's hits
  (C,) times its transpose give, for every term at once, which layers have a hitting chunk of the label;
  summed over layers and compared with `>=K`, every term is decided by one matmul;
- elementwise `and` / `or` / `not` over those booleans, and run lengths (`for N`) kept as counters on
  the device (vectorised over time with a cumulative maximum, so a teacher-forced text is one pass);
- the rules' firings and matched layers for the token, copied to the host in ONE transfer per token,
  however many rules there are (the decode loop already synchronises once per token for the token id).

Interventions are edit pre-hooks on the blocks they edit (`hooks.block_hooks`, edits before records).
Whether a rule's intervention is on is decided on the host from the fired flags already copied, so an
idle intervention costs nothing on the device (a `now` rule, below, decides on every token). A rule that fires at token t edits the states from token
t+1 on: token t's states were computed in the forward pass that produced the match.

A `now` rule (`-> suppress cheese@20-29 now`) also edits token t within that pass: record hooks keep the
states its condition reads (all below its first edited layer, checked when it is compiled); at its first
edited layer the condition is decided on the device from them (its own small exact pack, no host copy) and
the edit applies where it holds, so the token sampled next comes from the edited states. It acts on
generated tokens, and on the prompt's tokens in the same pass when `on_prompt` is `act`.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from chunktui.engine.hooks import block_hooks
from chunktui.engine.models import module_device
from chunktui.shared.errors import ChunkError, CorpusError
from chunktui.shared.rules import (And, Firing, Not, Or, Rule, Run, Term, Vocabulary, action_layers,
                                   check_rules, condition_layers, parse_rule)
from chunktui.shared.settings import RULES_ON_PROMPT

_NEG = -(1 << 40)


def _contains(node, target) -> bool:
    if node is target:
        return True
    if isinstance(node, (Not, Run)):
        return _contains(node.node, target)
    if isinstance(node, (And, Or)):
        return any(_contains(n, target) for n in node.nodes)
    return False


def vocabulary(packed, n_states: int, name: str = "the dictionary") -> Vocabulary:
    chunks = packed.chunks if packed is not None else []
    return Vocabulary.from_columns([c.label for c in chunks], [int(c.layer) for c in chunks], n_states, name)


@dataclass
class Evaluation:
    """Host-side result for a batch of rows over T tokens: fired (B, T, R) and layers (B, T, R, S), as lists."""

    fired: list  # [b][t][r] bool
    layers: list  # [b][t][r] -> list of layer numbers (the model's layer indices)


class _Phase:
    """Whether the model is reading the prompt or generating (`streaming.decode` sets it, as a PhaseFlag)."""

    def __init__(self) -> None:
        self.phase = "prefill"


@dataclass
class _NowRule:
    """A `now` rule's condition, decided inside the forward pass from the states below its first edit."""

    layers: list[int]  # the model layers the condition reads, ascending
    pack: object  # a PackedDictionary of the condition's chunks at those layers (exact: no host copy)
    M: torch.Tensor  # (C_r, K_r * S_r) term columns, as RuleProgram.M
    at_least: torch.Tensor  # (K_r,)
    terms: list[Term]
    index: dict  # term -> its column in `at_least` / the term axis


class RuleProgram:
    """Parsed rules compiled against a packed dictionary; evaluates batches of rows token by token."""

    def __init__(self, rules: Sequence[Rule | str], packed, n_states: int, dictionary=None, loaded=None,
                 name: str = "the dictionary", on_prompt: str | None = None, site: str | None = None) -> None:
        from chunktui.shared.settings import check_on_prompt, check_site

        rules = [parse_rule(r) if isinstance(r, str) else r for r in rules]
        self.on_prompt = check_on_prompt(on_prompt if on_prompt is not None else RULES_ON_PROMPT)
        self.site = check_site(site if site is not None else "residual")
        if packed is None:
            raise ChunkError("Rules need a dictionary: load one first.")
        self.rules = check_rules(rules, vocabulary(packed, n_states, name))
        self.packed = packed
        self.device = packed.device
        self.layer_axis = list(packed.layers)  # axis position s -> model layer
        S, C = len(self.layer_axis), len(packed.chunks)
        self.S = S
        terms: list[Term] = []
        for rule in self.rules:
            for term in rule.terms():
                if term not in terms:
                    terms.append(term)
        self.terms = terms
        M = torch.zeros(len(terms) * S, max(C, 1))
        axis = {layer: s for s, layer in enumerate(self.layer_axis)}
        for k, term in enumerate(terms):
            for c, chunk in enumerate(packed.chunks):
                if chunk.label == term.label and (term.layers is None or chunk.layer in term.layers):
                    M[k * S + axis[int(chunk.layer)], c] = 1.0
        self.M = M[:, :C].T.contiguous().to(self.device)  # (C, K*S)
        self.at_least = torch.tensor([t.at_least for t in terms], dtype=torch.long, device=self.device)
        self.runs: list[Run] = []
        for rule in self.rules:
            self._collect_runs(rule.condition)
        self._term_index = {term: k for k, term in enumerate(terms)}
        self._run_index = {id(run): j for j, run in enumerate(self.runs)}
        self.counts: torch.Tensor | None = None  # (B, n_runs) run lengths so far
        # interventions: rule index -> Intervention; host-side state per row
        self.interventions: dict[int, object] = {}
        if any(r.action.kind == "intervene" for r in self.rules):
            if dictionary is None or loaded is None:
                raise ChunkError("Rules with interventions need the model and its dictionary.")
            self._build_interventions(dictionary, loaded, n_states)
        self.loaded = loaded
        self.phase = _Phase()  # given to `streaming.decode`, which says when the prompt has been read
        self.now: dict[int, _NowRule] = {r: self._compile_now(rule, packed, n_states, name)
                                         for r, rule in enumerate(self.rules)
                                         if rule.action.kind == "intervene" and rule.action.now}
        self._captured: dict[int, torch.Tensor] = {}  # layer -> this pass's states, for the `now` conditions
        self._fire: dict[int, torch.Tensor] = {}  # rule -> (B, T) where its condition holds in this pass
        self.remaining: list[dict[int, int]] = []  # per row: rule index -> tokens left (-1: while)
        self.active_rows: dict[int, torch.Tensor] = {}  # rule index -> (B,) bool on the device, when any row is on
        self._row_masks: dict[tuple, torch.Tensor] = {}
        self.stopped: list[bool] = []
        # on_prompt == "act": rule index -> (B, T) bool, the prompt columns the re-read of the prompt edits
        self.prompt_edits: dict[int, torch.Tensor] | None = None
        self._every_row: set[int] = set()  # interventions on in every row (no per-row selection needed)
        # runs that only intervention rules use: the prompt's run lengths carry over into the answer for them
        self._intervention_runs = [j for j, run in enumerate(self.runs)
                                   if all(not _contains(r.condition, run) for r in self.rules
                                          if r.action.kind != "intervene")]

    # ------------------------------------------------------------------ compiling

    def _collect_runs(self, node) -> None:
        if isinstance(node, Run):
            self._collect_runs(node.node)
            if all(node is not r for r in self.runs):
                self.runs.append(node)
        elif isinstance(node, Not):
            self._collect_runs(node.node)
        elif isinstance(node, (And, Or)):
            for n in node.nodes:
                self._collect_runs(n)

    def _build_interventions(self, dictionary, loaded, n_states: int) -> None:
        from chunktui.engine.perturb import Intervention, _LayerEdit, select_chunks
        from chunktui.shared.settings import Positions

        layout = loaded.layout
        self.edits: dict[int, list[tuple[int, _LayerEdit]]] = {}
        for r, rule in enumerate(self.rules):
            action = rule.action
            if action.kind != "intervene":
                continue
            layers = action_layers(action, n_states)
            chunks = select_chunks(dictionary, list(action.labels), layers)
            iv = Intervention(chunks=chunks, mode=action.mode, strength=action.strength,
                              positions=Positions("generated"), layer_means=dictionary.layer_means)
            self.interventions[r] = iv
            for layer in iv.layers:
                mean = iv.layer_means[layer] if iv.layer_means is not None else None
                device = module_device(layout.blocks[layer], loaded.device)
                edit = _LayerEdit([c for c in iv.chunks if c.layer == layer], iv.mode, iv.strength, mean, device,
                                  loaded.dtype)
                self.edits.setdefault(layer, []).append((r, edit))

    def _compile_now(self, rule: Rule, packed, n_states: int, name: str) -> _NowRule:
        from chunktui.engine.matching import PackedDictionary

        reads = condition_layers(rule, vocabulary(packed, n_states, name))
        layers = sorted({x for ls in reads.values() for x in ls})
        terms = list(dict.fromkeys(rule.terms()))
        chunks = [c for c in packed.chunks if int(c.layer) in layers and any(
            c.label == t.label and int(c.layer) in reads[t] for t in terms)]
        sub = PackedDictionary(chunks, packed.width, layers, device=packed.device, precision="float64")
        axis = {layer: s for s, layer in enumerate(layers)}
        S = len(layers)
        M = torch.zeros(max(len(sub.chunks), 1), len(terms) * S)
        for k, term in enumerate(terms):
            for c, chunk in enumerate(sub.chunks):
                if chunk.label == term.label and int(chunk.layer) in reads[term]:
                    M[c, k * S + axis[int(chunk.layer)]] = 1.0
        return _NowRule(layers=layers, pack=sub, M=M[:len(sub.chunks)].to(self.device),
                        at_least=torch.tensor([t.at_least for t in terms], dtype=torch.long, device=self.device),
                        terms=terms, index={term: k for k, term in enumerate(terms)})

    # ------------------------------------------------------------------ state

    def reset(self, batch: int = 1) -> None:
        """Fresh state for `batch` rows (a new generation, or new texts)."""
        self.phase.phase = "prefill"
        self._captured, self._fire = {}, {}
        self.counts = torch.zeros(batch, len(self.runs), dtype=torch.long, device=self.device)
        self.remaining = [dict() for _ in range(batch)]
        self.active_rows = {}
        self.stopped = [False] * batch
        self.prompt_edits = None
        self._every_row = set()

    @property
    def has_interventions(self) -> bool:
        return bool(self.interventions)

    @property
    def watches_prompt(self) -> bool:
        """Whether the prompt's states are evaluated (only interventions act on them)."""
        return self.on_prompt != "off" and bool(self.interventions)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The interventions' edit hooks on their blocks for the duration (no-op without interventions)."""
        if not self.interventions:
            yield
            return
        edits = {layer: self._hook(pairs) for layer, pairs in self.edits.items()}
        watched = sorted({x for now in self.now.values() for x in now.layers})
        records = {layer: self._capture(layer, first=layer == watched[0]) for layer in watched}
        with block_hooks(self.loaded.layout, edits=edits, records=records, site=self.site):
            yield

    def _capture(self, layer: int, first: bool):
        def hook(module, args, kwargs):
            if first:  # the lowest layer a `now` condition reads: a new forward pass begins
                self._fire = {}
            self._captured[layer] = args[0] if args else kwargs["hidden_states"]
        return hook

    def _now_acts(self) -> bool:
        return self.phase.phase != "prefill" or self.on_prompt == "act"

    def _now_fire(self, r: int) -> torch.Tensor:
        """(B, T) bool on the device: where rule r's condition holds in this forward pass (no host copy)."""
        fire = self._fire.get(r)
        if fire is not None:
            return fire
        now = self.now[r]
        device = now.pack.device
        H = torch.stack([self._captured[x].to(device) for x in now.layers], dim=2)  # (B, T, S_r, d)
        B, T, S = H.shape[:3]
        hit = now.pack.match(H.reshape(B * T, S, H.shape[-1])).hit.view(B, T, -1)
        K = len(now.terms)
        layer_hits = (hit.to(now.M.dtype) @ now.M).view(B, T, K, S) > 0 if now.M.numel() else \
            torch.zeros(B, T, K, S, dtype=torch.bool, device=device)
        term_true = layer_hits.sum(-1) >= now.at_least  # (B, T, K)
        index = now.index

        def ev(node) -> torch.Tensor:
            if isinstance(node, Term):
                return term_true[..., index[node]]
            if isinstance(node, Not):
                return ~ev(node.node)
            parts = [ev(n) for n in node.nodes]
            out = parts[0]
            for p in parts[1:]:
                out = (out & p) if isinstance(node, And) else (out | p)
            return out

        fire = ev(self.rules[r].condition)
        self._fire[r] = fire
        return fire

    def _hook(self, pairs):
        def hook(module, args, kwargs):
            on = self.prompt_edits if self.prompt_edits is not None else self.active_rows
            now_on = bool(self.now) and self._now_acts()
            live = [(r, edit) for r, edit in pairs if r in on or (now_on and r in self.now)]
            if not live:
                return None
            key = None if args else next(k for k in ("hidden_states", "input", "x") if k in kwargs)
            h = args[0] if args else kwargs[key]
            for r, edit in live:
                if h.device != edit.device:
                    h = h.to(edit.device)
                if self.prompt_edits is not None:  # re-reading the prompt: (B, T) columns (a `now` rule's are
                    if r not in on:  # where it fired on the first reading, the one its records come from)
                        continue
                    where = on[r].to(h.device)
                elif r not in on:  # a `now` rule not on from earlier tokens: where its condition holds in this pass
                    where = self._now_fire(r).to(h.device)
                elif r in self._every_row:  # every row is on (known on the host): nothing to select
                    where = None
                else:
                    where = on[r].to(h.device)[:, None].expand(h.shape[0], h.shape[1])
                    if now_on and r in self.now:  # and where the condition holds in this very pass
                        where = where | self._now_fire(r).to(h.device)
                h = edit.apply(h, where)
            if args:
                return (h,) + tuple(args[1:]), kwargs
            return args, dict(kwargs, **{key: h})
        return hook

    # ------------------------------------------------------------------ evaluating

    def evaluate(self, hit: torch.Tensor, starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """hit (B, T, C) bool -> fired (B, T, R) bool, layers (B, T, R, S) bool, on the device; no host sync.

        Run lengths continue from the previous call (per row) unless `starts` (B, T) marks where a new text
        begins. Call `reset(B)` first."""
        B, T, C = hit.shape
        if self.counts is None or self.counts.shape[0] != B:
            self.reset(B)
        K, S = len(self.terms), self.S
        if C:
            layer_hits = (hit.to(self.M.dtype) @ self.M).view(B, T, K, S) > 0  # (B, T, K, S)
        else:
            layer_hits = torch.zeros(B, T, K, S, dtype=torch.bool, device=hit.device)
        term_true = layer_hits.sum(-1) >= self.at_least  # (B, T, K)
        self._idx = torch.arange(T, device=hit.device) if (T > 1 or starts is not None) else None
        self._starts = starts
        new_counts = self.counts.clone() if self.runs else self.counts
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def ev(node):
            key = id(node)
            if key in cache:
                return cache[key]
            if isinstance(node, Term):
                k = self._term_index[node]
                out = (term_true[..., k], layer_hits[..., k, :] & term_true[..., k, None])
            elif isinstance(node, Not):
                value, _ = ev(node.node)
                out = (~value, torch.zeros(B, T, S, dtype=torch.bool, device=hit.device))
            elif isinstance(node, And):
                parts = [ev(n) for n in node.nodes]
                value = parts[0][0]
                layers = parts[0][1]
                for v, lay in parts[1:]:
                    value = value & v
                    layers = layers | lay
                out = (value, layers & value[..., None])
            elif isinstance(node, Or):
                parts = [ev(n) for n in node.nodes]
                value = parts[0][0]
                layers = parts[0][1] & parts[0][0][..., None]
                for v, lay in parts[1:]:
                    value = value | v
                    layers = layers | (lay & v[..., None])
                out = (value, layers)
            else:  # Run
                value, layers = ev(node.node)
                j = self._run_index[id(node)]
                run = self._run_length(value, self.counts[:, j])
                new_counts[:, j] = run[:, -1].clamp(max=node.n)
                held = run >= node.n
                out = (held, layers & held[..., None])
            cache[key] = out
            return out

        results = [ev(rule.condition) for rule in self.rules]
        self.counts = new_counts
        fired = torch.stack([v for v, _ in results], dim=-1)  # (B, T, R)
        layers = torch.stack([lay for _, lay in results], dim=2)  # (B, T, R, S)
        return fired, layers

    def _run_length(self, value: torch.Tensor, carry: torch.Tensor) -> torch.Tensor:
        """(B, T) bool -> (B, T) consecutive-true count ending at each token, continuing `carry` (B,)."""
        if self._idx is None:  # one token, no text start (a decode step): the count goes on or restarts
            return torch.where(value[:, 0], carry + 1, 0)[:, None]
        idx = self._idx[None, :].expand_as(value)
        neg = torch.full_like(idx, _NEG)
        brk = torch.where(~value, idx, neg)
        if self._starts is not None:
            brk = torch.maximum(brk, torch.where(self._starts, idx - 1, neg))
        last = torch.cummax(brk, dim=1).values
        return torch.where(last > _NEG, idx - last, idx + 1 + carry[:, None])

    def observe(self, hit: torch.Tensor, positions: Sequence[Sequence[int]], texts=None,
                starts: torch.Tensor | None = None) -> list[list[Firing]]:
        """Evaluate (B, T, C) hits, copy the result to the host once, update interventions and stops.

        `positions[b][t]` is the token's index in its sequence (for the records); `texts[b][t]` its text.
        Returns the firings per row, in token order."""
        fired, layers = self.evaluate(hit, starts)
        packed = torch.cat([fired[..., None], layers], dim=-1).cpu()  # the one transfer: (B, T, R, S + 1)
        B, T = packed.shape[:2]
        out: list[list[Firing]] = [[] for _ in range(B)]
        any_fired = packed[..., 0]
        for b, t, r in any_fired.nonzero().tolist():
            rule = self.rules[r]
            mask = packed[b, t, r, 1:].tolist()
            out[b].append(Firing(rule=rule.name, token=int(positions[b][t]),
                                 layers=[self.layer_axis[s] for s, m in enumerate(mask) if m],
                                 action=str(rule.action), text=texts[b][t] if texts is not None else ""))
        if self.interventions or any(r.action.kind == "stop" for r in self.rules):
            self._update(any_fired[:, -1].tolist() if T else [[False] * len(self.rules)] * B)
        return out

    def observe_prompt(self, hit: torch.Tensor, lengths: Sequence[int], texts=None) -> tuple[list[list[Firing]], bool]:
        """The prompt's (B, T, C) hits (left-padded: row b's prompt is its last `lengths[b]` columns), read before
        the first answer token is sampled. Only intervention rules act on the prompt (`on_prompt`):

        - `watch`: a guard whose condition holds on the prompt is on from the first generated token's states
          (its `for N` counts from the prompt token where it fired; `while` needs the last prompt token);
        - `act`: as `watch`, and the prompt is to be read again with the rules' edits on the prompt itself
          (each prompt token where a rule fired, and the ones its duration covers after it: `while` the next one,
          `for N` the next N), so the first answer token is sampled from guarded states and the prompt's keys and
          values carry the edit. Returns (firings per row, whether to re-read the prompt).

        Alerts and stops keep watching generated tokens only (their run lengths start at the answer); the
        intervention rules' firings on the prompt are returned as records. One host copy for the whole prompt."""
        B, T, _ = hit.shape
        self.reset(B)
        if not self.watches_prompt or T == 0:
            return [[] for _ in range(B)], False
        cols = torch.arange(T, device=hit.device)
        first = torch.tensor([T - int(n) for n in lengths], device=hit.device)
        starts = cols[None, :] == first[:, None]
        fired, layers = self.evaluate(hit, starts)
        real = cols[None, :] >= first[:, None]
        fired = fired & real[..., None]
        keep = torch.zeros_like(self.counts)
        if self._intervention_runs:
            j = torch.tensor(self._intervention_runs, device=self.counts.device)
            keep[:, j] = self.counts[:, j]
        self.counts = keep
        packed = torch.cat([fired[..., None], layers], dim=-1).cpu()  # the one transfer: (B, T, R, S + 1)
        out: list[list[Firing]] = [[] for _ in range(B)]
        edit_cols: dict[int, list[list[int]]] = {}
        now_cols: dict[int, list[list[int]]] = {}
        for b, t, r in packed[..., 0].nonzero().tolist():
            rule = self.rules[r]
            if rule.action.kind != "intervene":
                continue
            n = int(lengths[b])
            mask = packed[b, t, r, 1:].tolist()
            out[b].append(Firing(rule=rule.name, token=t - (T - n), layers=[self.layer_axis[s] for s, m in
                                                                          enumerate(mask) if m],
                                 action=str(rule.action), text=texts[b][t - (T - n)] if texts is not None else "",
                                 extra={"on_prompt": True}))
            span = rule.action.duration if rule.action.duration is not None else (0 if rule.action.now else 1)
            if rule.action.now:  # edited in the first reading already; a re-read (for other rules) repeats just that
                now_cols.setdefault(r, [[] for _ in range(B)])[b].append(t)
            else:
                # re-reading, the prompt token that matched can be edited itself, and the ones its duration covers
                edit_cols.setdefault(r, [[] for _ in range(B)])[b].extend(range(t, min(t + span, T - 1) + 1))
            left = span - (T - 1 - t)  # tokens after the prompt still edited (t+1 .. t+span)
            if left > 0:
                self.remaining[b][r] = max(self.remaining[b].get(r, 0), left)
        self._set_active(B)
        reread = self.on_prompt == "act" and any(any(c) for c in edit_cols.values())
        if reread:
            edits = {}
            for r, per_row in list(edit_cols.items()) + list(now_cols.items()):
                m = torch.zeros(B, T, dtype=torch.bool)
                for b, c in enumerate(per_row):
                    if c:
                        m[b, sorted(set(c))] = True
                if m.any():
                    edits[r] = m.to(self.device)
            self.prompt_edits = edits
        return out, reread

    def end_prompt(self) -> None:
        """The prompt has been re-read with its edits: from now on the per-row switches apply."""
        self.prompt_edits = None

    def _set_active(self, batch: int) -> None:
        active = {}
        self._every_row = set()
        for r in self.interventions:
            rows = tuple(r in self.remaining[b] for b in range(batch))
            if all(rows):
                self._every_row.add(r)
            if any(rows):
                if rows not in self._row_masks:  # made once per pattern: no host-to-device copy per switch
                    self._row_masks[rows] = torch.tensor(rows, dtype=torch.bool, device=self.device)
                active[r] = self._row_masks[rows]
        self.active_rows = active

    def _update(self, last: list[list[bool]]) -> None:
        """After the last token of the call: stops, and which rows each intervention edits next."""
        changed = False
        for b, flags in enumerate(last):
            for r, rule in enumerate(self.rules):
                kind = rule.action.kind
                if kind == "stop" and flags[r]:
                    self.stopped[b] = True
                if kind != "intervene":
                    continue
                before = self.remaining[b].get(r, 0)
                if flags[r]:
                    now = rule.action.duration if rule.action.duration is not None else (0 if rule.action.now else 1)
                else:
                    now = max(before - 1, 0)
                if now:
                    self.remaining[b][r] = now
                else:
                    self.remaining[b].pop(r, None)
                changed |= bool(before) != bool(now)
        if changed:
            self._set_active(len(last))

    def describe(self) -> list[dict]:
        return [rule.to_json() for rule in self.rules]


def compile_rules(rules, packed, loaded, dictionary=None, name: str = "the dictionary", on_prompt: str | None = None,
                  site: str | None = None) -> RuleProgram | None:
    """A RuleProgram from rules (parsed or text), or None when there are none (or it is one already)."""
    if rules is None or isinstance(rules, RuleProgram):
        return rules
    rules = list(rules)
    if not rules:
        return None
    return RuleProgram(rules, packed, loaded.layout.n_states, dictionary=dictionary, loaded=loaded, name=name,
                       on_prompt=on_prompt, site=site)


# --------------------------------------------------------------------------- checkpoints (monitor --resume)


def _pack_json(obj) -> torch.Tensor:
    """JSON in a uint8 tensor: how firings travel in the build's checkpoint files (safetensors + JSON)."""
    data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def _unpack_json(tensor: torch.Tensor):
    return json.loads(bytes(tensor.tolist()).decode("utf-8"))


def bind_checkpoint(checkpoint, config: dict, group=None, batches: int | None = None):
    """A build `Checkpoint` (engine.build) bound to this monitor's settings and process group (one file pair per
    rank); (batches this rank has done, its saved JSON) or (0, None). `batches`: this rank's batch count.
    Sets `checkpoint.resumed` to the batches restored."""
    from chunktui.engine.distributed import SingleProcess

    checkpoint.bind(group or SingleProcess(), config)
    restored = checkpoint.restore(batches=batches)
    checkpoint.resumed = 0 if restored is None else restored[0]
    if restored is None:
        return 0, None
    done, tensors = restored
    return done, _unpack_json(tensors["state"])


def save_checkpoint(checkpoint, done: int, state) -> None:
    checkpoint.save(done, {"state": _pack_json(state)})



# --------------------------------------------------------------------------- batched generation with rules


@dataclass
class RuleRun:
    """One (prompt, seed) row generated under rules: its answer, the rules' firings and why it ended."""

    prompt: str
    seed: int
    ids: list[int]
    text: str
    firings: list[Firing]
    finished: str  # "eos", "length" or "rule"

    def to_json(self) -> dict:
        return dict(prompt=self.prompt, seed=self.seed, ids=self.ids, text=self.text,
                    firings=[f.to_json() for f in self.firings], finished=self.finished)

    @staticmethod
    def from_json(r: dict) -> "RuleRun":
        return RuleRun(prompt=r["prompt"], seed=r["seed"], ids=r["ids"], text=r["text"],
                       firings=[Firing.from_json(f) for f in r["firings"]], finished=r["finished"])


def too_many_processes(world: int, batches: int, batch_size: int) -> str:
    return (f"--procs {world} is more processes than there are batches of work: {batches} batch"
            f"{'es' if batches != 1 else ''} of up to {batch_size} (--batch-size); use --procs {batches} or fewer, "
            "or a smaller --batch-size.")


@torch.no_grad()
def generate_rows(loaded, prompts: Sequence[str], seeds_per_prompt: int, sampling, program: RuleProgram | None,
                  chat: bool = True, batch_size: int = 16, act: bool = True, cancel=None, progress=None,
                  prompt_index: Sequence[int] | None = None, checkpoint=None, group=None) -> list[RuleRun]:
    """Every (prompt, seed) row, batched and left-padded as `perturb.run_arm` does (row seeds identical in every
    arm), with the rules watching each generated token. `act=False` records the firings without acting
    (no stop, no intervention): the unguarded arm of a comparison. `program=None`: no rules at all.
    `checkpoint` (an `engine.build.Checkpoint`): finished rows are saved every `checkpoint.every` batches and,
    with `resume`, a killed run continues after them (same prompts, rules, sampling and batch size).
    `group` (engine.distributed): the batches are dealt round-robin to the ranks, each batch made exactly as
    one process makes it (same rows, padding and seeds), and every rank returns every row, in row order;
    each rank checkpoints its own batches."""
    from chunktui.engine.distributed import SingleProcess
    from chunktui.engine.streaming import PhaseFlag, decode
    from chunktui.engine.tokens import encode_prompt, eos_ids

    group = group or SingleProcess()
    rows = [(i, p, sampling.seed + s) for i, p in enumerate(prompts) for s in range(seeds_per_prompt)]
    n_batches = -(-len(rows) // batch_size)
    if group.world_size > max(n_batches, 1):
        raise CorpusError(too_many_processes(group.world_size, n_batches, batch_size))
    mine = list(range(group.rank, n_batches, group.world_size))
    encoded = {p: encode_prompt(loaded, p, chat) for p in set(prompts)}
    stops = eos_ids(loaded) if sampling.stop_at_eos else set()
    tok = loaded.tokenizer
    packed = program.packed if program is not None else None
    out: list[RuleRun] = []
    done_batches = 0
    if checkpoint is not None:
        done_batches, saved = bind_checkpoint(checkpoint, {
            "monitor": "prompts", "prompts": list(prompts), "samples": seeds_per_prompt, "act": act,
            "sampling": sampling.describe(), "chat": chat, "batch_size": batch_size,
            "rules": program.describe() if program is not None else []}, group=group, batches=len(mine))
        out = [RuleRun.from_json(r) for r in saved or []]
    my_rows = sum(len(rows[b * batch_size:(b + 1) * batch_size]) for b in mine)
    for pos in range(done_batches, len(mine)):
        b = mine[pos] * batch_size
        batch = rows[b:b + batch_size]
        ids = [encoded[p] for _, p, _ in batch]
        B = len(batch)
        generated: list[list[int]] = [[] for _ in batch]
        firings: list[list[Firing]] = [[] for _ in batch]
        finished = ["length"] * B
        done = [False] * B
        if program is not None:
            program.reset(B)
        watch = None
        if program is not None and program.watches_prompt:
            def watch(states):  # (B, T, L+1, d): the prompts' states, before the first answer token is sampled
                Bs, T = states.shape[:2]
                hit = packed.match(states.reshape(Bs * T, *states.shape[2:])).hit.view(Bs, T, -1)
                pieces = [[""] * (T - len(i)) + [tok.decode([t]) for t in i] for i in ids]
                found, reread = program.observe_prompt(hit, [len(i) for i in ids], pieces)
                for i, fs in enumerate(found):
                    for f in fs:
                        f.extra.update({"prompt": batch[i][0] if prompt_index is None else prompt_index[batch[i][0]],
                                        "seed": batch[i][2]})
                    firings[i].extend(fs)
                if not (reread and act):
                    program.end_prompt()
                    return False
                return True
        hooks = program.installed() if program is not None and act else contextlib.nullcontext()
        with hooks:
            steps = decode(loaded, ids, sampling, seeds=[s for _, _, s in batch], cancel=cancel,
                           phase=program.phase if program is not None else PhaseFlag(), record=program is not None,
                           on_prefill=watch,
                           after_reread=program.end_prompt if program is not None else None)
            try:
                for k, step in enumerate(steps):
                    tokens = step.tokens.tolist()
                    if program is not None:
                        hit = packed.match(step.hidden).hit  # (B, C): one match for the whole batch
                        pieces = [[tok.decode([t])] for t in tokens]
                        rows_fired = program.observe(hit[:, None], [[len(i) + k] for i in ids], pieces)
                    for i, t in enumerate(tokens):
                        if done[i]:
                            continue
                        generated[i].append(t)
                        if program is not None:
                            for f in rows_fired[i]:
                                f.extra = {"prompt": batch[i][0] if prompt_index is None else prompt_index[batch[i][0]],
                                           "seed": batch[i][2], "generated_index": k}
                            firings[i].extend(rows_fired[i])
                        if t in stops:
                            done[i], finished[i] = True, "eos"
                        elif act and program is not None and program.stopped[i]:
                            done[i], finished[i] = True, "rule"
                    if all(done):
                        break
            finally:
                steps.close()
        for (_, p, s), g, f, end in zip(batch, generated, firings, finished):
            text = tok.decode([t for t in g if t not in stops], skip_special_tokens=True)
            out.append(RuleRun(prompt=p, seed=s, ids=g, text=text, firings=f, finished=end))
        if checkpoint is not None and ((pos + 1) % checkpoint.every == 0 or pos + 1 == len(mine)):
            save_checkpoint(checkpoint, pos + 1, [r.to_json() for r in out])
        if progress is not None:
            progress(len(out), my_rows)
    if group.world_size == 1:
        return out
    # every rank's rows, put back in row order: rank r made the rows of batches r, r + W, r + 2W, ... in turn
    placed: list[RuleRun | None] = [None] * len(rows)
    for rank, part in enumerate(group.all_gather_json([r.to_json() for r in out])):
        where = [i for j in range(rank, n_batches, group.world_size)
                 for i in range(j * batch_size, min((j + 1) * batch_size, len(rows)))]
        for i, r in zip(where, part, strict=True):
            placed[i] = RuleRun.from_json(r)
    return placed  # type: ignore[return-value]


def distinct_bigrams(ids: Sequence[int]) -> float | None:
    """Distinct token bigrams / bigrams: 1 for no repetition, near 0 for a loop (None under 2 tokens)."""
    pairs = list(zip(ids, ids[1:]))
    return len(set(pairs)) / len(pairs) if pairs else None


@torch.no_grad()
def first_token_logprobs(loaded, program: RuleProgram, prompts: Sequence[str], chat: bool = True,
                         batch_size: int = 16, firings: list | None = None) -> torch.Tensor:
    """(P, V) log-probabilities of the first answer token with the rules in place: what `on_prompt="act"` changes
    (the prompt read again with the edits its matches call for); otherwise the unguarded model's. `firings`, a
    list, gets each prompt's firings on the prompt."""
    from chunktui.engine.hooks import ResidualRecorder
    from chunktui.engine.streaming import left_pad
    from chunktui.engine.tokens import encode_prompt

    pad = loaded.tokenizer.pad_token_id or 0
    out = []
    for b in range(0, len(prompts), batch_size):
        rows = [encode_prompt(loaded, p, chat) for p in prompts[b:b + batch_size]]
        ids, mask = left_pad(rows, pad)
        ids, mask = ids.to(loaded.device), mask.to(loaded.device)
        position = (mask.cumsum(-1) - 1).clamp(min=0)
        run = lambda: loaded.model(input_ids=ids, attention_mask=mask, position_ids=position,  # noqa: E731
                                   use_cache=False, logits_to_keep=1).logits
        program.reset(len(rows))
        with program.installed():
            if program.watches_prompt:
                with ResidualRecorder(loaded.layout) as rec:
                    logits = run()
                states = rec.states()
                B, T = states.shape[:2]
                hit = program.packed.match(states.reshape(B * T, *states.shape[2:])).hit.view(B, T, -1)
                found, reread = program.observe_prompt(hit, [len(r) for r in rows])
                if firings is not None:
                    firings.extend(found)
                if reread:
                    logits = run()
                program.end_prompt()
            else:
                logits = run()
                if firings is not None:
                    firings.extend([] for _ in rows)
        out.append(logits[:, -1].float().log_softmax(-1).cpu())
    program.reset(1)
    return torch.cat(out)


def compare_rules(loaded, program: RuleProgram, prompts: Sequence[str], samples: int = 1, sampling=None,
                  chat: bool = True, batch_size: int = 16, cancel=None, progress=None) -> dict:
    """Unguarded (control) and guarded (perturbed) arms with identical prompts, sampling and seeds.

    The unguarded arm records where the rules would have fired without acting on it. Per concept the
    rules name: how often the word occurs in the answers of each arm (whole word, case-insensitive), with
    the keys of `perturb`'s report (control = unguarded, perturbed = guarded): hits, rates with Wilson 95%
    intervals, the change with a Newcombe interval, and the first answer token's log-probability (the same
    in both arms unless the rules act on the prompt, `on_prompt="act"`). Per arm: fluency as `perturb` measures
    it (perplexity under the unguarded model, degenerate answers) and the mean distinct-bigram ratio."""
    from chunktui.engine.perturb import (FLUENCY_MEASURE, continuation_nll, first_token_ids, fluency_summary,
                                         next_token_logprobs, occurs, token_diff)
    from chunktui.shared import perturb_stats as stats
    from chunktui.shared.settings import Sampling

    if not prompts:
        raise ChunkError("No prompts to compare on.")
    sampling = sampling or Sampling(max_new_tokens=48, temperature=0.8, top_p=0.9)
    arm = lambda name, act: generate_rows(  # noqa: E731
        loaded, list(prompts), samples, sampling, program, chat, batch_size, act=act, cancel=cancel,
        progress=(lambda d, t: progress(name, d / t)) if progress else None)
    control, guarded = arm("unguarded", False), arm("guarded", True)
    labels: list[str] = []
    for rule in program.rules:
        for label in rule.positive_labels() + list(rule.action.labels):
            if label not in labels:
                labels.append(label)
    lp = next_token_logprobs(loaded, list(prompts), None, chat, batch_size)
    acts_on_prompt = program.on_prompt == "act" and program.has_interventions
    lp_guarded = first_token_logprobs(loaded, program, list(prompts), chat, batch_size) if acts_on_prompt else lp
    n = len(control)
    concepts = {}
    for label in labels:  # the keys of `perturb`'s report: control = unguarded, perturbed = guarded
        c_hits = sum(occurs(label, r.text) for r in control)
        g_hits = sum(occurs(label, r.text) for r in guarded)
        ids = first_token_ids(loaded, label)
        first = float(lp[:, ids].logsumexp(-1).mean())
        first_g = float(lp_guarded[:, ids].logsumexp(-1).mean())
        concepts[label] = {"control_hits": c_hits, "perturbed_hits": g_hits,
                           "control_rate": c_hits / n, "perturbed_rate": g_hits / n, "delta_rate": (g_hits - c_hits) / n,
                           "control_ci": list(stats.wilson(c_hits, n)), "perturbed_ci": list(stats.wilson(g_hits, n)),
                           "delta_ci": list(stats.newcombe_difference(c_hits, n, g_hits, n)),
                           "logprob_control": first, "logprob_perturbed": first_g, "delta_logprob": first_g - first,
                           "rows": n}
    summary = {}
    for rule in program.rules:
        summary[rule.name] = {
            "action": str(rule.action),
            "rows_fired_unguarded": sum(any(f.rule == rule.name for f in r.firings) for r in control),
            "rows_fired_guarded": sum(any(f.rule == rule.name for f in r.firings) for r in guarded),
            "firings_guarded": sum(f.rule == rule.name for r in guarded for f in r.firings),
            "rows_fired_on_prompt": sum(any(f.rule == rule.name and f.extra.get("on_prompt") for f in r.firings)
                                        for r in guarded),
            "rows": n}

    def bigrams(runs):
        values = [v for v in (distinct_bigrams(r.ids) for r in runs) if v is not None]
        return sum(values) / len(values) if values else None

    nll = {"control": continuation_nll(loaded, control, chat), "perturbed": continuation_nll(loaded, guarded, chat)}
    fluency = {"control": fluency_summary(control, nll["control"]),
               "perturbed": fluency_summary(guarded, nll["perturbed"])}
    pairs = [{"prompt": c.prompt, "seed": c.seed, "control": c.text, "perturbed": g.text, "finished": g.finished,
              "firings": [f.to_json() for f in g.firings],
              "unguarded_firings": [f.to_json() for f in c.firings],
              "diff": token_diff(loaded.tokenizer, c.ids, g.ids)} for c, g in zip(control, guarded)]
    return {"settings": dict(sampling.describe(), chat=chat, samples=samples, prompts=len(prompts),
                             identical_sampling_both_arms=True, on_prompt=program.on_prompt, site=program.site,
                             interval=stats.INTERVAL, fluency_measure=FLUENCY_MEASURE),
            "intervention": {"mode": "rules", "rules": program.describe(), "arms": "control = unguarded, "
                             "perturbed = guarded", "on_prompt": program.on_prompt, "site": program.site},
            "rules": program.describe(), "concepts": concepts, "rules_summary": summary, "fluency": fluency,
            "distinct_bigrams": {"unguarded": bigrams(control), "guarded": bigrams(guarded)},
            "pairs": pairs}
