"""Generators and longest-match parsing, against hand-worked cases."""

from chunktui.rnn.parse import longest_match_parse
from chunktui.rnn.sequences import (context_sequence, flat_sequence, hierarchical_sequence,
                                    hierarchical_words, planted_sequence)


def _tokens(seq, vocab):
    return ["".join(p.chunk) for p in longest_match_parse(seq, vocab)]


def test_longest_match_prefers_longer_chunk():
    # By hand: at 0 both "AB" and "ABC" match -> take ABC; then D alone; then AB; then E.
    assert _tokens("ABCDABE", ["AB", "ABC"]) == ["ABC", "D", "AB", "E"]


def test_longest_match_is_greedy_left_to_right():
    # By hand: "ABAB" beats "AB"+"AB"; the trailing "A" has no chunk -> single symbol.
    assert _tokens("ABABA", ["AB", "ABAB"]) == ["ABAB", "A"]
    # Greedy, not optimal: at 0 "AB" wins, leaving "C" alone though "BC" existed.
    assert _tokens("ABC", ["AB", "BC"]) == ["AB", "C"]


def test_parse_pieces_cover_sequence_with_positions():
    pieces = longest_match_parse("XABY", ["AB"])
    assert [(p.start, p.end) for p in pieces] == [(0, 1), (1, 3), (3, 4)]


def test_flat_sequence_structure_and_truth():
    s = flat_sequence(50, seed=3)
    # Every ground-truth token is a planted word or a single filler.
    assert set(s.parse_words) <= {"ABCD", "GHI", "JKLMN", "E"}
    assert sum(w != "E" for w in s.parse_words) == 50 == s.n_planted
    assert "".join(s.parse_words) == s.symbols
    # Filler runs are 0..9 long: never 10 E's in a row.
    assert "E" * 10 not in s.symbols


def test_flat_sequence_is_seeded():
    assert flat_sequence(30, seed=1).symbols == flat_sequence(30, seed=1).symbols
    assert flat_sequence(30, seed=1).symbols != flat_sequence(30, seed=2).symbols


def test_planted_sequence_with_no_filler_and_one_word():
    # By hand: one word "AB", max_filler 0, 3 words -> "ABABAB"; truth parses word by word.
    s = planted_sequence(["AB"], 3, max_filler=0, seed=0)
    assert s.symbols == "ABABAB"
    assert s.parse_words == ["AB", "AB", "AB"]


def test_ground_truth_is_longest_match_not_generation_order():
    # Words "AB" and "ABAB"; written as AB, AB (no filler) the truth must read ABAB.
    s = planted_sequence(["AB"], 2, max_filler=0, seed=0, vocabulary=["AB", "ABAB"])
    assert s.generated == ["AB", "AB"]
    assert s.parse_words == ["ABAB"]


def test_context_sequence_probabilities():
    s = context_sequence(3000, seed=0)
    counts = {w: s.generated.count(w) for w in ("ABCD", "XBCY", "GBCH")}
    assert abs(counts["ABCD"] / 3000 - 0.4) < 0.03
    assert abs(counts["XBCY"] / 3000 - 0.3) < 0.03
    # The shared sub-word occurs inside every planted word.
    assert s.symbols.count("BC") == 3000


def test_hierarchical_words_are_concatenations_of_earlier_words():
    levels = hierarchical_words(("AB", "CD"), depth=2, per_level=2, seed=0)
    assert len(levels) == 3 and all(len(level) == 2 for level in levels[1:])
    known = list(levels[0])
    for level in levels[1:]:
        for w in level:
            assert any(w == a + b for a in known for b in known)
        known += level
    s = hierarchical_sequence(40, base=("AB", "CD"), depth=2, seed=0)
    assert set(s.words) == set(known)
    assert "".join(s.parse_words) == s.symbols
