"""The built-in model runs chunktui's LLaMA forward (engine.lean), and it equals transformers' on it."""

from __future__ import annotations

import torch


def test_the_builtin_model_runs_the_lean_forward(smol):
    assert smol.model_code == "chunktui-llama" and smol.card()["model_code"] == "chunktui-llama"
    assert type(smol.model).__module__ == "chunktui.engine.lean"


def test_greedy_generation_states_and_logits_equal_transformers(smol, transformers_smol):
    """A chat prompt, prefill with every layer's state recorded, then 6 greedy steps on the cache: the tokens,
    every hidden state and every logit are the same, bit for bit, as transformers' forward gives."""
    from chunktui.engine.hooks import ResidualRecorder
    from chunktui.engine.layout import find_layout
    from chunktui.engine.tokens import encode_prompt

    ids = torch.tensor([encode_prompt(smol, "What do you like to eat with bread?", True)])
    runs = []
    for model in (smol.model, transformers_smol):
        out, cache, token, seen = [], None, ids, []
        with torch.no_grad():
            for _ in range(7):
                kwargs = {"cache": cache} if cache is not None else {}
                with ResidualRecorder(find_layout(model)) as rec:
                    step = model(input_ids=token, use_cache=True, **kwargs)
                out += [rec.states(), step.logits]
                cache, token = step.cache, step.logits[:, -1:].argmax(-1)
                seen.append(int(token))
        runs.append((out, seen))
    (a, tokens_a), (b, tokens_b) = runs
    assert tokens_a == tokens_b
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"output {i} differs by {(x - y).abs().max().item():.3g}"
