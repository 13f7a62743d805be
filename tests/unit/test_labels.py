"""Word and span labels, aligned through the tokenizer's character offsets."""

import json

import pytest
import torch

from chunktui.shared.errors import CorpusError
from chunktui.engine.corpus import TokenTable, build_contexts, split_sentences
from chunktui.engine.labels import read_spans, span_labels, word_labels, word_positions
from chunktui.engine.tiny import build_tokenizer

TEXT = "The cheese and cheesecake. A cupcake, Cheese! I was happy yesterday, not sad."


def table_for(text: str) -> TokenTable:
    spans, rows = build_contexts(build_tokenizer(), text, "sentence")
    table = TokenTable()
    for ci, (ids, offs, _) in enumerate(rows):
        for p, (i, (a, b)) in enumerate(zip(ids, offs)):
            table.ids.append(i)
            table.starts.append(a)
            table.ends.append(b)
            table.context.append(ci)
            table.position.append(p)
    return table


def pieces(text, table, mask):
    return [text[table.starts[t]:table.ends[t]] for t in mask.nonzero().flatten().tolist()]


def test_tokenisation_assumed_by_these_tests():
    table = table_for(TEXT)
    toks = [TEXT[a:b] for a, b in zip(table.starts, table.ends)]
    assert toks[:10] == ["The", " cheese", " and", " cheese", "cake", ".", "A", " c", "up", "cake"]
    assert toks[11:16] == [" ", "C", "hees", "e", "!"]


def test_exact_mode_is_the_token_text_with_or_without_space():
    table = table_for(TEXT)
    # " cheese" twice (the second is the first piece of "cheesecake"); "Cheese" is split, so not exact
    assert word_positions(TEXT, table, "cheese", "exact").nonzero().flatten().tolist() == [1, 3]
    # "cake" as a token: the end of cheesecake and of cupcake
    assert pieces(TEXT, table, word_positions(TEXT, table, "cake", "exact")) == ["cake", "cake"]


def test_part_word_contains_or_ends_the_word():
    table = table_for(TEXT)
    # "Cheese" = "C" + "hees" + "e": labelled at the token that ends it (index 14), with the case of the first letter free
    assert word_positions(TEXT, table, "cheese", "part-word").nonzero().flatten().tolist() == [1, 3, 14]
    # "cheesecake" = " cheese" + "cake": only the token that completes it
    assert word_positions(TEXT, table, "cheesecake", "part-word").nonzero().flatten().tolist() == [4]


def test_step_labels_the_tokens_before_and_never_crosses_contexts():
    table = table_for(TEXT)
    labels = word_labels(TEXT, table, ["cheesecake"], mode="part-word", step=1, min_count=1)
    assert labels.masks["cheesecake"].nonzero().flatten().tolist() == [3]
    # "The" opens the first sentence: step 1 from it has nowhere to go
    labels = word_labels(TEXT, table, ["The"], mode="exact", step=1, min_count=1)
    assert "The" in labels.skipped
    # "A" opens the second sentence: step 1 must not reach "." of the first
    labels = word_labels(TEXT, table, ["A"], mode="exact", step=1, min_count=1)
    assert "A" in labels.skipped


def test_rare_and_missing_words_are_skipped_with_reasons():
    table = table_for(TEXT)
    labels = word_labels(TEXT, table, ["cheese", "zebra"], min_count=3)
    assert labels.masks == {}
    assert "never occurs" in labels.skipped["zebra"]
    assert "only 2" in labels.skipped["cheese"]
    with pytest.raises(CorpusError):
        word_labels(TEXT, table, [" ", ""])


def test_sentence_split():
    text = "One. Two!  Three?\nFour"
    assert [text[a:b] for a, b in split_sentences(text)] == ["One.", "Two!", "Three?", "Four"]


def test_spans_map_to_tokens(tmp_path):
    text = "I was happy yesterday, not sad."
    path = tmp_path / "s.jsonl"
    a = text.index("happy")
    y = text.index("yesterday")
    n = text.index("not")
    path.write_text(json.dumps({"text": text, "spans": [[a, a + 5, "emotion"], [y, y + 9, "time"],
                                                        [n, n + 3, "negation"]]}) + "\n")
    corpus = read_spans(path)
    table = table_for(corpus.source)
    labels = span_labels(table, corpus.source, corpus.spans, min_count=1)
    assert pieces(corpus.source, table, labels.masks["emotion"]) == ["happ", "y"]
    assert "".join(pieces(corpus.source, table, labels.masks["time"])) == "yesterday"
    assert pieces(corpus.source, table, labels.masks["negation"]) == [" n", "ot"]


@pytest.mark.parametrize("line, message", [
    ('{"spans": []}', "needs a \"text\""),
    ('{"text": "abc", "spans": [[0, 9, "x"]]}', "outside the text"),
    ('{"text": "abc", "spans": [[0, 1]]}', "must be \\[start, end"),
    ('{"text": "abc"', "not valid JSON"),
])
def test_bad_span_files_are_refused(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(CorpusError, match=message):
        read_spans(path)
