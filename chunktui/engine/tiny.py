"""Small seeded random models for tests and demos: instant, offline, deterministic.

The tokenizer is a byte-level BPE trained (deterministically) on a short
built-in text, so common words such as " cheese" are single tokens and rarer
ones ("cheesecake") split into pieces, as in a real model.
"""

from __future__ import annotations

from functools import lru_cache

import torch

_TRAINING_TEXT = """
The cheese was on the table next to the cake. I like cheese and I like cake, but cheesecake is best.
A dog and a cat sat in the garden. The bird sang in the rain while the sun was low over the river.
We drink coffee in the morning and tea in the afternoon. Bread with cheese is a simple lunch.
Red apples, green apples and a blue cup. Three dogs, ten cats and one horse walked to the beach.
The kitchen smelled of soup and chocolate. Snow fell on the school and the wind was cold.
She read a book about music and the moon. A flower grew near the car. Pizza with cheese is popular.
He was happy, then sad, never afraid. Yesterday it rained; tomorrow it will not. Is it cold? Yes!
""" * 3

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, min_frequency=2, show_progress=False,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TRAINING_TEXT.splitlines(), trainer=trainer)
    return tok.to_str()


def build_tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_random_model(spec: str):
    """`random:NAME[:SEED]` -> (model, tokenizer), weights drawn with the seed."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from chunktui.shared.specs import RANDOM_MODELS

    name, _, seed = spec[len("random:"):].partition(":")
    family, kwargs = RANDOM_MODELS[name]
    tokenizer = build_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), **kwargs, **ids)
    torch.manual_seed(int(seed or 0))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer
