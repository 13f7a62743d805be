"""Rules in the decode loop (chunktui/engine/rules.py) on the tiny random model."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from chunktui.api import Engine
from chunktui.engine.rules import RuleProgram
from chunktui.shared.errors import ChunkError
from chunktui.shared.rules import And, Not, Or, RuleError, Run, Term

RULES = [
    "a: when cheese -> alert",
    "b: when cheese@1-2>=2 -> alert",
    "c: when cake and not dog -> alert",
    "d: when (cheese or rain@3) for 3 -> alert",
    "e: when not (cake@0,4 for 2) or dog>=3 -> alert",
]


def _reference(rule, hits_by_layer, t, history):
    """Plain Python: does `rule` hold at token t? hits_by_layer[t][label] = set of layers with a hitting chunk."""
    def holds(node, t):
        if isinstance(node, Term):
            layers = hits_by_layer[t].get(node.label, set())
            if node.layers is not None:
                layers = layers & set(node.layers)
            return len(layers) >= node.at_least
        if isinstance(node, Not):
            return not holds(node.node, t)
        if isinstance(node, And):
            return all(holds(n, t) for n in node.nodes)
        if isinstance(node, Or):
            return any(holds(n, t) for n in node.nodes)
        assert isinstance(node, Run)
        return t + 1 >= node.n and all(holds(node.node, u) for u in range(t - node.n + 1, t + 1))
    return holds(rule.condition, t)


def _matched_layers(node, hits_by_layer, t):
    if isinstance(node, Term):
        layers = hits_by_layer[t].get(node.label, set())
        if node.layers is not None:
            layers = layers & set(node.layers)
        return layers if len(layers) >= node.at_least else set()
    return None  # checked only for single terms


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_dict):
    return Engine.from_loaded(tiny_model, tiny_dict[0])


def test_evaluation_matches_a_plain_python_reference(engine):
    program = RuleProgram(RULES, engine.packed, engine.n_states)
    chunks = engine.packed.chunks
    rng = random.Random(0)
    B, T, C = 3, 14, len(chunks)
    hit = torch.tensor([[[rng.random() < 0.3 for _ in range(C)] for _ in range(T)] for _ in range(B)])
    program.reset(B)
    fired, layers = program.evaluate(hit)
    # the same tokens one at a time (as the decode loop feeds them): run lengths carry over
    program.reset(B)
    steps = [program.evaluate(hit[:, t:t + 1]) for t in range(T)]
    assert torch.equal(torch.cat([f for f, _ in steps], dim=1), fired)
    assert torch.equal(torch.cat([lay for _, lay in steps], dim=1), layers)
    for b in range(B):
        hits_by_layer = []
        for t in range(T):
            seen: dict[str, set[int]] = {}
            for c in hit[b, t].nonzero().flatten().tolist():
                seen.setdefault(chunks[c].label, set()).add(int(chunks[c].layer))
            hits_by_layer.append(seen)
        for r, rule in enumerate(program.rules):
            want = [_reference(rule, hits_by_layer, t, None) for t in range(T)]
            assert fired[b, :, r].tolist() == want, rule.name
        for t in range(T):  # rule a is one term: its matched layers are exactly the cheese layers that hit
            got = {program.layer_axis[s] for s in layers[b, t, 0].nonzero().flatten().tolist()}
            assert got == _matched_layers(program.rules[0].condition, hits_by_layer, t)
    assert fired.any() and not fired.all()  # the random hits exercise both outcomes


def test_text_starts_reset_run_lengths(engine):
    program = RuleProgram(["when cheese for 2 -> alert"], engine.packed, engine.n_states)
    cheese = torch.tensor([c.label == "cheese" for c in engine.packed.chunks])
    hit = cheese.expand(1, 4, -1).clone()  # cheese at every token
    starts = torch.tensor([[True, False, True, False]])
    program.reset(1)
    fired, _ = program.evaluate(hit, starts)
    assert fired[0, :, 0].tolist() == [False, True, False, True]


def test_rules_are_checked_against_the_dictionary(engine):
    with pytest.raises(RuleError, match="nearest: cheese"):
        RuleProgram(["when chese -> stop"], engine.packed, engine.n_states)
    with pytest.raises(RuleError, match="out of range"):
        RuleProgram(["when cheese@9 -> stop"], engine.packed, engine.n_states)
    with pytest.raises(RuleError, match="blocks 0-3"):
        engine.rules(["when cheese -> suppress cheese@4"])


def _loose(dictionary, engine, label, prompt):
    """A copy of the dictionary whose `label` chunks hit about half the generated tokens of `prompt`."""
    evs = [e for e in engine.stream(prompt, max_new_tokens=16, chat=False) if e.generated]
    values = torch.cat([e.matches.value for e in evs])  # (T, C)
    loose = copy.deepcopy(dictionary)
    for chunk in loose.chunks:
        if chunk.label == label and chunk.kind == "pa":
            c = next(i for i, p in enumerate(engine.packed.chunks) if p.id == chunk.id)
            chunk.threshold = float(values[:, c].median())
    return loose


PROMPT = "The dog ate the cheese"


def test_stop_ends_the_stream_where_the_unguarded_run_first_matches(engine, tiny_model, tiny_dict):
    loose = Engine.from_loaded(tiny_model, _loose(tiny_dict[0], engine, "cheese", PROMPT))
    plain = [e for e in loose.stream(PROMPT, max_new_tokens=16, chat=False) if e.generated]
    cheese = torch.tensor([c.label == "cheese" for c in loose.packed.chunks])
    first = next(i for i, e in enumerate(plain) if (e.matches.hit[0] & cheese).any())
    guarded = [e for e in loose.stream(PROMPT, max_new_tokens=16, chat=False, rules=["when cheese -> stop"])
               if e.generated]
    assert len(guarded) == first + 1
    assert [e.token_id for e in guarded] == [e.token_id for e in plain[:first + 1]]
    assert guarded[-1].finished == "rule"
    (firing,) = guarded[-1].firings
    want = sorted({int(c.layer) for c, h in zip(loose.packed.chunks, plain[first].matches.hit[0].tolist())
                   if h and c.label == "cheese"})
    assert (firing.rule, firing.token, firing.layers, firing.action) == (
        "when cheese -> stop", plain[first].index, want, "stop")
    assert all(not e.firings for e in guarded[:-1])
    trace = loose.generate(PROMPT, max_new_tokens=16, chat=False, rules=["when cheese -> stop"])
    assert trace.finished == "rule" and trace.stopped_by == "when cheese -> stop"
    assert [f["token"] for f in trace.firings] == [plain[first].index]
    assert trace.to_record()["firings"][0]["layers"] == want


def test_an_intervention_fired_at_t_edits_from_t_plus_1(engine, tiny_model, tiny_dict):
    loose = Engine.from_loaded(tiny_model, _loose(tiny_dict[0], engine, "cheese", PROMPT))
    plain = [e for e in loose.stream(PROMPT, max_new_tokens=12, chat=False) if e.generated]
    rule = loose.rules(["when cheese -> suppress dog@1-2 x1 for 1"], on_prompt="off")  # generated tokens only
    guarded = [e for e in loose.stream(PROMPT, max_new_tokens=12, chat=False, rules=rule) if e.generated]
    fired = [i for i, e in enumerate(guarded) if e.firings]
    assert fired, "the loosened cheese chunks should fire"
    t = fired[0]
    for i in range(t + 1):  # up to and including the firing token nothing is edited
        assert torch.equal(guarded[i].hidden, plain[i].hidden)
    assert guarded[t + 1].token_id == plain[t + 1].token_id  # sampled from token t's (unedited) distribution
    assert torch.equal(guarded[t + 1].hidden[0], plain[t + 1].hidden[0])  # below the edited block
    assert not torch.equal(guarded[t + 1].hidden[1], plain[t + 1].hidden[1])  # the stream entering block 1
    assert guarded[t].firings[0].action == "suppress dog@1-2 x1 for 1"


def test_durations_on_the_host(engine, tiny_model):
    program = engine.rules(["w: when cheese -> suppress dog@1 while", "n: when cheese -> suppress dog@2 for 3"])
    cheese = torch.tensor([c.label == "cheese" for c in engine.packed.chunks])
    program.reset(1)
    active = []
    for flag in [1, 0, 0, 0, 0, 1, 1, 0]:
        hit = (cheese if flag else torch.zeros_like(cheese))[None, None]
        program.observe(hit, [[0]])
        active.append((0 in program.active_rows and bool(program.active_rows[0][0]),
                       1 in program.active_rows and bool(program.active_rows[1][0])))
    # active_rows after token t says whether token t + 1 is edited
    assert [w for w, _ in active] == [True, False, False, False, False, True, True, False]
    assert [n for _, n in active] == [True, True, True, False, False, True, True, True]


def test_rules_without_a_dictionary_are_refused(tiny_model):
    bare = Engine.from_loaded(tiny_model)
    with pytest.raises(ChunkError, match="need a dictionary"):
        list(bare.stream("hi", max_new_tokens=2, rules=["when cheese -> stop"]))


def test_batched_rows_share_sampling_until_the_rule_acts(engine, tiny_model, tiny_dict):
    from chunktui.engine.rules import generate_rows
    from chunktui.shared.settings import Sampling

    sampling = Sampling(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=3, stop_at_eos=False)
    prompts = ["The dog ate the cheese", "I like cake"]
    program = engine.rules(["g: when not cheese for 3 -> suppress dog,cake@1-3 x1 for 2", "s: when dog@0 -> stop"],
                           on_prompt="off")  # generated tokens only (the prompt: test_a_prompt_guard_...)
    plain = generate_rows(tiny_model, prompts, 2, sampling, None, chat=False, batch_size=3)
    watched = generate_rows(tiny_model, prompts, 2, sampling, program, chat=False, batch_size=3, act=False)
    guarded = generate_rows(tiny_model, prompts, 2, sampling, program, chat=False, batch_size=3)
    assert [r.ids for r in watched] == [r.ids for r in plain]  # watching changes nothing
    assert [(r.prompt, r.seed) for r in guarded] == [(r.prompt, r.seed) for r in plain]
    for w, g in zip(watched, guarded):
        first = min(f.extra["generated_index"] for f in w.firings if f.rule == "g")
        assert first == 2  # three generated tokens without cheese (the tiny model never matches it)
        # the edit starts with token first + 1's states, so tokens up to first + 1 are the same draws
        assert g.ids[:first + 2] == w.ids[:first + 2]
        assert all(f.extra["prompt"] in (0, 1) and f.extra["seed"] in (3, 4) for f in g.firings)
    assert any(w.ids != g.ids for w, g in zip(watched, guarded))  # and the edit changed something after


# --------------------------------------------------------------------------- rules that read the prompt


def _always(dictionary, label):
    """A copy of the dictionary whose `label` PA chunks hit every state (an infinite threshold)."""
    loose = copy.deepcopy(dictionary)
    for chunk in loose.chunks:
        if chunk.label == label and chunk.kind == "pa":
            chunk.threshold = float("inf")
    return loose


def test_a_prompt_guard_is_on_from_the_first_generated_token(engine, tiny_model, tiny_dict):
    from chunktui.engine.rules import first_token_logprobs
    from chunktui.engine.perturb import next_token_logprobs

    loose = Engine.from_loaded(tiny_model, _always(tiny_dict[0], "cheese"))
    rule = "g: when cheese -> suppress dog@1-2 x1 while"
    plain = [e for e in loose.stream(PROMPT, max_new_tokens=4, chat=False) if e.generated]
    runs = {}
    for mode in ("off", "watch", "act"):
        program = loose.rules([rule], on_prompt=mode)
        runs[mode] = list(loose.stream(PROMPT, max_new_tokens=4, chat=False, rules=program))
    off, watch, act = ([e for e in runs[m] if e.generated] for m in ("off", "watch", "act"))
    # off: the first answer token's states are unedited (the rule first fires on it)
    assert torch.equal(off[0].hidden, plain[0].hidden)
    # watch: the guard held on the prompt's last token, so the first answer token's states are edited ...
    assert watch[0].token_id == plain[0].token_id  # ... but it was sampled before any edit
    assert torch.equal(watch[0].hidden[0], plain[0].hidden[0])  # below the edited block
    assert not torch.equal(watch[0].hidden[1], plain[0].hidden[1])
    prompt_firings = [f for e in runs["watch"] if not e.generated for f in e.firings]
    assert prompt_firings and all(f.extra.get("on_prompt") for f in prompt_firings)
    assert {f.token for f in prompt_firings} == {e.index for e in runs["watch"] if not e.generated}
    assert not any(f.extra.get("on_prompt") for e in runs["off"] for f in e.firings)
    # act: the prompt is read again with the edits, so the first answer token's distribution moves too
    assert act[0].logprob != pytest.approx(plain[0].logprob, abs=1e-6) or act[0].token_id != plain[0].token_id
    prompts = [PROMPT, "I like cake"]
    base = next_token_logprobs(tiny_model, prompts, None, chat=False)
    assert torch.allclose(first_token_logprobs(tiny_model, loose.rules([rule], on_prompt="watch"), prompts,
                                               chat=False), base, atol=1e-5)
    moved = first_token_logprobs(tiny_model, loose.rules([rule], on_prompt="act"), prompts, chat=False)
    assert (moved - base).abs().amax(-1).min() > 1e-4  # every prompt's first-token distribution changed


def test_alerts_and_stops_ignore_the_prompt(engine, tiny_model, tiny_dict):
    loose = Engine.from_loaded(tiny_model, _loose(tiny_dict[0], engine, "cheese", PROMPT))
    rules = ["s: when cheese -> stop", "a: when cheese for 2 -> alert"]
    got = {}
    for mode in ("off", "act"):
        events = list(loose.stream(PROMPT, max_new_tokens=16, chat=False, rules=loose.rules(rules, on_prompt=mode)))
        got[mode] = [(e.token_id, e.finished, [(f.rule, f.token) for f in e.firings]) for e in events]
    assert got["act"] == got["off"]


def test_prompt_firings_set_durations_and_edit_columns(engine):
    program = RuleProgram(["n: when cheese -> suppress dog@1 for 3", "w: when cheese -> suppress dog@2 while"],
                          engine.packed, engine.n_states, dictionary=engine.dictionary, loaded=engine.loaded,
                          on_prompt="act")
    cheese = torch.tensor([c.label == "cheese" for c in engine.packed.chunks])
    none = torch.zeros_like(cheese)
    # row 0: a 6-token prompt, cheese at its tokens 1 and 5 (the last); row 1: a 4-token prompt (left-padded by
    # two columns that match cheese but are padding), cheese at its token 1 only
    rows = [[none, cheese, none, none, none, cheese], [cheese, cheese, none, cheese, none, none]]
    hit = torch.stack([torch.stack(r) for r in rows])  # (2, 6, C)
    found, reread = program.observe_prompt(hit, [6, 4])
    assert reread
    assert sorted((f.rule, f.token) for f in found[0]) == [("n", 1), ("n", 5), ("w", 1), ("w", 5)]
    assert sorted((f.rule, f.token) for f in found[1]) == [("n", 1), ("w", 1)]  # padding never fires
    assert all(f.extra == {"on_prompt": True} for fs in found for f in fs)
    n_cols, w_cols = (program.prompt_edits[r].tolist() for r in (0, 1))
    # re-reading edits the matching prompt token itself and the ones its duration covers
    assert n_cols == [[False, True, True, True, True, True], [False, False, False, True, True, True]]
    assert w_cols == [[False, True, True, False, False, True], [False, False, False, True, True, False]]
    # after the prompt: row 0 fired on its last token (both on); row 1's `for 3` from its token 1 (of 0-3) edits
    # its tokens 2, 3 and the first answer token; its `while` is off (no cheese on its last token)
    assert program.remaining == [{0: 3, 1: 1}, {0: 1}]
    assert program.active_rows[0].tolist() == [True, True] and program.active_rows[1].tolist() == [True, False]
    program.end_prompt()
    assert program.prompt_edits is None
    watching = RuleProgram(["n: when cheese -> suppress dog@1 for 3"], engine.packed, engine.n_states,
                           dictionary=engine.dictionary, loaded=engine.loaded, on_prompt="watch")
    _, reread = watching.observe_prompt(hit, [6, 4])
    assert not reread and watching.remaining == [{0: 3}, {0: 1}] and watching.prompt_edits is None
    off = RuleProgram(["n: when cheese -> suppress dog@1 for 3"], engine.packed, engine.n_states,
                      dictionary=engine.dictionary, loaded=engine.loaded, on_prompt="off")
    assert off.observe_prompt(hit, [6, 4]) == ([[], []], False) and off.remaining == [{}, {}]


# --------------------------------------------------------------------------- `now`: within the same forward pass


def test_a_now_rule_edits_the_firing_token_itself(engine, tiny_model, tiny_dict):
    loose = Engine.from_loaded(tiny_model, _loose(tiny_dict[0], engine, "cheese", PROMPT))
    plain = [e for e in loose.stream(PROMPT, max_new_tokens=12, chat=False) if e.generated]
    program = loose.rules(["when cheese@0 -> suppress dog@1-2 x1 now"], on_prompt="off")
    guarded = [e for e in loose.stream(PROMPT, max_new_tokens=12, chat=False, rules=program) if e.generated]
    fired = [i for i, e in enumerate(guarded) if e.firings]
    assert fired, "the loosened cheese@0 chunk should fire on a generated token"
    t = fired[0]
    for i in range(t):  # before the first firing nothing is edited
        assert torch.equal(guarded[i].hidden, plain[i].hidden)
    assert guarded[t].token_id == plain[t].token_id  # token t itself was sampled before the firing
    assert torch.equal(guarded[t].hidden[0], plain[t].hidden[0])  # the layer the condition reads: unedited
    # the stream entering block 1 at token t is edited in the very pass: dog@1's subpopulation set to 0
    dog1 = next(c for c in loose.dictionary.chunks if c.label == "dog" and c.layer == 1)
    want = plain[t].hidden[1].clone()
    want[dog1.subpopulation] = 0
    assert torch.equal(guarded[t].hidden[1], want)
    # so the token after it is drawn from the edited distribution
    assert (guarded[t + 1].token_id, guarded[t + 1].logprob) != (plain[t + 1].token_id, plain[t + 1].logprob)
    assert guarded[t].firings[0].action == "suppress dog@1-2 x1 now"
    # without `for N` only the firing tokens are edited: a token where it did not fire keeps its layer-1 state
    # as the unedited model computes it from the (edited) context, which the firing check above pins down
    assert program.remaining == [{}] or all(not r for r in program.remaining)


def test_now_on_the_prompt_acts_in_the_same_pass(engine, tiny_model, tiny_dict):
    from chunktui.engine.perturb import next_token_logprobs
    from chunktui.engine.rules import first_token_logprobs

    loose = Engine.from_loaded(tiny_model, _always(tiny_dict[0], "cheese"))
    rule = "g: when cheese@0 -> suppress dog@1-2 x1 now"
    prompts = [PROMPT, "I like cake"]
    base = next_token_logprobs(tiny_model, prompts, None, chat=False)
    for mode in ("off", "watch"):  # the prompt is edited only when the rules act on it
        got = first_token_logprobs(tiny_model, loose.rules([rule], on_prompt=mode), prompts, chat=False)
        assert torch.allclose(got, base, atol=1e-6)
    program = loose.rules([rule], on_prompt="act")
    firings: list = []
    moved = first_token_logprobs(tiny_model, program, prompts, chat=False, firings=firings)
    assert (moved - base).abs().amax(-1).min() > 1e-4  # edited within the prefill pass itself
    assert all(fs for fs in firings)  # and every prompt token's firing is recorded
    # the same edit by hand: suppress dog@1-2 at every prompt position
    from chunktui.engine.perturb import Intervention, select_chunks
    from chunktui.shared.settings import Positions

    iv = Intervention(chunks=select_chunks(loose.dictionary, ["dog"], [1, 2]), mode="suppress", strength=1.0,
                      positions=Positions("all"))
    by_hand = next_token_logprobs(tiny_model, prompts, iv, chat=False)
    assert torch.allclose(moved, by_hand, atol=1e-5)


def test_now_is_checked_against_the_layers():
    from chunktui.shared.rules import Vocabulary, check_rule, parse_rule

    vocab = Vocabulary({"cheese": set(range(31)), "dog": set(range(31))}, 31)
    check_rule(parse_rule("when cheese@10-19 -> suppress cheese@20-29 now for 8"), vocab)
    with pytest.raises(RuleError, match=r"below the first layer the action edits \(20\); 'cheese' reads layer 20"):
        check_rule(parse_rule("when cheese -> suppress cheese@20-29 now"), vocab)
    with pytest.raises(RuleError, match="e.g. cheese@10-19"):
        check_rule(parse_rule("when cheese@10-25 -> suppress cheese@20-29 now"), vocab)
    with pytest.raises(RuleError, match="cannot count tokens"):
        check_rule(parse_rule("when cheese@2 for 2 -> suppress cheese@20-29 now"), vocab)
    with pytest.raises(RuleError, match="column 44: .now. edits the token"):
        parse_rule("when cheese@2 -> suppress cheese@20-29 now while")
    rule = parse_rule("g: when cheese@2 -> suppress cheese@20-29 x1 now for 3")
    assert str(rule.action) == "suppress cheese@20-29 x1 now for 3" and rule.action.now
    assert str(parse_rule(str(rule)).action) == str(rule.action)  # what it prints parses back to itself


def test_a_reread_repeats_a_now_rules_first_reading(engine, tiny_model, tiny_dict):
    """Another rule makes the prompt be read again; the `now` rule then edits exactly where it fired on the first
    reading (the positions its records give), not where its condition holds on the edited re-read."""
    from chunktui.engine.rules import first_token_logprobs

    loose = Engine.from_loaded(tiny_model, _loose(tiny_dict[0], engine, "cheese", PROMPT))
    program = loose.rules(["h: when cheese -> suppress dog@0-1 x1 for 2", "g: when dog@1 -> suppress cake@2-3 x1 now"],
                          on_prompt="act")
    seen = {}
    end = program.end_prompt

    def spy():
        seen["edits"] = {r: m.clone() for r, m in (program.prompt_edits or {}).items()}
        end()

    program.end_prompt = spy
    firings: list = []
    first_token_logprobs(tiny_model, program, [PROMPT], chat=False, firings=firings)
    assert 0 in seen["edits"], "rule h should fire on the prompt and cause a re-read"
    fired_g = sorted(f.token for f in firings[0] if f.rule == "g")
    if fired_g:
        assert seen["edits"][1][0].nonzero().flatten().tolist() == fired_g
    else:
        assert 1 not in seen["edits"]
