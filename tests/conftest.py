"""Shared fixtures: a tiny seeded random model and a dictionary built on it (instant, offline)."""

from __future__ import annotations

import os
import random

import pytest
import torch

# Tiny models run fastest on one thread; with two, tiny ops lose more to thread barriers than they gain
# (and badly so when another process shares the cores). Integration tests raise it for the real model.
torch.set_num_threads(1)

CONCEPT_WORDS = ["cheese", "cake", "bread", "dog", "rain"]


def make_corpus(seed: int = 0, sentences: int = 120) -> str:
    """A small text where each concept word occurs in many different contexts."""
    rng = random.Random(seed)
    subjects = ["The dog", "A cat", "My friend", "The horse", "Her bird", "We", "They"]
    verbs = ["ate", "liked", "found", "wanted", "saw"]
    places = ["in the garden", "by the river", "at school", "in the kitchen", "on the beach"]
    lines = []
    for _ in range(sentences):
        a, b = rng.sample(CONCEPT_WORDS, 2)
        lines.append(f"{rng.choice(subjects)} {rng.choice(verbs)} the {a} {rng.choice(places)}. "
                     f"I like {b} and the rain.")
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def _private_state_dir(tmp_path_factory, monkeypatch):
    """The app's log (and anything else it keeps in the user's state folder) goes to a temporary folder."""
    monkeypatch.setenv("CHUNKTUI_STATE_DIR", str(tmp_path_factory.mktemp("state")))


@pytest.fixture(scope="session")
def tiny_model():
    from chunktui.engine.models import load_model

    return load_model("random:llama-tiny", device="cpu")


@pytest.fixture(scope="session")
def tiny_corpus() -> str:
    return make_corpus()


@pytest.fixture(scope="session")
def tiny_dict(tiny_model, tiny_corpus, tmp_path_factory):
    """A PA dictionary for the tiny model, saved to disk: (ChunkDictionary, path)."""
    from chunktui.engine.build import LabelSource, build_dictionary

    # On a random model only the embedding (layer 0) carries a word's identity, so the app's tests, which need
    # coloured tokens, let layer 0 alone vote in the colour rule here (by default it never votes:
    # tests/unit/test_colour_rule.py)
    dictionary, _ = build_dictionary(tiny_model, LabelSource(corpus=tiny_corpus, words=CONCEPT_WORDS),
                                     vote_layers=[0])
    path = tmp_path_factory.mktemp("dict") / "tiny.chunks.safetensors"
    dictionary.save(path)
    return dictionary, path
