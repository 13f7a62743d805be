"""Calibrating the token-level colour rule on a training text (see `shared/evidence.py` for the rule).

`evidence_on_corpus` streams a corpus through the packed dictionary (one
forward pass per batch of contexts, as the build's passes do) and keeps, per
token and concept, the pooled evidence: (T, concepts) numbers, nothing
corpus-sized per layer. `calibrate_required` then raises each concept's
required evidence, greedily, until

- each concept colours at most `budget` of the training tokens that are not it, and
- all concepts together colour at most `budget` of the tokens that are no concept at all;

each step raises the requirement of the concept that colours the most
non-concept tokens just past its weakest such token. The figures it reaches
on the training text (in-sample: the chunks' templates and thresholds were fitted
on the same text) are stored with the rule, with the training evidence of the
positives and of the negatives that pass, from which the app reads the
precision at a given level of evidence.

Why a pass of its own: the evidence needs every token's deviation from the chosen
chunk of every layer, and which tolerance (and so which subpopulation) a layer
keeps is known only after the build's second pass has seen every token; keeping
every tolerance's deviations instead would take tokens x layers x tolerances x
concepts numbers (420 million for the sample dictionary).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from chunktui.shared.evidence import DEFAULT_BUDGET, DEFAULT_CAP, RULE_KIND, TokenRule

_MAX_STORED = 400  # positives' evidence values kept per concept (evenly spaced order statistics beyond)


def evidence_on_corpus(loaded, chunks, corpus, layers: list[int], rule: TokenRule, batch_size: int = 16,
                       progress: Callable[[int], None] | None = None, should_stop=None, group=None, states=None):
    """(T, concepts) float64 evidence of every token of `corpus`, and the concept order.

    `states` (a `corpus.BatchStates` filled by an earlier pass over the same batches, same `batch_size` and
    layers): the batches it kept are read back instead of running the model again (the same bytes, so the
    same evidence); the others run as usual."""
    from chunktui.engine.allocator import keep_freed_memory
    from chunktui.engine.corpus import run_batch, schedule
    from chunktui.engine.distributed import SingleProcess
    from chunktui.engine.matching import PackedDictionary

    keep_freed_memory()  # a corpus job (engine/allocator.py)
    group = group or SingleProcess()
    packed = PackedDictionary(chunks, loaded.hidden_size, layers, device=loaded.device, rule=rule)
    T = len(corpus.tokens)
    E = torch.zeros(T, len(packed.concepts), dtype=torch.float64)
    batches = schedule(corpus, batch_size)
    for j in range(group.rank, len(batches), group.world_size):
        if should_stop is not None:
            should_stop()
        kept = states.get(j, loaded.device) if states is not None else None
        index, H = kept if kept is not None else run_batch(loaded, corpus, batches[j], layers)
        E[index] = packed.pooled_evidence(H).cpu().double()
        if progress is not None:
            progress(len(index))
    return group.all_sum(E), packed.concepts  # each token was filled by one rank, zeros elsewhere


def calibrate_required(E: torch.Tensor, positives: torch.Tensor, concepts: list[str], budget: float = DEFAULT_BUDGET,
                       cap: float = DEFAULT_CAP, voting_layers: list[int] | None = None,
                       source: dict | None = None) -> TokenRule:
    """The rule whose requirements meet `budget` on this evidence. E (T, K) float, positives (T, K) bool."""
    if not 0.0 <= budget < 1.0 or math.isnan(budget):
        from chunktui.shared.errors import CorpusError

        raise CorpusError(f"The colour budget must be at least 0 and below 1, got {budget}.")
    E = E.double()
    T, K = E.shape
    non_concept = ~positives.any(1)
    n0 = int(non_concept.sum())
    negatives = (~positives).sum(0)
    allowed_each = torch.floor(budget * negatives.double() + 1e-9).long()
    allowed_all = int(math.floor(budget * n0 + 1e-9))
    # start: a token needs net non-negative evidence (a miss votes below 0, so some layer must match)
    required = torch.zeros(K, dtype=torch.float64)
    while True:
        passes = E >= required
        wrong = passes & ~positives
        over = (wrong.sum(0) > allowed_each).nonzero().flatten()
        if len(over):
            k = int(over[0])
        else:
            stray = passes & non_concept[:, None]
            if int(stray.any(1).sum()) <= allowed_all:
                break
            k = int(stray.sum(0).argmax())
            wrong = stray
        weakest = float(E[wrong[:, k], k].min())
        required[k] = math.nextafter(weakest, math.inf)
    passes = E >= required
    per_label = {}
    for k, label in enumerate(concepts):
        pos = positives[:, k]
        ev_pos = torch.sort(E[pos, k]).values
        ev_neg = torch.sort(E[~pos & passes[:, k], k]).values
        if len(ev_pos) > _MAX_STORED:
            ev_pos = ev_pos[torch.linspace(0, len(ev_pos) - 1, _MAX_STORED).round().long()]
        per_label[label] = {
            "required": float(required[k]), "positives": int(pos.sum()), "tp": int((passes[:, k] & pos).sum()),
            "negatives": int((~pos).sum()), "fp": int((passes[:, k] & ~pos).sum()),
            "fp_non_concept": int((passes[:, k] & non_concept).sum()),
            "pos_evidence": [round(float(x), 4) for x in ev_pos], "neg_evidence": [round(float(x), 4) for x in ev_neg]}
    coloured = int((passes.any(1) & non_concept).sum())
    overall = {"tokens": T, "non_concept": n0, "coloured_non_concept": coloured,
               "rate": coloured / n0 if n0 else 0.0, "in_sample": True}
    return TokenRule(kind=RULE_KIND, voting_layers=voting_layers, cap=cap,
                     required={label: float(required[k]) for k, label in enumerate(concepts)},
                     budget=budget, per_label=per_label, overall=overall, source=dict(source or {}))


def rule_for_corpus(loaded, chunks, corpus, masks: dict, layers: list[int], budget: float = DEFAULT_BUDGET,
                    voting_layers: list[int] | None = None, cap: float = DEFAULT_CAP, batch_size: int = 16,
                    progress: Callable[[int], None] | None = None, should_stop=None, group=None,
                    source: dict | None = None, states=None) -> TokenRule:
    """Stream `corpus` (labelled by `masks`, label -> (T,) bool) and calibrate the colour rule on it.

    `states`: batches already computed by an earlier pass (see `evidence_on_corpus`)."""
    probe = TokenRule(kind=RULE_KIND, voting_layers=voting_layers, cap=cap, budget=budget)
    E, concepts = evidence_on_corpus(loaded, chunks, corpus, layers, probe, batch_size, progress, should_stop, group,
                                     states=states)
    T = len(corpus.tokens)
    positives = torch.stack([masks[c] if c in masks else torch.zeros(T, dtype=torch.bool) for c in concepts], 1) \
        if concepts else torch.zeros(T, 0, dtype=torch.bool)
    voting = probe.voting(sorted({c.layer for c in chunks}))
    info = {"tokens": T, "context_mode": corpus.context_mode, "corpus_digest": corpus.digest}
    info.update(source or {})
    return calibrate_required(E, positives, concepts, budget, cap, voting_layers=voting, source=info)


def calibrate_dictionary(loaded, dictionary, source, budget: float = DEFAULT_BUDGET, batch_size: int = 16,
                         progress=None, should_stop=None, context_mode: str | None = None) -> TokenRule:
    """Calibrate (or recalibrate) a dictionary's colour rule on its training text; stores it in its notes.

    The text is labelled with the dictionary's own settings (label mode, step, part-word labels) and read in
    the dictionary's context mode, as `evaluate` does. For a dictionary made before rules were stored."""
    from chunktui.engine.corpus import check_layers
    from chunktui.engine.labels import labelled_corpus

    dictionary.check_compatible(loaded.identity())
    corpus, labels = labelled_corpus(loaded, dictionary, source, context_mode)
    layers = check_layers(dictionary.layers(), loaded.layout)
    rule = rule_for_corpus(loaded, dictionary.chunks, corpus, labels.masks, layers, budget=budget,
                           batch_size=batch_size, progress=progress, should_stop=should_stop,
                           source={"corpus": source.corpus_name or source.spans_path})
    dictionary.notes = dict(dictionary.notes, token_rule=rule.to_json())
    return rule
