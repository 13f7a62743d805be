"""Token-by-token generation that streams every layer's hidden state, and teacher-forced scans.

One decode loop serves everything: live streaming (batch of 1, hidden states
recorded and matched) and batched comparison runs (left-padded, no
recording). Each step is one forward pass of one new token per row with the
KV cache: no prefix recomputation, and hidden states come from the same pass
(recorded by `ResidualRecorder` hooks).

The hidden state of a token is the state computed when that token is fed to
the model, so a generated token's states arrive with the same forward pass
that gives the distribution over the *next* token.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from chunktui.engine.hooks import ResidualRecorder
from chunktui.engine.matching import MatchResult, PackedDictionary
from chunktui.engine.devices import out_of_memory
from chunktui.engine.memory import ensure_fits
from chunktui.engine.models import LoadedModel
from chunktui.engine.tokens import Detokenizer, encode_prompt, eos_ids
from chunktui.shared.settings import Sampling


@dataclass
class TokenEvent:
    """One token: given in the prompt (scan/prefill) or newly generated."""

    index: int  # position in the sequence (prompt tokens first)
    token_id: int
    text: str  # the piece of text this token adds
    hidden: torch.Tensor  # (L+1, d) on the model's device
    top: list[tuple[str, float]]  # top next-token candidates after this token: (text, probability)
    logprob: float | None  # log-probability the model gave this token (None for the first prompt token)
    matches: MatchResult | None  # this token's matches (T = 1), on the pack's device
    generated: bool
    finished: str | None = None  # on the last event: "length", "eos", "stop", "rule", "cancelled"
    elapsed: float = 0.0  # seconds since generation started
    firings: list = field(default_factory=list)  # shared.rules.Firing records of the rules that fired on this token


def _cache_arg(model) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_out(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def pick_tokens(logits: torch.Tensor, sampling: Sampling, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. Greedy, or temperature / top-k / top-p sampling per row."""
    if sampling.temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / sampling.temperature
    if sampling.top_k and sampling.top_k > 0:
        k = min(sampling.top_k, logits.shape[-1])
        kth = logits.topk(k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already cover top_p
        drop = (probs.cumsum(-1) - probs) >= sampling.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    # one generator per row, so a row's draws do not depend on the other rows of the batch
    picks = [torch.multinomial(probs[b], 1, generator=generators[b]) for b in range(probs.shape[0])]
    return torch.cat(picks)


def _top(tokenizer, probs: torch.Tensor, k: int = 5) -> list[tuple[str, float]]:
    values, ids = probs.topk(k)
    return [(tokenizer.decode([i]), float(v)) for v, i in zip(values.tolist(), ids.tolist())]


@dataclass
class DecodeStep:
    """One decode step for a batch: the tokens just fed, their states, and the next distribution."""

    tokens: torch.Tensor  # (B,) ids fed in this step
    logprobs: torch.Tensor  # (B,) log-probability of those tokens under the previous step
    next_logits: torch.Tensor  # (B, V)
    hidden: torch.Tensor | None  # (B, L+1, d) when recording


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask


class PhaseFlag:
    """Tells interventions whether the model is reading the prompt or generating."""

    def __init__(self) -> None:
        self.phase = "prefill"


@torch.no_grad()
def decode(loaded: LoadedModel, rows: list[list[int]], sampling: Sampling, seeds: Sequence[int] | None = None,
           record: bool = False, cancel: threading.Event | None = None, phase: PhaseFlag | None = None,
           prefill_states: list | None = None, on_prefill=None, after_reread=None) -> Iterator[DecodeStep]:
    """The decode loop: prefill the (left-padded) prompts, then one forward per new token.

    Yields one DecodeStep per generated token (the token, its states, the next
    logits). The caller decides when to stop (EOS, stop strings); the loop
    stops itself at max_new_tokens or when `cancel` is set. If
    `prefill_states` is a list, the prompt's states (B, T, L+1, d) and the
    prefill logits are appended to it. `on_prefill(states)` hears of the prompt's states before
    the first token is sampled; when it returns True the prompt is read again (whatever edit hooks are on now
    apply to it: rules that act on the prompt) and the answer starts from that reading; `after_reread()` follows.
    """
    model, device = loaded.model, loaded.device
    # the loop holds one step's states at a time (and the prompt's, when asked); a caller keeping every
    # token's states checks for them itself (memory.ensure_fits with kept_states)
    longest = max(len(r) for r in rows)
    ensure_fits(loaded, "generating", longest, sampling.max_new_tokens, batch=len(rows), record=record,
                full_logits=prefill_states is not None,
                kept_states=(longest if prefill_states is not None else 0) + 1)
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    ids, mask = left_pad(rows, pad)
    ids, mask = ids.to(device), mask.to(device)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    seeds = list(seeds) if seeds is not None else [sampling.seed] * len(rows)
    gen_device = device if device.type in ("cuda", "mps") else torch.device("cpu")
    generators = [torch.Generator(device=gen_device).manual_seed(int(s)) for s in seeds]
    cache_arg = _cache_arg(model)
    phase = phase or PhaseFlag()
    layout = loaded.layout
    with out_of_memory("generating", device):
        phase.phase = "prefill"
        if prefill_states is not None or on_prefill is not None:  # the prompt's states are wanted
            keep = {} if prefill_states is not None else {"logits_to_keep": 1}
            with ResidualRecorder(layout) as rec:
                out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, **keep)
            states = rec.states()
            if prefill_states is not None:
                prefill_states.append(states)
                prefill_states.append(out.logits)
            if on_prefill is not None and on_prefill(states):
                out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True,
                            logits_to_keep=1)
                if after_reread is not None:
                    after_reread()
        else:
            out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, logits_to_keep=1)
        cache = _cache_out(out)
        logits = out.logits[:, -1, :]
        next_pos = position[:, -1:] + 1
        phase.phase = "decode"
        for _ in range(sampling.max_new_tokens):
            if cancel is not None and cancel.is_set():
                return
            logp = logits.float().log_softmax(-1)
            tokens = pick_tokens(logits, sampling, generators).to(device)
            tok_logp = logp.gather(-1, tokens[:, None]).squeeze(-1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            kwargs = {cache_arg: cache}
            if record:
                with ResidualRecorder(layout) as rec:
                    out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos,
                                use_cache=True, **kwargs)
                hidden = rec.states()[:, -1]  # (B, L+1, d)
            else:
                out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                            **kwargs)
                hidden = None
            cache = _cache_out(out)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
            yield DecodeStep(tokens=tokens, logprobs=tok_logp, next_logits=logits, hidden=hidden)


def generate_stream(loaded: LoadedModel, prompt: str | list[int], sampling: Sampling | None = None,
                    packed: PackedDictionary | None = None, cancel: threading.Event | None = None,
                    chat: bool = False, include_prompt: bool = True, phase: PhaseFlag | None = None,
                    rules=None) -> Iterator[TokenEvent]:
    """Generate token by token; yield a TokenEvent per prompt token (if asked) and per new token.

    Interventions, if any, are applied by the caller around this generator
    (see `perturb.intervene`), so streaming and perturbation share the loop.
    `rules` (an `engine.rules.RuleProgram` over `packed`) watches every generated token: its firings ride
    on the token's event, a `stop` ends the stream with finished "rule", and an intervention fired at
    token t edits the states from token t+1 on (its hooks are installed for the stream's duration).
    """
    sampling = sampling or Sampling()
    if rules is not None:
        if packed is None:
            from chunktui.shared.errors import ChunkError

            raise ChunkError("Rules need a dictionary: load one first.")
        rules.reset(1)
        if phase is None:
            phase = rules.phase  # `now` rules read it: the prompt, or generated tokens
        else:
            rules.phase = phase
    tok = loaded.tokenizer
    ids = encode_prompt(loaded, prompt, chat) if isinstance(prompt, str) else list(prompt)
    start = time.perf_counter()
    prefill: list = []
    prompt_firings: list = []
    watch = None
    if rules is not None and rules.watches_prompt:
        def watch(states):  # the prompt's states, before the first answer token is sampled
            pieces = [tok.decode([i]) for i in ids]
            found, reread = rules.observe_prompt(packed.match(states[0]).hit[None], [len(ids)], [pieces])
            prompt_firings.extend(found[0])
            if not reread:
                rules.end_prompt()
            return reread
    steps = decode(loaded, [ids], sampling, record=True, cancel=cancel, phase=phase, prefill_states=prefill,
                   on_prefill=watch, after_reread=rules.end_prompt if rules is not None else None)
    stops = eos_ids(loaded) if sampling.stop_at_eos else set()
    detok = Detokenizer(tok)
    hooks = rules.installed() if rules is not None else contextlib.nullcontext()
    hooks.__enter__()
    try:
        first = next(steps, None)
        if include_prompt and prefill:
            states, logits = prefill  # (1, T, L+1, d), (1, T, V)
            matches = packed.match(states[0]) if packed is not None else None
            logp = logits[0].float().log_softmax(-1)
            probs = logits[0].float().softmax(-1)
            for t, token_id in enumerate(ids):
                yield TokenEvent(index=t, token_id=token_id, text=detok.add(token_id), hidden=states[0, t],
                                 top=_top(tok, probs[t]),
                                 logprob=float(logp[t - 1, token_id]) if t > 0 else None,
                                 matches=matches[t:t + 1] if matches is not None else None, generated=False,
                                 elapsed=time.perf_counter() - start,
                                 firings=[f for f in prompt_firings if f.token == t])
        else:
            for token_id in ids:
                detok.add(token_id)
        prompt_len = len(detok.text)
        longest_stop = max((len(x) for x in sampling.stop_strings), default=0)
        index = len(ids)
        step = first
        produced = 0
        while step is not None:
            token_id = int(step.tokens[0])
            piece = detok.add(token_id)
            produced += 1
            finished = None
            if token_id in stops:
                finished = "eos"
            elif longest_stop and any(x in detok.text[max(prompt_len, len(detok.text) - len(piece) - longest_stop):]
                                      for x in sampling.stop_strings):  # only the tail can hold a new stop
                finished = "stop"
            elif produced >= sampling.max_new_tokens:
                finished = "length"
            matches = packed.match(step.hidden[0:1]) if packed is not None else None
            probs = step.next_logits[0].float().softmax(-1)
            event = TokenEvent(index=index, token_id=token_id, text=piece, hidden=step.hidden[0],
                               top=_top(tok, probs), logprob=float(step.logprobs[0]), matches=matches,
                               generated=True, elapsed=time.perf_counter() - start)
            if rules is not None:  # one device->host copy for all rules; interventions switch for the next token
                event.firings = rules.observe(matches.hit[None], [[index]], [[piece]])[0]
                if rules.stopped[0] and finished in (None, "length"):
                    finished = "rule"
            index += 1
            if finished is None and cancel is not None and cancel.is_set():
                finished = "cancelled"
            if finished:
                event.finished = finished
                yield event
                return
            yield event
            step = next(steps, None)
    finally:
        steps.close()
        hooks.__exit__(None, None, None)


@dataclass
class ScanResult:
    """A teacher-forced pass over a text: every token's states and matches at once."""

    ids: list[int]
    texts: list[str]
    hidden: torch.Tensor  # (T, L+1, d) on CPU
    matches: MatchResult | None  # on CPU
    logprobs: list[float | None] = field(default_factory=list)


@torch.no_grad()
def scan_text(loaded: LoadedModel, text: str | list[int], packed: PackedDictionary | None = None,
              add_bos: bool = True) -> ScanResult:
    """Teacher-forced scan: one forward pass over the whole text, all layers recorded."""
    tok = loaded.tokenizer
    if isinstance(text, str):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if add_bos and tok.bos_token_id is not None:
            ids = [tok.bos_token_id] + ids
    else:
        ids = list(text)
    from chunktui.shared.errors import CorpusError

    if not ids:
        raise CorpusError("Nothing to scan: the text is empty.")
    limit = loaded.context_length
    if len(ids) > limit:
        raise CorpusError(f"The text is {len(ids)} tokens; one scan reads at most {limit} (the model's context). "
                          "Split it into parts, or use `chunktui evaluate`, which reads a corpus sentence by sentence.")
    ensure_fits(loaded, "scanning", len(ids), full_logits=True, cached=False)
    with out_of_memory("scanning", loaded.device):
        with ResidualRecorder(loaded.layout) as rec:
            out = loaded.model(input_ids=torch.tensor([ids], device=loaded.device), use_cache=False)
        states = rec.states()[0]
    matches = packed.match(states).to("cpu") if packed is not None else None
    logp = out.logits[0].float().log_softmax(-1)
    logprobs = [None] + [float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]
    detok = Detokenizer(tok)
    texts = [detok.add(i) for i in ids]
    return ScanResult(ids=ids, texts=texts, hidden=states.to("cpu", torch.float32), matches=matches, logprobs=logprobs)
