"""The rule language (chunktui/shared/rules.py): parsing, specific errors, checks against a dictionary."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from chunktui.shared.errors import ChunkError
from chunktui.shared.rules import (Action, And, Firing, Not, Or, Rule, RuleError, RuleSyntaxError, Run, Term,
                                   Vocabulary, check_rules, gather_rules, load_rules_toml, parse_action,
                                   parse_condition, parse_rule, read_rules_file)
from chunktui.shared.settings import DEFAULT_LAYERS, DEFAULT_STRENGTH

VOCAB = Vocabulary({"cheese": set(range(31)), "cake": set(range(31)), "coffee": {3, 4, 5}, "ice cream": {2}},
                   n_states=31)


def test_terms_layers_counts_and_runs():
    rule = parse_rule("when cheese@10-20>=3 -> suppress cheese for 8")
    assert rule.condition == Term("cheese", tuple(range(10, 21)), 3)
    assert rule.action == Action("intervene", "suppress", ("cheese",), DEFAULT_LAYERS, None, 8)
    assert rule.action.effective_strength == DEFAULT_STRENGTH["suppress"]
    assert parse_rule("when cheese@2,5,7-8 -> alert").condition == Term("cheese", (2, 5, 7, 8))
    assert parse_rule("when cheese@all -> alert").condition == Term("cheese")
    assert parse_rule("when cheese for 2 -> stop").condition == Run(Term("cheese"), 2)
    assert parse_rule('when "ice cream" -> alert').condition == Term("ice cream")


def test_precedence_not_and_or():
    c = parse_rule("when not cheese and cake or coffee -> alert").condition
    assert c == Or((And((Not(Term("cheese")), Term("cake"))), Term("coffee")))
    c = parse_rule("when cheese and (cake or coffee) for 3 -> alert").condition
    assert c == And((Term("cheese"), Run(Or((Term("cake"), Term("coffee"))), 3)))
    assert parse_rule("when not cheese for 3 -> stop").condition == Run(Not(Term("cheese")), 3)
    assert parse_rule("when not (cheese for 3) -> stop").condition == Not(Run(Term("cheese"), 3))


def test_actions():
    a = parse_rule("when cheese -> graft coffee@2-9 x0.1").action
    assert (a.mode, a.labels, a.layers, a.strength, a.duration) == ("graft", ("coffee",), "2-9", 0.1, None)
    a = parse_rule("when cheese -> suppress cheese,cake@all x 0.5 while").action
    assert (a.labels, a.layers, a.strength) == (("cheese", "cake"), "all", 0.5)
    assert parse_rule("when cheese -> mean-ablate cheese").action.mode == "mean-ablate"
    assert parse_rule("when cheese → stop").action == Action("stop")
    assert parse_rule("guard: when cheese -> stop").name == "guard"
    assert parse_rule("when cheese -> stop").name == "when cheese -> stop"


@pytest.mark.parametrize("text, column, words", [
    ("when cheese@ -> stop", 14, "a layer"),
    ("when cheese -> stpo", 16, "did you mean 'stop'"),
    ("when cheese -> suppres cheese", 16, "unknown action"),
    ("when (cheese or cake -> stop", 22, "close the '(' at column 6"),
    ("when cheese@9-2 -> stop", 13, "runs backwards"),
    ("when cheese>=0 -> stop", 14, "from 1"),
    ("when cheese > 3 -> stop", 13, "only '>='"),
    ("cheese -> stop", 1, "starts with 'when'"),
    ("when cheese stop", 13, "'->'"),
    ("when cheese -> suppress cheese x3", 32, "at most 1"),
    ("when cheese -> alert now", 22, "nothing after 'alert'"),
    ("when and -> stop", 6, "keyword"),
    ('when "cheese -> stop', 6, "not closed"),
    ("when cheese for x -> stop", 17, "whole number"),
])
def test_syntax_errors_name_the_column(text, column, words):
    with pytest.raises(RuleSyntaxError) as err:
        parse_rule(text)
    assert err.value.column == column
    assert f"column {column}" in str(err.value) and words in str(err.value)
    assert text.strip() in str(err.value)


def test_checks_against_the_dictionary():
    check_rules([parse_rule("when cheese@10-20>=3 and coffee -> suppress cheese for 8")], VOCAB)
    with pytest.raises(RuleError, match="no chunk labelled 'chese'.*nearest: cheese"):
        check_rules([parse_rule("when chese -> stop")], VOCAB)
    with pytest.raises(RuleError, match="layer 40 is out of range.*0-30"):
        check_rules([parse_rule("when cheese@40 -> stop")], VOCAB)
    with pytest.raises(RuleError, match="no chunk at layers 10-12"):
        check_rules([parse_rule("when coffee@10-12 -> stop")], VOCAB)
    with pytest.raises(RuleError, match="can never hold"):
        check_rules([parse_rule("when coffee>=4 -> stop")], VOCAB)
    with pytest.raises(RuleError, match="blocks 0-29"):
        check_rules([parse_rule("when cheese -> suppress cheese@30")], VOCAB)
    with pytest.raises(RuleError, match="nearest: cake"):
        check_rules([parse_rule("when cheese -> suppress cak")], VOCAB)


def test_toml_rules(tmp_path):
    path = tmp_path / "guard.toml"
    path.write_text('[[rule]]\nname = "guard"\nwhen = "cheese@10-20>=3"\nthen = "suppress cheese for 8"\n\n'
                    '[[rule]]\nname = "bell"\nwhen = "coffee for 2"\nthen = "alert"\n', encoding="utf-8")
    rules = read_rules_file(path)
    assert [r.name for r in rules] == ["guard", "bell"]
    assert rules[0].condition == Term("cheese", tuple(range(10, 21)), 3)
    assert rules[1].action == Action("alert")
    with pytest.raises(RuleError, match="'guard'.*`when = 'cheese@'`.*column 8"):
        load_rules_toml('[[rule]]\nname = "guard"\nwhen = "cheese@"\nthen = "stop"\n')
    with pytest.raises(RuleError, match="missing 'then'"):
        load_rules_toml('[[rule]]\nname = "x"\nwhen = "cheese"\n')
    with pytest.raises(RuleError, match="not valid TOML"):
        load_rules_toml('[[rule]\n')
    with pytest.raises(RuleError, match="unknown key 'tehn'"):
        load_rules_toml('[[rule]]\nwhen = "cheese"\ntehn = "stop"\n')
    with pytest.raises(RuleError, match="Two rules are named"):
        gather_rules(["a: when cheese -> stop", "a: when cake -> stop"])
    with pytest.raises(RuleError, match="not found"):
        read_rules_file(tmp_path / "missing.toml")


def test_positive_labels_leave_out_negated_ones():
    rule = parse_rule("when (cheese or cake) and not coffee -> alert")
    assert rule.positive_labels() == ["cheese", "cake"]


def test_firing_round_trip():
    f = Firing(rule="guard", token=12, layers=[3, 4], action="stop", text=" cheese", extra={"row": 2})
    assert Firing.from_json(f.to_json()) == f


# --------------------------------------------------------------------------- properties

labels = st.sampled_from(["cheese", "cake", "coffee", "ice cream", "and", "x1"])
layer_sets = st.one_of(st.none(), st.lists(st.integers(0, 30), min_size=1, max_size=4).map(
    lambda xs: tuple(sorted(set(xs)))))
terms = st.builds(Term, labels, layer_sets, st.integers(1, 3))
conditions = st.recursive(terms, lambda inner: st.one_of(
    st.builds(Not, inner), st.builds(Run, inner, st.integers(1, 5)),
    st.lists(inner, min_size=2, max_size=3).map(lambda xs: And(tuple(xs))),
    st.lists(inner, min_size=2, max_size=3).map(lambda xs: Or(tuple(xs)))), max_leaves=6)
actions = st.one_of(st.just(Action("alert")), st.just(Action("stop")), st.builds(
    lambda mode, labs, layers, dur: Action("intervene", mode, labs, layers, DEFAULT_STRENGTH[mode], dur),
    st.sampled_from(["graft", "suppress", "mean-ablate"]), st.lists(labels, min_size=1, max_size=2).map(tuple),
    st.sampled_from(["2-9", "all", "4", "1,3-5"]), st.one_of(st.none(), st.integers(1, 9))))


def _normal(node):
    """Nested and/or of the same kind flatten when printed and parsed again."""
    if isinstance(node, (And, Or)):
        flat = []
        for n in node.nodes:
            n = _normal(n)
            flat.extend(n.nodes if type(n) is type(node) else [n])
        return type(node)(tuple(flat))
    if isinstance(node, Not):
        return Not(_normal(node.node))
    if isinstance(node, Run):
        return Run(_normal(node.node), node.n)
    return node


@settings(max_examples=300, deadline=None)
@given(conditions, actions)
def test_printed_rules_parse_back(condition, action):
    rule = Rule("r", condition, action)
    again = parse_rule(str(rule))
    assert _normal(again.condition) == _normal(condition)
    assert again.action == action


alphabet = st.sampled_from(list("when cheese cake@0123456789-,>=()x.for not and or alert stop suppress \"'→≥"))


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet, max_size=60) | st.text(max_size=40))
def test_any_text_parses_or_raises_a_chunk_error(text):
    for candidate in (text, "when " + text, "when cheese -> " + text):
        try:
            rule = parse_rule(candidate)
        except ChunkError as err:
            assert str(err)
            continue
        assert isinstance(rule, Rule)
        try:
            check_rules([rule], VOCAB)
        except RuleError as err:
            assert str(err)
