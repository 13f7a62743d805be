"""One loaded built-in model for the whole session: every integration test shares it (loads cost seconds)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="session")
def smol():
    """SmolLM2-135M-Instruct on the CPU, loaded once; tests that need two threads get them."""
    from chunktui.engine.models import load_model

    torch.set_num_threads(2)
    yield load_model("smollm2-135m", device="cpu")
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def sample_dict(smol):
    from chunktui.engine.dictionary import load_dictionary
    from chunktui.paths import DEFAULT_DICT_NAME, sample_path

    return load_dictionary(sample_path(DEFAULT_DICT_NAME), identity=smol.identity())


@pytest.fixture(scope="session")
def smol_engine(smol, sample_dict):
    """The `chunktui.Engine` facade over the shared model and the sample dictionary."""
    from chunktui.api import Engine

    return Engine.from_loaded(smol, sample_dict)


@pytest.fixture(scope="session")
def transformers_smol(smol):
    """transformers' own LlamaForCausalLM over `smol`'s weights (shared): the reference for `generate` and for
    the forward pass `smol` runs (chunktui's copy, engine.lean)."""
    from chunktui.engine.lean import transformers_twin

    twin = transformers_twin(smol.model)
    assert type(twin).__module__.startswith("transformers.")
    return twin
