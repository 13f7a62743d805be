"""The paper's question experiment: prompt slices, the attention site, the chunk-layer shift, the protocol's
settings and its confounds (docs/method.md section 3.4)."""

import json
import re

import pytest
import torch
from click.testing import CliRunner

from chunktui.engine.hooks import ResidualRecorder
from chunktui.engine.perturb import Intervention, compare, intervene, prefill_mask, select_chunks
from chunktui.engine.streaming import PhaseFlag
from chunktui.shared.errors import ChunkError, UnsupportedArchitectureError
from chunktui.shared.settings import (CONFOUND_LABEL, Positions, Sampling, protocol_lines, protocol_settings,
                                      resolve_protocol)

IDS = [0, 290, 279, 262, 350, 94, 33, 120]


# ----------------------------------------------------------------------------------------------- positions


@pytest.mark.parametrize("spec, start, stop", [("prompt[-4:-1]", -4, -1), ("prompt[:2]", None, 2),
                                               ("prompt[1:]", 1, None), ("prompt[ -3 : ]", -3, None),
                                               ("prompt[:]", None, None)])
def test_prompt_slices_follow_python_slice_semantics(spec, start, stop):
    where = Positions.parse(spec)
    assert (where.start, where.stop) == (start, stop)
    assert Positions.parse(str(where)) == where  # one canonical spelling, parsed back the same
    for n in range(0, 9):
        assert where.prompt_indices(n) == list(range(n))[start:stop]


def test_other_position_forms_still_parse_and_bad_ones_say_what_to_write():
    assert Positions.parse("prompt-last:4").prompt_indices(6) == [2, 3, 4, 5]
    assert Positions.parse("prompt").prompt_indices(3) == [0, 1, 2]
    assert Positions.parse("generated").prompt_indices(3) == []
    assert str(Positions.parse("prompt[-4:-1]")) == "prompt[-4:-1]"
    assert Positions.parse("prompt[-4:-1]").meaning().startswith("the 3 prompt tokens before the last")
    for bad in ("prompt[1:2:3]", "prompt[a:b]", "prompt[-4]", "prompts[1:2]", "prompt-last:0"):
        with pytest.raises(ChunkError, match=r"prompt\[START:STOP\]"):
            Positions.parse(bad)


def test_prefill_mask_takes_the_slice_of_each_left_padded_prompt():
    where = prefill_mask(Positions.parse("prompt[-4:-1]"), 3, 6, [2, 6, 4])
    assert where.tolist() == [
        [False, False, False, False, True, False],  # 2 tokens: range(2)[-4:-1] = [0]
        [False, False, True, True, True, False],  # 6 tokens: 2, 3, 4
        [False, False, True, True, True, False],  # 4 tokens (2 padding): 0, 1, 2 -> columns 2, 3, 4
    ]
    assert not prefill_mask(Positions.parse("prompt"), 1, 5, [3])[0, :2].any()  # padding is never edited


def _states(model, ids, intervention=None, extra_hooks=()):
    phase = PhaseFlag()
    with intervene(model, intervention, phase):
        with ResidualRecorder(model.layout) as rec:
            out = model.model(input_ids=torch.tensor([ids]))
    return rec.states()[0], out.logits[0]


def test_slice_edit_equals_the_paper_codes_hook(tiny_model, tiny_dict):
    """prompt[-4:-1] graft x1 at block 2 is what the notebook's hook does: input[:, -4:-1, M] = template."""
    dictionary, _ = tiny_dict
    chunk = dictionary.select(["cheese"], layers=[2])[0]
    M, template = chunk.subpopulation.long(), chunk.template

    def papers_hook(module, args):
        h = args[0].clone()
        h[:, -4:-1, M] = template.to(h.dtype)
        return (h,) + tuple(args[1:])

    handle = tiny_model.layout.blocks[2].register_forward_pre_hook(papers_hook)
    try:
        expected = tiny_model.model(input_ids=torch.tensor([IDS])).logits[0]
    finally:
        handle.remove()
    states, logits = _states(tiny_model, IDS, Intervention([chunk], "graft", 1.0, Positions.parse("prompt[-4:-1]")))
    assert torch.allclose(logits, expected, atol=1e-5)
    base, _ = _states(tiny_model, IDS)
    assert torch.allclose(states[-4:-1, 2][:, M], template.expand(3, -1), atol=1e-6)
    assert torch.equal(states[-1, 2], base[-1, 2]) and torch.equal(states[:-4, 2], base[:-4, 2])


# ------------------------------------------------------------------------------------------ attention site


def test_attention_site_edits_what_attention_reads_and_leaves_the_residual_stream(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunk = dictionary.select(["cheese"], layers=[2])[0]
    M, template = chunk.subpopulation.long(), chunk.template
    layout = tiny_model.layout
    block = layout.blocks[2]
    assert layout.attention_norm(2) is block.input_layernorm
    seen = {}

    def attention_input(module, args, kwargs):
        seen["attn"] = (args[0] if args else kwargs["hidden_states"]).detach().clone()

    handle = block.self_attn.register_forward_pre_hook(attention_input, with_kwargs=True)
    try:
        base, base_logits = _states(tiny_model, IDS)
        base_attn = seen["attn"]
        iv = Intervention([chunk], "graft", 1.0, Positions("prompt"), site="attention")
        states, logits = _states(tiny_model, IDS, iv)
    finally:
        handle.remove()
    # the residual stream entering the hooked block is unchanged ...
    assert torch.equal(states[:, 2], base[:, 2])
    assert torch.equal(states[:, :3], base[:, :3])
    # ... while its attention reads the norm of the grafted values
    grafted = base[:, 2].clone()
    grafted[:, M] = template
    with torch.no_grad():
        expected = block.input_layernorm(grafted[None])[0]
    assert torch.allclose(seen["attn"][0], expected, atol=1e-5)
    assert not torch.allclose(seen["attn"], base_attn)
    # and only through attention does it reach the next block and the output
    assert not torch.allclose(states[:, 3], base[:, 3])
    residual, _ = _states(tiny_model, IDS, Intervention([chunk], "graft", 1.0, Positions("prompt")))
    assert not torch.allclose(residual[:, 3], states[:, 3])
    assert not torch.allclose(logits, base_logits)


def test_attention_site_leaves_no_hook_behind(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    chunks = select_chunks(dictionary, ["dog"], [1, 2])
    norms = [tiny_model.layout.attention_norm(l) for l in (1, 2)]
    with pytest.raises(RuntimeError):
        with intervene(tiny_model, Intervention(chunks, "freeze", 1.0, site="attention"), PhaseFlag()):
            assert all(len(n._forward_pre_hooks) == 1 for n in norms)
            raise RuntimeError("boom")
    assert all(len(n._forward_pre_hooks) == 0 for n in norms)


@pytest.mark.parametrize("spec, name", [("random:gpt2-tiny", "ln_1"), ("random:neox-tiny", "input_layernorm")])
def test_the_layout_finds_the_attention_norm_of_other_families(spec, name):
    from chunktui.engine.models import load_model

    loaded = load_model(spec, device="cpu")
    for l in range(loaded.layout.n_layers):
        assert loaded.layout.attention_norm(l) is getattr(loaded.layout.blocks[l], name)


def test_unknown_attention_norm_is_a_clear_error(tiny_model):
    from torch import nn

    from chunktui.engine.layout import ModelLayout

    layout = ModelLayout(blocks=nn.ModuleList([nn.Linear(2, 2)]), final_norm=nn.LayerNorm(2), n_layers=1,
                         hidden_size=2, architecture="odd")
    with pytest.raises(UnsupportedArchitectureError, match="--site residual"):
        layout.attention_norm(0)
    with pytest.raises(ChunkError, match="Bad site"):
        Intervention(tiny_model and [object()], site="mlp")


# ---------------------------------------------------------------------------------- the paper's confounds


def test_chunk_layer_shift_writes_the_chunk_of_the_layer_below(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    below = dictionary.select(["cheese"], layers=[1])[0]
    iv = Intervention([below], "graft", 1.0, Positions("prompt"), chunk_layer_shift=1)
    assert iv.layers == [2]
    assert iv.describe()["chunk_layers"] == [1] and iv.describe()["layers"] == [2]
    states, _ = _states(tiny_model, IDS, iv)
    base, _ = _states(tiny_model, IDS)
    assert torch.equal(states[:, :2], base[:, :2])  # block 1 untouched
    assert torch.allclose(states[:, 2][:, below.subpopulation.long()], below.template.expand(len(IDS), -1), atol=1e-6)


def test_compare_records_confounded_sampling_and_prompt_scoring(tiny_model, tiny_dict):
    dictionary, _ = tiny_dict
    iv = Intervention(select_chunks(dictionary, ["cheese"], [1]), "graft", 0.0)  # a no-op edit
    sampling = Sampling(max_new_tokens=6, temperature=1.0, top_p=0.9, seed=3)
    plain = compare(tiny_model, iv, ["I like cheese"], samples=2, sampling=sampling, chat=False)
    assert plain.settings["identical_sampling_both_arms"] and not plain.settings["scoring_includes_prompt"]
    scored = compare(tiny_model, iv, ["I like cheese"], samples=2, sampling=sampling, chat=False,
                     control_sampling=Sampling(max_new_tokens=6, temperature=1.0, top_p=0.5, seed=3),
                     score_prompt=True)
    assert not scored.settings["identical_sampling_both_arms"]
    assert scored.settings["control_sampling"]["top_p"] == 0.5 and scored.settings["scoring_includes_prompt"]
    # the prompt holds the word: scored on prompt + continuation, every row counts
    assert scored.concepts["cheese"]["control_rate"] == 1.0 == scored.concepts["cheese"]["perturbed_rate"]


def test_paper_protocol_settings_and_overrides():
    s = resolve_protocol("paper", False, "graft", {})
    assert (s["site"], s["layers"], s["positions"], s["strength"]) == ("residual", "2-9", "prompt[-4:-1]", 1.0)
    assert s["top_p"] == 0.9 and s["control_top_p"] is None and s["chunk_layer_shift"] == 0
    assert not s["score_prompt"] and not s["paper_confounds"] and s["overridden"] == []
    assert resolve_protocol("paper", False, "freeze", {})["strength"] == 1.0
    assert resolve_protocol("paper", False, "suppress", {})["strength"] == 0.5  # not fixed by the protocol
    c = resolve_protocol("paper", True, "graft", {})
    assert (c["chunk_layer_shift"], c["control_top_p"], c["score_prompt"]) == (1, 0.5, True)
    assert c["label"] == CONFOUND_LABEL and protocol_lines(c)[0] == CONFOUND_LABEL
    assert resolve_protocol(None, True, "graft", {})["protocol"] == "paper"  # confounds imply the protocol
    o = resolve_protocol("paper", False, "graft", {"positions": "prompt", "strength": 0.5, "layers": "2-9"})
    assert (o["positions"], o["strength"]) == ("prompt", 0.5) and o["overridden"] == ["positions", "strength"]
    d = resolve_protocol("default", False, "graft", {})
    assert (d["positions"], d["strength"], d["chat"]) == ("prompt", 0.05, True) and protocol_settings(None) == {}
    with pytest.raises(ChunkError, match="Unknown protocol"):
        protocol_settings("nature")


def test_cli_paper_protocol_json_states_every_setting(tmp_path, tiny_dict):
    from chunktui.cli import main

    _, path = tiny_dict
    out = tmp_path / "p.json"
    r = CliRunner().invoke(main, ["perturb", "--model", "random:llama-tiny", "--dict", str(path), "--chunk", "cheese",
                                  "--protocol", "paper", "--paper-confounds", "--layers", "2", "--prompt",
                                  "I like the dog", "--max-new-tokens", "4", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert "PAPER CONFOUNDS ON" in r.output and "prompt[-4:-1]" in r.output
    rep = json.loads(out.read_text())
    assert rep["intervention"]["site"] == "residual" and rep["intervention"]["positions"] == "prompt[-4:-1]"
    assert rep["intervention"]["strength"] == 1.0 and rep["intervention"]["layers"] == [2]
    assert rep["intervention"]["chunk_layers"] == [1]
    p = rep["protocol"]
    assert p["protocol"] == "paper" and p["paper_confounds"] and p["overridden"] == ["layers", "max_new_tokens"]
    assert rep["settings"]["control_sampling"]["top_p"] == 0.5 and rep["settings"]["top_p"] == 0.9
    assert rep["settings"]["chat"] is False
    r = CliRunner().invoke(main, ["perturb", "--model", "random:llama-tiny", "--dict", str(path), "--chunk", "cheese",
                                  "--site", "attention", "--positions", "prompt[1:", "--prompt", "x"])
    assert r.exit_code == 2 and "prompt[START:STOP]" in r.output


# ------------------------------------------------------------------------------ what changed, layer by layer


@pytest.mark.parametrize("positions", ["all", "prompt[-3:-1]", "generated"])
def test_replayed_states_are_the_states_of_the_run(tiny_model, tiny_dict, positions):
    """The states layer_match_diff matches are those the perturbed run computed, edits included."""
    from chunktui.engine.perturb import replay_states
    from chunktui.engine.streaming import decode

    dictionary, _ = tiny_dict
    iv = Intervention(select_chunks(dictionary, ["cheese"], [1, 2]), "graft", 1.0, Positions.parse(positions))
    prompt = [0, 290, 279, 262, 350]
    phase = PhaseFlag()
    steps, tokens = [], []
    with intervene(tiny_model, iv, phase, prompt_lengths=[len(prompt)]):
        for step in decode(tiny_model, [prompt], Sampling(max_new_tokens=5, temperature=1.0, seed=2), record=True,
                           phase=phase):
            steps.append(step.hidden[0])
            tokens.append(int(step.tokens[0]))
    # step k's states are those of token k-1 fed back in; the last token is never fed
    replayed = replay_states(tiny_model, prompt, tokens[:-1], iv)
    assert torch.allclose(replayed, torch.stack(steps[:-1]).float(), atol=1e-4)
    plain = replay_states(tiny_model, prompt, tokens[:-1], None)
    assert not torch.allclose(plain, replayed, atol=1e-4)


def test_layer_match_diff_marks_divergence_and_differences(tiny_model, tiny_dict):
    from chunktui.engine.perturb import Continuation, layer_match_diff

    dictionary, _ = tiny_dict
    prompt = [0, 290, 279, 262, 350]
    iv = Intervention(select_chunks(dictionary, ["cheese"], [1, 2]), "graft", 1.0, Positions("all"))
    same = Continuation("p", 0, [350, 94, 33], "")
    other = Continuation("p", 0, [350, 94, 120, 7], "")
    diff = layer_match_diff(tiny_model, dictionary, iv, prompt, same, other)
    assert diff["diverged_at"] == 2
    assert [t["aligned"] for t in diff["tokens"]] == [True, True, False]
    graft_hits = 0
    for t in diff["tokens"]:
        for layer, d in t["layers"].items():
            assert set(d["appeared"]) == set(d["perturbed"]) - set(d["control"])
            assert set(d["disappeared"]) == set(d["control"]) - set(d["perturbed"])
            assert all(c.endswith(f"@{layer}") for c in d["control"] + d["perturbed"])
            graft_hits += f"cheese@{layer}" in d["perturbed"] and layer in ("1", "2")
    assert graft_hits == 6  # grafted to the template at every token: cheese matches at both edited layers
    noop = Intervention(select_chunks(dictionary, ["cheese"], [1]), "graft", 0.0, Positions("all"))
    quiet = layer_match_diff(tiny_model, dictionary, noop, prompt, same, same)
    assert quiet["diverged_at"] is None
    assert all(not d["appeared"] and not d["disappeared"] for t in quiet["tokens"] for d in t["layers"].values())


def test_reports_carry_the_site_the_confound_label_and_the_layer_diff():
    from chunktui.shared.reports import render, render_markdown

    pair = {"prompt": "Q?", "seed": 0, "control": "A dog", "perturbed": "A cheese",
            "diff": [{"op": "equal", "control": "A", "perturbed": "A"},
                     {"op": "replace", "control": " dog", "perturbed": " cheese"}],
            "layer_diff": {"diverged_at": 1, "tokens": [
                {"index": 0, "control": "A", "perturbed": "A", "aligned": True,
                 "layers": {"3": {"control": ["dog@3"], "perturbed": ["cheese@3"], "appeared": ["cheese@3"],
                                  "disappeared": ["dog@3"]}}},
                {"index": 1, "control": " dog", "perturbed": " cheese", "aligned": False, "layers": {}}]}}
    run = {"intervention": {"mode": "graft", "strength": 1.0, "positions": "prompt[-4:-1]", "layers": [2, 3],
                            "site": "attention", "labels": ["cheese"], "chunks": ["cheese@1", "cheese@2"]},
           "protocol": resolve_protocol("paper", True, "graft", {"site": "attention"}),
           "concepts": {"cheese": {"control_rate": 0.0, "perturbed_rate": 1.0, "delta_rate": 1.0,
                                   "logprob_control": -5.0, "logprob_perturbed": -1.0, "delta_logprob": 4.0}},
           "settings": {}, "pairs": [pair]}
    session = {"format": "chunktui-session", "version": 1, "traces": [], "runs": [run]}
    md = render_markdown(session)
    md = re.sub(r"\\(.)", r"\1", md)  # as read: the backslash escapes of shared.reports.md_text removed
    assert "attention site" in md and "WITH THE PAPER CODE'S CONFOUNDS" in md and CONFOUND_LABEL in md
    assert "diverge at generated token 1" in md and "token 0 'A': L3 +cheese@3 -dog@3" in md
    html = render(session, "html")
    assert "+cheese@3 -dog@3" in html and "PAPER CONFOUNDS ON" in html


def test_question_categories_are_complete_and_hold_no_concept_word():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "sample_data/tools/check_categories.py")], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stdout
    assert all(f"{cls:<14}" in done.stdout for cls in ("abbreviation", "description", "entity", "human",
                                                        "location", "numeric"))
