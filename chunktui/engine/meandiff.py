"""Labelled direction chunks: the difference of means, with a cosine threshold calibrated to a false-positive budget.

For each concept and layer, the direction is u = (mean of the concept's token states - mean of every token's
state), normalised: the "difference-in-means" direction that linear-probing and steering work uses. A state
matches when its cosine with u is at least the threshold, which is calibrated as `fp-budget:B` calibrates PA
thresholds: just above the (m+1)-th largest cosine among the training negatives, m = floor(B * negatives), so
at most m of them match. `typical` is the mean projection of the positives on u (what `graft` moves a state
to); a dictionary keeps the corpus's layer means, so `mean-ablate` moves the projection to the mean token's.

Where population averaging finds the neurons on which the positives agree (which can be nearly all of them, so
that suppressing "the chunk" scales the whole state), a difference-of-means chunk is one direction: `suppress`
removes that one component (and `mean-ablate` sets it to the mean token's), the rest of the state untouched.
Built with labels shifted by `--step 1`, its positives are the tokens *before* the word, so a chunk says
"this word comes next" (the state the next token is sampled from) rather than "this token is the word".

Two streaming passes, nothing corpus-sized held in memory: pass 1 runs every context and sums the states
(every token, and each concept's positives); pass 2 reads the same batches' states back (on a CPU, from a
temporary folder; elsewhere by running the model again), keeps the largest negative cosines per concept and
layer and every positive's cosine; pass 3 calibrates the colour rule on the same states, as the PA build
does. With a process group the batches are dealt out and sums and order statistics merged, so every rank
returns the same dictionary.
"""

from __future__ import annotations

import math
import time

import torch

from chunktui.engine.dictionary import Chunk, ChunkDictionary, chunk_id
from chunktui.shared.errors import CorpusError, GenerationCancelled
from chunktui.shared.settings import ProgressFn

METHOD = "mean-difference"
COSINE_SLACK = 1e-5  # thresholds sit this far above the (m+1)-th negative cosine (float32 vs float64 rounding)


def _quiet(stage: str, fraction: float | None, message: str) -> None:
    pass


@torch.no_grad()
def build_mean_difference(loaded, source, layers: list[int] | None = None, budget: float = 0.001,
                          batch_size: int = 16, context_mode: str = "sentence", progress: ProgressFn = _quiet,
                          should_stop=None, group=None, reuse_states: bool | None = None,
                          colour_budget: float | None = 0.01, vote_layers: list[int] | None = None):
    """(ChunkDictionary of direction chunks, BuildReport): one chunk per concept per layer (see the module).

    `colour_budget`: the colour rule is calibrated on the same text in a third pass over the kept states, as
    the PA build does (`calibrate.rule_for_corpus`); None leaves it out."""
    from chunktui.engine.allocator import keep_freed_memory
    from chunktui.engine.build import BuildReport, _Rate, labelled_corpus
    from chunktui.engine.corpus import BatchStates, run_batch, schedule
    from chunktui.engine.distributed import SingleProcess, peak_memory_bytes

    if not 0.0 <= budget < 1.0:
        raise CorpusError(f"The false-positive budget must be in [0, 1), got {budget}.")
    keep_freed_memory()  # a corpus job (engine/allocator.py)
    group = group or SingleProcess()
    report = BuildReport(world_size=group.world_size)
    t_start = time.perf_counter()
    layers, corpus, labels, spans = labelled_corpus(loaded, source, layers, context_mode, report)
    T = report.tokens
    names = list(labels.masks)
    pos = torch.stack([labels.masks[name] for name in names])  # (C, T) bool
    C, S, d = len(names), len(layers), loaded.hidden_size
    n_pos = pos.sum(1)  # (C,)
    n_neg = T - n_pos
    allowed = [int(math.floor(budget * int(n) + 1e-9)) for n in n_neg]
    keep_k = [min(m + 1, max(int(n), 1)) for m, n in zip(allowed, n_neg)]
    K = max(keep_k)

    def stop_check():
        if should_stop is not None and should_stop():
            raise GenerationCancelled("Build cancelled; nothing was saved.")

    batches = schedule(corpus, batch_size)
    mine = list(range(group.rank, len(batches), group.world_size))
    if reuse_states is None:
        reuse_states = loaded.device.type == "cpu"
    kept = BatchStates(expected_bytes=T * S * d * loaded.dtype.itemsize) if reuse_states else None
    try:
        # pass 1: sums of every token's states and of each concept's positives, float64
        total = torch.zeros(S, d, dtype=torch.float64)
        pos_sum = torch.zeros(C, S * d, dtype=torch.float64)
        rate = _Rate(T, group.world_size)
        for j in mine:
            stop_check()
            index, states = run_batch(loaded, corpus, batches[j], layers)
            if kept is not None:
                kept.put(j, index, states)
            x = states.double().cpu()  # (t, S, d)
            total += x.sum(0)
            weights = pos[:, index].double()  # (C, t)
            if weights.any():
                pos_sum += weights @ x.reshape(len(index), S * d)
            progress("sums", *rate.step(len(index)))
        total = group.all_sum(total)
        pos_sum = group.all_sum(pos_sum).view(C, S, d)
        report.collect_seconds = time.perf_counter() - t_start

        mean_all = total / T  # (S, d)
        mean_pos = pos_sum / n_pos.clamp(min=1).double()[:, None, None]
        diff = mean_pos - mean_all[None]  # (C, S, d)
        norms = diff.norm(dim=-1, keepdim=True)
        U = (diff / norms.clamp(min=1e-300)).float()  # (C, S, d) unit directions (float32, as matching uses them)
        degenerate = (norms[..., 0] == 0) | ~torch.isfinite(norms[..., 0])  # (C, S)

        # pass 2: cosines; the K largest negative cosines per concept and layer, every positive's cosine
        t1 = time.perf_counter()
        top = torch.full((C, S, K), float("-inf"), dtype=torch.float64)
        pos_index = [labels.masks[name].nonzero().flatten() for name in names]
        pos_cos = [torch.zeros(S, len(p), dtype=torch.float64) for p in pos_index]
        proj_sum = torch.zeros(C, S, dtype=torch.float64)  # the positives' projections on u, for `typical`
        U64 = U.double().permute(1, 2, 0).contiguous()  # (S, d, C)
        rate = _Rate(T, group.world_size)
        for j in mine:
            stop_check()
            got = kept.get(j) if kept is not None else None
            if got is None:
                got = run_batch(loaded, corpus, batches[j], layers)
            index, states = got
            x = states.double().cpu().transpose(0, 1)  # (S, t, d)
            proj = torch.bmm(x, U64)  # (S, t, C)
            cos = proj / x.norm(dim=-1, keepdim=True).clamp(min=1e-300)
            is_pos = pos[:, index]  # (C, t)
            neg_cos = torch.where(is_pos.T[None], float("-inf"), cos).permute(2, 0, 1)  # (C, S, t)
            merged = torch.cat([top, neg_cos], dim=-1)
            top = merged.topk(K, dim=-1).values
            for c in range(C):
                rows = is_pos[c].nonzero().flatten()
                if len(rows):
                    slots = torch.searchsorted(pos_index[c], index[rows])
                    pos_cos[c][:, slots] = cos[:, rows, c]
                    proj_sum[c] += proj[:, rows, c].sum(1)
            progress("calibrate", *rate.step(len(index)))
        gathered = group.all_cat(top, dim=-1)
        top = gathered.topk(K, dim=-1).values
        pos_cos = [group.all_sum(p) for p in pos_cos]  # each positive was filled by one rank
        proj_sum = group.all_sum(proj_sum)
        report.fit_seconds = time.perf_counter() - t1
        chunks = _chunks(names, layers, labels, allowed, n_pos, n_neg, T, top, keep_k, pos_cos, proj_sum, U,
                         degenerate, budget, corpus, report)
        rule = None
        if colour_budget is not None:
            from chunktui.engine.calibrate import rule_for_corpus

            t2 = time.perf_counter()
            rate = _Rate(T, group.world_size)
            rule = rule_for_corpus(loaded, chunks, corpus, labels.masks, layers, budget=colour_budget,
                                   voting_layers=vote_layers, batch_size=batch_size, should_stop=stop_check,
                                   group=group, progress=lambda k: progress("colour rule", *rate.step(k)),
                                   source={"corpus": source.corpus_name or source.spans_path}, states=kept)
            report.calibrate_seconds = time.perf_counter() - t2
    finally:
        if kept is not None:
            kept.close()
    notes = {"context_mode": corpus.context_mode, "label_mode": labels.mode, "step": labels.step, "n": "all",
             "criterion": f"fp-budget:{budget:g}", "method": METHOD,
             "corpus": source.corpus_name or source.spans_path, "tokens": T, "corpus_digest": corpus.digest,
             "label_source": "spans" if spans is not None else "words"}
    if corpus.windowing_note():
        notes["windowed"] = corpus.windowing_note()
    if rule is not None:
        notes["token_rule"] = rule.to_json()
    means = torch.full((loaded.layout.n_states, d), float("nan"))
    means[layers] = mean_all.float()
    report.seconds = time.perf_counter() - t_start
    report.peak_memory = peak_memory_bytes(loaded.device)
    return ChunkDictionary(model=loaded.identity(), chunks=chunks, notes=notes, layer_means=means), report


def _chunks(names, layers, labels, allowed, n_pos, n_neg, T, top, keep_k, pos_cos, proj_sum, U, degenerate, budget,
            corpus, report) -> list[Chunk]:
    from chunktui.engine.pa import confusion_scores

    chunks: list[Chunk] = []
    for c, name in enumerate(names):
        m = allowed[c]
        for s, layer in enumerate(layers):
            if degenerate[c, s]:
                report.empty.append(f"{name}@{layer}")
                report.unfit[f"{name}@{layer}"] = ("the concept's mean state equals the corpus mean here (e.g. a "
                                                   "layer where every token has the same state)")
                continue
            if m >= int(n_neg[c]):
                threshold = -1.0  # the budget allows every negative
            else:
                kth = float(top[c, s, m])  # the (m+1)-th largest negative cosine
                threshold = min(kth + COSINE_SLACK, 1.0)
            tp = int((pos_cos[c][s] >= threshold).sum())
            fp = int((top[c, s, :keep_k[c]] >= threshold).sum())
            P, N = int(n_pos[c]), int(n_neg[c])
            scores = confusion_scores(torch.tensor(tp), torch.tensor(fp), P, N)  # the PA chunks' fit keys
            stats = {key: float(v) for key, v in scores.items()}
            for key in ("tp", "fp", "tn", "fn"):
                stats[key] = int(stats[key])
            stats.update(positives=P, tokens=T, n=P, label_mode="part-word" if name in labels.part_word else labels.mode)
            chunks.append(Chunk(id=chunk_id(name, layer, labels.step), label=name, layer=layer, kind="direction",
                                direction=U[c, s].clone(), threshold=threshold,
                                typical=float(proj_sum[c, s] / max(P, 1)), step=labels.step, method=METHOD,
                                criterion=f"fp-budget:{budget:g}", seed=None, corpus_digest=corpus.digest,
                                fit=stats))
    if not chunks:
        raise CorpusError("No chunk could be fitted at any layer: every concept's mean state equals the corpus mean.")
    return chunks
