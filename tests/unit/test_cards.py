"""Chunk cards: top-matching tokens with context, match counts, automatic labels."""

import pytest
import torch

from chunktui.engine.cards import ChunkCard, auto_label, build_cards, stored_card
from chunktui.engine.dictionary import Chunk
from chunktui.engine.corpus import collect
from chunktui.engine.matching import pack


def test_auto_label_takes_the_most_frequent_tokens_until_they_cover_most_matches():
    assert auto_label([("the", 7), ("a", 2), ("an", 1)]) == "the"  # 70 % >= 60 %
    assert auto_label([("the", 4), ("a", 3), ("an", 2), ("this", 1)]) == "the/a"
    assert auto_label([("x", 1), ("y", 1), ("z", 1), ("w", 1), ("v", 1)]) == "x/y/z"  # at most 3
    assert auto_label([]) == "(none)"


def test_cards_of_pa_chunks_agree_with_matching(tiny_model, tiny_dict, tiny_corpus):
    dictionary, _ = tiny_dict
    chunks = dictionary.select(["cheese", "dog"], layers=[1, 2])
    hs = collect(tiny_model, tiny_corpus, layers=[1, 2])
    cards = build_cards(chunks, hs, examples=4, top=3, context=12)
    assert [c.id for c in cards] == [c.id for c in chunks]
    hits = pack(chunks, tiny_model.hidden_size, tiny_model.layout.n_states, layers=[1, 2]).match(hs.H)
    for card, chunk in zip(cards, chunks):
        column = [c.id for c in pack(chunks, tiny_model.hidden_size, tiny_model.layout.n_states,
                                     layers=[1, 2]).chunks].index(chunk.id)
        assert card.matches == int(hits.hit[:, column].sum())
        assert card.tokens == len(hs.tokens)
        assert card.layer == chunk.layer and card.kind == "pa"
        # a word chunk fitted at an early layer matches its own word most often, and is named after it
        assert card.top_tokens[0][0] == chunk.label
        assert card.auto_label.split("/")[0] == chunk.label
        scores = [e.score for e in card.examples]
        assert scores == sorted(scores, reverse=True) and all(s >= 0 for s in scores)
        for e in card.examples:
            assert e.token.strip().lower() in {t for t, _ in card.top_tokens} | {chunk.label}
            assert len(e.before) <= 12 and len(e.after) <= 12
        assert chunk.label in card.text() and f"layer {chunk.layer}" in card.text()


def test_direction_card_lists_the_highest_cosines_first(tiny_model, tiny_corpus):
    hs = collect(tiny_model, tiny_corpus, layers=[2])
    # a direction through the state of one "rain" token: rain tokens match it best
    texts = [t.strip().lower() for t in hs.token_texts()]
    i = texts.index("rain")
    u = hs.H[i, 0] / hs.H[i, 0].norm()
    chunk = Chunk(id="dir:r@2", label="r", layer=2, kind="direction", direction=u, threshold=0.95, typical=1.0)
    (card,) = build_cards([chunk], hs, examples=3)
    cos = (hs.H[:, 0] @ u) / hs.H[:, 0].norm(dim=1)
    assert card.matches == int((cos >= 0.95).sum())
    assert card.examples[0].value == pytest.approx(float(cos.max()), abs=1e-5)
    values = [e.value for e in card.examples]
    assert values == sorted(values, reverse=True)
    assert "rain" in card.auto_label


def test_cards_round_trip_through_chunk_extra():
    card = ChunkCard(id="dir:u0001@3", label="the/a", layer=3, kind="direction", matches=5, tokens=100,
                     top_tokens=[("the", 4), ("a", 1)], auto_label="the/a")
    chunk = Chunk(id="dir:u0001@3", label="the/a", layer=3, kind="direction", direction=torch.ones(4),
                  extra={"card": card.to_json()})
    back = stored_card(chunk)
    assert back.to_json() == card.to_json() and back.match_rate == 0.05
    assert stored_card(Chunk(id="x", label="x", layer=0, kind="direction", direction=torch.ones(4))) is None
