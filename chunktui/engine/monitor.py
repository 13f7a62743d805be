"""Bulk monitoring: rules over many prompts (generated) or over a corpus / labelled spans (teacher-forced).

Over texts, every token of every context is read once, in the same batches, contexts and labels as
`evaluate` (`build.evaluate_dictionary`), matched, and the rules evaluated on the (tokens x chunks) hits of
each context in one pass (run lengths restart at each context). Interventions and stops cannot act on a
text that is read, not written; their firings are recorded all the same. With a process group (`chunktui
monitor --procs K`) the batches are dealt round-robin to the ranks and the firings gathered: the same
firings, in the same order, as one process.

With labels (the dictionary's words in a corpus, as `evaluate` labels them, or a span file), each `alert`
rule is scored against the labels its condition names outside any `not`: precision = alerted tokens
that carry one of those labels / alerted tokens; recall = labelled tokens alerted / labelled tokens.
A one-term rule on one chunk (`when cheese@12 -> alert`) alerts exactly where that chunk hits, so its
recall and false-positive rate are `evaluate`'s TP and FP rates for that chunk.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from chunktui.engine.rules import RuleProgram, bind_checkpoint, save_checkpoint
from chunktui.shared.errors import ChunkError, CorpusError
from chunktui.shared.rules import Firing


@dataclass
class TextMonitor:
    """What a monitor over texts found."""

    firings: list[Firing]
    tokens: int
    contexts: int
    scores: dict = field(default_factory=dict)  # alert rule -> precision / recall / counts (with labels)
    seconds: float = 0.0
    skipped: dict = field(default_factory=dict)  # label -> why it has no mask


@torch.no_grad()
def monitor_texts(loaded, program: RuleProgram, corpus, labels=None, batch_size: int = 16, progress=None,
                  should_stop=None, checkpoint=None, group=None) -> TextMonitor:
    """Rules over every token of a prepared corpus; alert precision / recall against `labels` when given.

    `checkpoint` (an `engine.build.Checkpoint`): the firings so far are saved every `checkpoint.every` batches and,
    with `resume`, a killed run continues after the last saved batch (same corpus, rules and batch size).
    `group` (engine.distributed): the batches (laid out from the corpus alone, as `evaluate` lays them out) are
    dealt round-robin to the ranks; the rules restart at every batch, so each batch's firings are those of one
    process, and every rank returns all of them. Each rank checkpoints its own batches."""
    from chunktui.engine.allocator import keep_freed_memory
    from chunktui.engine.corpus import run_batch, schedule
    from chunktui.engine.distributed import SingleProcess
    from chunktui.engine.rules import too_many_processes

    keep_freed_memory()  # a corpus job (engine/allocator.py)
    group = group or SingleProcess()
    packed = program.packed
    layers = list(packed.layers)
    T = len(corpus.tokens)
    firings: list[Firing] = []
    batches = schedule(corpus, batch_size)
    if group.world_size > max(len(batches), 1):
        raise CorpusError(too_many_processes(group.world_size, len(batches), batch_size))
    mine = list(range(group.rank, len(batches), group.world_size))
    source, table = corpus.source, corpus.tokens
    start = time.perf_counter()
    done = 0
    if checkpoint is not None:
        done, saved = bind_checkpoint(checkpoint, {"monitor": "texts", "corpus": corpus.digest, "tokens": T,
                                                   "rules": program.describe(), "batch_size": batch_size},
                                      group=group, batches=len(mine))
        firings = [Firing.from_json(record) for record in saved or []]
    for pos in range(done, len(mine)):
        batch = batches[mine[pos]]
        if should_stop is not None and should_stop():
            from chunktui.shared.errors import GenerationCancelled

            raise GenerationCancelled("Monitoring cancelled.")
        index, states = run_batch(loaded, corpus, batch, layers)
        hit = packed.match(states).hit  # (t, C) on the pack's device
        starts = torch.zeros(len(index), dtype=torch.bool)
        at = 0
        for i in batch:  # run_batch concatenates each row's kept tokens in batch order
            n = len(corpus.rows[i][0]) - corpus.rows[i][2]
            starts[at] = True
            at += n
        program.reset(1)
        positions = index.tolist()
        texts = [source[table.starts[t]:table.ends[t]] for t in positions]
        found = program.observe(hit[None], [positions], [texts], starts=starts[None].to(hit.device))[0]
        for f in found:
            f.extra = {"context": table.context[f.token]}
        firings.extend(found)
        if checkpoint is not None and ((pos + 1) % checkpoint.every == 0 or pos + 1 == len(mine)):
            save_checkpoint(checkpoint, pos + 1, [f.to_json() for f in firings])
        if progress is not None:
            progress((pos + 1) / len(mine))
    if group.world_size > 1:
        firings = [Firing.from_json(r) for part in group.all_gather_json([f.to_json() for f in firings]) for r in part]
    # a token is read once, and a rule fires at most once per token: (token, rule) orders the firings alike
    # whichever process found them
    firings.sort(key=lambda f: (f.token, f.rule))
    seconds = time.perf_counter() - start
    scores = {}
    if labels is not None:
        fired_alert = {r: torch.zeros(T, dtype=torch.bool) for r, rule in enumerate(program.rules)
                       if rule.action.kind == "alert"}
        index_of = {rule.name: r for r, rule in enumerate(program.rules)}
        for f in firings:
            r = index_of[f.rule]
            if r in fired_alert:
                fired_alert[r][f.token] = True
        for r, fired in fired_alert.items():
            rule = program.rules[r]
            named = [label for label in rule.positive_labels() if label in labels.masks]
            if not named:
                scores[rule.name] = {"labels": rule.positive_labels(), "precision": None, "recall": None,
                                     "note": "no labelled token carries the labels it names"}
                continue
            pos = torch.zeros(T, dtype=torch.bool)
            for label in named:
                pos |= labels.masks[label]
            tp, fp = int((fired & pos).sum()), int((fired & ~pos).sum())
            n_pos, n_fired = int(pos.sum()), int(fired.sum())
            scores[rule.name] = {"labels": named, "alerts": n_fired, "positives": n_pos, "tp": tp, "fp": fp,
                                 "precision": tp / n_fired if n_fired else None,
                                 "recall": tp / n_pos if n_pos else None,
                                 "fp_rate": fp / (T - n_pos) if T > n_pos else None}
    return TextMonitor(firings=firings, tokens=T, contexts=len(corpus.contexts), scores=scores, seconds=seconds,
                       skipped=dict(labels.skipped) if labels is not None else {})


def rule_summary(program: RuleProgram, firings: list[Firing], rows: int, key: str) -> dict:
    """Per rule: firings, rows (prompts or contexts) where it fired, and the first token it fired at per row."""
    out = {}
    for rule in program.rules:
        mine = [f for f in firings if f.rule == rule.name]
        first: dict = {}
        for f in mine:
            row = f.extra.get(key)
            first[row] = min(first.get(row, f.token), f.token)
        out[rule.name] = {"action": str(rule.action), "firings": len(mine), f"{key}s_fired": len(first),
                          f"{key}s": rows, "first_token": {str(k): v for k, v in sorted(first.items(),
                                                                                         key=lambda kv: str(kv[0]))}}
    if not program.rules:
        raise ChunkError("No rules to monitor with.")
    return out
