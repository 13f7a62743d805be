"""Context length everywhere: long corpus contexts are windowed, prompts that cannot hold their answer are refused."""

from __future__ import annotations

import pytest

from chunktui.engine.context import ContextError, check_fits, context_problem, fit_prompt
from chunktui.engine.corpus import collect


def test_models_know_their_context(tiny_model):
    assert tiny_model.context_length == 512  # random:llama-tiny's max_position_embeddings


@pytest.mark.parametrize("spec", ["random:llama-tiny", "random:gpt2-tiny"])
def test_a_sentence_longer_than_the_context_is_read_in_windows(spec):
    from chunktui.engine.models import load_model

    loaded = tiny = load_model(spec, device="cpu")
    words = " ".join(f"w{i % 50}" for i in range(900))
    text = f"Short one. {words}."
    hs = collect(loaded, text, layers=[0, tiny.n_layers])
    n_tokens = sum(len(loaded.tokenizer(text[a:b], add_special_tokens=False)["input_ids"])
                   for a, b in [(0, 10), (11, len(text))])
    assert len(hs.tokens) == n_tokens == hs.H.shape[0]  # every token once: no repeats from overlapping windows
    assert hs.tokens.starts == sorted(hs.tokens.starts)
    assert hs.windowed_contexts == 1 and "overlapping windows" in hs.windowing_note()
    assert hs.H.isfinite().all()


def test_fits_and_refusals(tiny_model):
    assert context_problem(tiny_model, 100, 400) is None
    check_fits(tiny_model, 500, 12)
    with pytest.raises(ContextError, match="at most 12 new tokens"):
        check_fits(tiny_model, 500, 13)
    with pytest.raises(ContextError, match="no room to generate"):
        check_fits(tiny_model, 512, 1)


def test_fit_prompt_refuses_or_cuts_from_the_start(tiny_model):
    prompt = " ".join(["cheese"] * 600) + " the end"
    with pytest.raises(ContextError, match="--truncate"):
        fit_prompt(tiny_model, prompt, 20)
    fitted = fit_prompt(tiny_model, prompt, 20, truncate=True)
    assert len(fitted.ids) + 20 <= 512 and fitted.dropped_tokens > 0
    assert fitted.text.endswith("the end") and "cut" in fitted.note()
    short = fit_prompt(tiny_model, "hello", 20)
    assert short.text == "hello" and short.dropped_tokens == 0 and short.note() is None
    with pytest.raises(ContextError, match="cannot fit"):
        fit_prompt(tiny_model, "hello", 600, truncate=True)
