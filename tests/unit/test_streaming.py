"""Streaming generation: states equal a full forward pass, runs repeat, cancel is prompt."""

import threading

import pytest

import torch

from chunktui.engine.hooks import ResidualRecorder
from chunktui.engine.matching import pack
from chunktui.engine.streaming import generate_stream, scan_text
from chunktui.shared.settings import Sampling
from chunktui.engine.tokens import encode_prompt


def test_streamed_states_equal_full_forward(tiny_model):
    events = list(generate_stream(tiny_model, "The cheese", Sampling(max_new_tokens=12, stop_at_eos=False)))
    ids = [e.token_id for e in events]
    with ResidualRecorder(tiny_model.layout) as rec:
        out = tiny_model.model(input_ids=torch.tensor([ids]))
    full = rec.states()[0]
    streamed = torch.stack([e.hidden for e in events])
    assert streamed.shape == full.shape
    assert torch.allclose(streamed, full, atol=1e-5)
    # greedy: each generated token is the argmax of the full pass's logits one step earlier
    n_prompt = sum(not e.generated for e in events)
    for t in range(n_prompt, len(ids)):
        assert ids[t] == int(out.logits[0, t - 1].argmax())
    assert events[-1].finished == "length"
    assert sum(e.generated for e in events) == 12


def test_sampling_is_repeatable_with_a_seed(tiny_model):
    s = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=5, stop_at_eos=False)
    a = [e.token_id for e in generate_stream(tiny_model, "I like", s)]
    b = [e.token_id for e in generate_stream(tiny_model, "I like", s)]
    c = [e.token_id for e in generate_stream(tiny_model, "I like", Sampling(**{**s.__dict__, "seed": 6}))]
    assert a == b
    assert a != c


def test_cancel_stops_within_one_token(tiny_model):
    cancel = threading.Event()
    got = []
    for e in generate_stream(tiny_model, "I like", Sampling(max_new_tokens=50, stop_at_eos=False), cancel=cancel):
        if e.generated:
            got.append(e)
            if len(got) == 3:
                cancel.set()
    # the token in flight when cancel was set may still arrive, nothing after it
    assert 3 <= len(got) <= 4
    assert got[-1].finished in (None, "cancelled")


def test_stop_strings(tiny_model):
    events = [e for e in generate_stream(tiny_model, "The", Sampling(max_new_tokens=40, stop_at_eos=False)) if e.generated]
    text = "".join(e.text for e in events)
    stop = text[5:7]
    stopped = [e for e in generate_stream(tiny_model, "The", Sampling(max_new_tokens=40, stop_at_eos=False,
                                                                      stop_strings=(stop,))) if e.generated]
    assert stopped[-1].finished == "stop"
    assert len(stopped) < len(events)
    assert stop in "".join(e.text for e in stopped)


def test_chat_template_is_applied(tiny_model):
    ids = encode_prompt(tiny_model, "hello", chat=True)
    text = tiny_model.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>user\nhello<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    plain = tiny_model.tokenizer.decode(encode_prompt(tiny_model, "hello", chat=False))
    assert "<|im_start|>" not in plain


def test_matches_arrive_with_each_token(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    packed = pack(dictionary.chunks, tiny_model.hidden_size, tiny_model.layout.n_states)
    text = "The dog ate the cheese in the garden."
    scan = scan_text(tiny_model, text, packed)
    events = list(generate_stream(tiny_model, text, Sampling(max_new_tokens=1), packed=packed))
    prompt_events = [e for e in events if not e.generated]
    assert [e.token_id for e in prompt_events] == scan.ids
    for t, e in enumerate(prompt_events):
        assert torch.equal(e.matches.hit[0], scan.matches.hit[t])
    # the concept words are found in the scan
    labels = [packed.chunks[int(c)].label if c >= 0 else None for c in scan.matches.token_chunk]
    words = {scan.texts[t].strip(): labels[t] for t in range(len(labels))}
    assert words["cheese"] == "cheese" and words["dog"] == "dog"


@pytest.mark.parametrize("spec", ["random:llama-tiny", "random:gpt2-tiny"])
def test_incremental_detokenisation_equals_decoding_the_whole_text(spec):
    from chunktui.engine.models import load_model
    from chunktui.engine.tokens import Detokenizer as _Detokenizer

    tok = load_model(spec, device="cpu").tokenizer
    text = "Héllo wörld! 🧀 cheese-cake\n\n  spaced  out… The dog ate 中文 cheese.\tTab"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for seq in (ids, [tok.eos_token_id] + ids + [tok.eos_token_id]):
        detok = _Detokenizer(tok)
        pieces = [detok.add(i) for i in seq]
        assert detok._stream is not None  # the constant-time DecodeStream path
        assert "".join(pieces) == detok.text == tok.decode(seq, skip_special_tokens=False)

    class Slow:  # a tokenizer without a fast backend: the windowed fallback
        def __init__(self, inner):
            self.decode = inner.decode

    detok = _Detokenizer(Slow(tok))
    assert "".join(detok.add(i) for i in ids) == tok.decode(ids, skip_special_tokens=False)
