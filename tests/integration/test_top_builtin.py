"""Where a chunk fires, on the built-in model and the sample dictionary, over the sample held-out text."""

from __future__ import annotations

import re

from chunktui.engine.top import all_units, resolve_units, top_tables
from chunktui.paths import sample_path


def _word_at(text: str, a: int, b: int) -> str:
    """The whole word (letters) around the token at [a, b)."""
    while a > 0 and text[a - 1].isalpha():
        a -= 1
    while b < len(text) and text[b].isalpha():
        b += 1
    return text[a:b].lower()


def test_top_contexts_of_every_concept_are_its_own_word(smol, sample_dict):
    text = sample_path("heldout.txt").read_text()
    tables = top_tables(smol, sample_dict, text, {"cheese": resolve_units(sample_dict, "cheese")},
                        extra=all_units(sample_dict))
    assert len(tables.names) == len(sample_dict.chunks) + len(sample_dict.labels())  # one pass for everything
    own, shown = 0, 0
    for label in sample_dict.labels():
        examples = tables.examples(label, 10)
        assert examples, label  # every concept occurs in the held-out text
        for e in examples:
            assert text[e.start:e.end].replace("\n", " ") == e.token
            own += label in _word_at(text, e.start, e.end)  # its word, or a word holding it (cheesecake, pizzas)
            shown += 1
    # measured 0.97+ (10 contexts x 34 concepts); below 0.9 the ranking or the matching has broken
    assert own / shown >= 0.9, (own, shown)
    cheese = tables.examples("cheese@15", 5)
    assert all(re.fullmatch(r"\s*cheese", e.token) for e in cheese)
