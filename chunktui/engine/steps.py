"""Compacting tokens for display: TokenEvents and scans -> session.TokenSteps (plain values).

This is the engine side of the UI protocol. A step keeps what the views draw
(strongest chunk per layer, its score, the norm profile, the sparse hit
columns); the per-chunk deviations and scores, (T, C), are returned beside
the steps so the engine process can keep them for token detail and chunk
plots without sending them.
"""

from __future__ import annotations

import torch

from chunktui.shared.session import TokenStep


def compact(indices, ids, texts, generated, logprobs, tops, hidden: torch.Tensor,
            matches) -> tuple[list[TokenStep], torch.Tensor, torch.Tensor]:
    """T tokens at once. hidden: (T, S, d); matches: MatchResult over T tokens, or None.

    Returns (steps, value (T, C) float32 on CPU, score (T, C) float32 on CPU).
    """
    norms = hidden.float().norm(dim=-1).cpu()  # (T, S)
    T, S = norms.shape
    if matches is not None:
        m = matches.to("cpu")
        value, score, hit = m.value.float(), m.score.float(), m.hit
        layer_chunk, layer_score = m.layer_chunk.tolist(), m.layer_score.tolist()
        token_chunk, token_score = m.token_chunk.tolist(), m.token_score.tolist()
        agree = m.token_agree.tolist() if m.token_agree is not None else [0] * T
        evidence = m.token_evidence.tolist() if m.token_evidence is not None else [None] * T
        rows, cols = hit.nonzero(as_tuple=True)
        hits: list[list[int]] = [[] for _ in range(T)]
        for r, c in zip(rows.tolist(), cols.tolist()):
            hits[r].append(c)
    else:
        value = score = torch.zeros(T, 0)
        layer_chunk, layer_score = [[-1] * S] * T, [[float("-inf")] * S] * T
        token_chunk, token_score = [-1] * T, [float("-inf")] * T
        agree, evidence = [0] * T, [None] * T
        hits = [[] for _ in range(T)]
    norm_rows = norms.tolist()
    steps = [TokenStep(index=int(indices[t]), token_id=int(ids[t]), text=texts[t], generated=bool(generated[t]),
                       logprob=logprobs[t], top=list(tops[t]), strongest=int(token_chunk[t]),
                       strongest_score=float(token_score[t]), layer_chunk=[int(x) for x in layer_chunk[t]],
                       layer_score=[float(x) for x in layer_score[t]], norms=norm_rows[t], hits=tuple(hits[t]),
                       agree=int(agree[t]), evidence=None if evidence[t] is None or evidence[t] != evidence[t]
                       else float(evidence[t]))
             for t in range(T)]
    return steps, value, score


def step_from_event(event) -> TokenStep:
    """A streaming.TokenEvent -> TokenStep."""
    return event_rows(event)[0]


def event_rows(event) -> tuple[TokenStep, torch.Tensor, torch.Tensor]:
    """A streaming.TokenEvent -> (TokenStep, value (C,), score (C,))."""
    steps, value, score = compact([event.index], [event.token_id], [event.text], [event.generated], [event.logprob],
                                  [event.top], event.hidden[None], event.matches)
    firings = getattr(event, "firings", None)
    if firings:
        steps[0].firings = tuple(f.to_json() for f in firings)
    return steps[0], value[0], score[0]


def steps_from_scan(result) -> list[TokenStep]:
    """A streaming.ScanResult -> TokenSteps (teacher-forced, none generated)."""
    return scan_rows(result)[0]


def scan_rows(result) -> tuple[list[TokenStep], torch.Tensor, torch.Tensor]:
    T = len(result.ids)
    return compact(list(range(T)), result.ids, result.texts, [False] * T, result.logprobs, [[] for _ in range(T)],
                   result.hidden, result.matches)
