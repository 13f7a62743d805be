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
idle intervention costs nothing on the device. A rule that fires at token t edits the states from token
t+1 on: token t's states were computed in the forward pass that produced the match.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from chunktui.engine.hooks import block_hooks
from chunktui.engine.models import module_device
from chunktui.shared.errors import ChunkError
from chunktui.shared.rules import (And, Firing, Not, Or, Rule, Run, Term, Vocabulary, action_layers,
                                   check_rules, parse_rule)

_NEG = -(1 << 40)


def vocabulary(packed, n_states: int, name: str = "the dictionary") -> Vocabulary:
    chunks = packed.chunks if packed is not None else []
    return Vocabulary.from_columns([c.label for c in chunks], [int(c.layer) for c in chunks], n_states, name)


@dataclass
class Evaluation:
    """Host-side result for a batch of rows over T tokens: fired (B, T, R) and layers (B, T, R, S), as lists."""

    fired: list  # [b][t][r] bool
    layers: list  # [b][t][r] -> list of layer numbers (the model's layer indices)


class RuleProgram:
    """Parsed rules compiled against a packed dictionary; evaluates batches of rows token by token."""

    def __init__(self, rules: Sequence[Rule | str], packed, n_states: int, dictionary=None, loaded=None,
                 name: str = "the dictionary") -> None:
        rules = [parse_rule(r) if isinstance(r, str) else r for r in rules]
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
        self.counts: torch.Tensor | None = None  # (B, n_runs) run lengths so far
        # interventions: rule index -> Intervention; host-side state per row
        self.interventions: dict[int, object] = {}
        if any(r.action.kind == "intervene" for r in self.rules):
            if dictionary is None or loaded is None:
                raise ChunkError("Rules with interventions need the model and its dictionary.")
            self._build_interventions(dictionary, loaded, n_states)
        self.loaded = loaded
        self.remaining: list[dict[int, int]] = []  # per row: rule index -> tokens left (-1: while)
        self.active_rows: dict[int, torch.Tensor] = {}  # rule index -> (B,) bool on the device, when any row is on
        self.stopped: list[bool] = []

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

    # ------------------------------------------------------------------ state

    def reset(self, batch: int = 1) -> None:
        """Fresh state for `batch` rows (a new generation, or new texts)."""
        self.counts = torch.zeros(batch, len(self.runs), dtype=torch.long, device=self.device)
        self.remaining = [dict() for _ in range(batch)]
        self.active_rows = {}
        self.stopped = [False] * batch

    @property
    def has_interventions(self) -> bool:
        return bool(self.interventions)

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The interventions' edit hooks on their blocks for the duration (no-op without interventions)."""
        if not self.interventions:
            yield
            return
        edits = {layer: self._hook(pairs) for layer, pairs in self.edits.items()}
        with block_hooks(self.loaded.layout, edits=edits):
            yield

    def _hook(self, pairs):
        def hook(module, args, kwargs):
            if not self.active_rows:
                return None
            live = [(r, edit) for r, edit in pairs if r in self.active_rows]
            if not live:
                return None
            h = args[0] if args else kwargs["hidden_states"]
            for r, edit in live:
                if h.device != edit.device:
                    h = h.to(edit.device)
                rows = self.active_rows[r].to(h.device)
                h = edit.apply(h, rows[:, None].expand(h.shape[0], h.shape[1]))
            if args:
                return (h,) + tuple(args[1:]), kwargs
            return args, dict(kwargs, hidden_states=h)
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
        self._idx = torch.arange(T, device=hit.device)
        self._starts = starts
        new_counts = self.counts.clone()
        cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def ev(node):
            key = id(node)
            if key in cache:
                return cache[key]
            if isinstance(node, Term):
                k = self.terms.index(node)
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
                j = next(i for i, r in enumerate(self.runs) if r is node)
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
                    now = rule.action.duration if rule.action.duration is not None else 1
                else:
                    now = max(before - 1, 0)
                if now:
                    self.remaining[b][r] = now
                else:
                    self.remaining[b].pop(r, None)
                changed |= bool(before) != bool(now)
        if changed:
            active = {}
            for r in self.interventions:
                rows = [r in self.remaining[b] for b in range(len(last))]
                if any(rows):
                    active[r] = torch.tensor(rows, dtype=torch.bool, device=self.device)
            self.active_rows = active

    def describe(self) -> list[dict]:
        return [rule.to_json() for rule in self.rules]


def compile_rules(rules, packed, loaded, dictionary=None, name: str = "the dictionary") -> RuleProgram | None:
    """A RuleProgram from rules (parsed or text), or None when there are none (or it is one already)."""
    if rules is None or isinstance(rules, RuleProgram):
        return rules
    rules = list(rules)
    if not rules:
        return None
    return RuleProgram(rules, packed, loaded.layout.n_states, dictionary=dictionary, loaded=loaded, name=name)
