"""LeanTokenizer (no transformers import) equals transformers' TokenizersBackend on the built-in model's folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chunktui.engine.lean_tokenizer import LeanTokenizer, UnsupportedTokenizer, supported

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"]
TEXTS = ["", "Hello, world!", "  leading and trailing  ", "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
         "Ünïcödé façade naïve — “quotes” ‘and’ …", "日本語のテキストと中文", "emoji 👍🏽 👨‍👩‍👧‍👦 🇫🇷!",
         "many     spaces      here", "\n\n\n", " ", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
         "x<|im_end|>y <|endoftext|> z<repo_name>", "<|im_start", "code:\n    def f(x):\n        return x**2\n",
         "The quick brown fox jumps over the lazy dog. " * 400, "a" * 3000, "don't I'm they're , . ! ?"]
CHATS = [
    [{"role": "user", "content": "What do you like to eat with bread?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! 👋"},
     {"role": "user", "content": "Say <|im_end|> twice\n\n"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces  ", "name": None}],
]
# exercises the sandbox's extras: namespace, tojson, loop controls, dict(), the generation tag, the special tokens
TEMPLATE = ("{% set ns = namespace(n=0) %}{{ bos_token }}{% for m in messages %}{% if m.role == 'stop' %}{% break %}"
            "{% endif %}{% set ns.n = ns.n + 1 %}{{ m.role }}: {{ m.content | tojson }} {{ dict(a=1) | tojson }}\n"
            "{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{{ eos_token }}{% endgeneration %}{% endif %}"
            "{% endfor %}{{ ns.n }}{% if add_generation_prompt %}>>{{ pad_token }}{{ unk_token }}{% endif %}")


@pytest.fixture(scope="module")
def folder(smol) -> Path:
    return Path(smol.tokenizer.name_or_path)


@pytest.fixture(scope="module")
def pair(folder):
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    return LeanTokenizer(folder), TokenizersBackend.from_pretrained(str(folder), local_files_only=True)


def test_the_builtin_model_loads_the_lean_tokenizer(smol, folder):
    assert supported(folder) is None
    # CHUNKTUI_MODEL_CODE=transformers sends every model, its tokenizer included, to transformers
    via_transformers = os.environ.get("CHUNKTUI_MODEL_CODE", "").strip().lower() == "transformers"
    assert type(smol.tokenizer).__name__ == ("TokenizersBackend" if via_transformers else "LeanTokenizer")


def test_loading_the_builtin_model_imports_no_transformers():
    """In a fresh interpreter: load_model on the built-in model, then no transformers module is imported."""
    code = ("import sys, torch\nfrom chunktui.engine.models import load_model\n"
            "loaded = load_model('smollm2-135m', device='cpu')\n"
            "print(loaded.model_code, type(loaded.tokenizer).__name__,"
            " sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.')))")
    env = {k: v for k, v in os.environ.items() if k != "CHUNKTUI_MODEL_CODE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["chunktui-llama", "LeanTokenizer", "[]"], out.stdout


def test_special_tokens_vocabulary_and_template_equal(pair):
    lean, hf = pair
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        assert getattr(lean, name) == getattr(hf, name), name
        assert getattr(lean, name + "_id") == getattr(hf, name + "_id"), name
    assert lean.bos_token_id is not None and lean.eos_token_id is not None and lean.pad_token_id is not None
    assert lean.special_tokens_map == hf.special_tokens_map
    assert (len(lean), lean.vocab_size, lean.model_max_length) == (len(hf), hf.vocab_size, hf.model_max_length)
    assert lean.chat_template == hf.chat_template and lean.chat_template
    assert lean.get_vocab() == hf.get_vocab()
    assert lean.convert_ids_to_tokens([0, 1, 500, 49151]) == hf.convert_ids_to_tokens([0, 1, 500, 49151])
    assert lean.backend_tokenizer.to_str() == hf.backend_tokenizer.to_str()


def _same_encoding(lean, hf, text, **kwargs):
    a, b = lean(text, **kwargs), hf(text, **kwargs)
    assert dict(a) == {key: b[key] for key in b.keys()}, text
    assert a.input_ids == b.input_ids


@pytest.mark.parametrize("special", [False, True])
def test_encoding_equal_on_varied_texts(pair, special):
    lean, hf = pair
    for text in TEXTS:
        _same_encoding(lean, hf, text, add_special_tokens=special)
        _same_encoding(lean, hf, text, add_special_tokens=special, return_offsets_mapping=True)
    _same_encoding(lean, hf, TEXTS, add_special_tokens=special, return_offsets_mapping=True)  # a batch
    assert lean.encode("Hi there") == hf.encode("Hi there")


_piece = st.one_of(st.text(max_size=12), st.sampled_from(SPECIALS + ["\n", "   ", "\t", "é", "👍🏽", "'s", "日本"]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=st.lists(st.lists(_piece, max_size=8).map("".join), min_size=1, max_size=3))
def test_encoding_equal_on_generated_texts(pair, texts):
    lean, hf = pair
    _same_encoding(lean, hf, texts[0], add_special_tokens=False, return_offsets_mapping=True)
    _same_encoding(lean, hf, texts, add_special_tokens=False, return_offsets_mapping=True)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.one_of(st.integers(0, 49151), st.integers(0, 16)), max_size=40), skip=st.booleans())
def test_decode_equal_on_generated_ids(pair, ids, skip):
    lean, hf = pair
    assert lean.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_decode_forms_equal(pair):
    lean, hf = pair
    ids = hf("<|im_start|>user\nCafé 👍🏽 ok<|im_end|>", add_special_tokens=False)["input_ids"]
    for skip in (False, True):
        for form in (ids, tuple(ids), torch.tensor(ids), ids[0], [ids, ids[:3], []]):
            assert lean.decode(form, skip_special_tokens=skip) == hf.decode(form, skip_special_tokens=skip)
    assert lean.batch_decode([ids, ids[2:]]) == hf.batch_decode([ids, ids[2:]])
    assert [lean.decode([i]) for i in ids] == [hf.decode([i]) for i in ids]  # pieces, split multi-byte chars too


def test_chat_template_equal(pair):
    lean, hf = pair
    for chat in CHATS:
        for gen in (True, False):
            assert lean.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False) == \
                hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            a = lean.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            b = hf.apply_chat_template(chat, add_generation_prompt=gen, tokenize=True)
            assert dict(a) == {key: b[key] for key in b.keys()}
            assert lean.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False) == \
                hf.apply_chat_template(chat, add_generation_prompt=gen, return_dict=False)
    assert lean.apply_chat_template(CHATS, tokenize=False) == hf.apply_chat_template(CHATS, tokenize=False)
    batch_a, batch_b = lean.apply_chat_template(CHATS[:2]), hf.apply_chat_template(CHATS[:2])
    assert batch_a["input_ids"] == batch_b["input_ids"]


def test_the_sandbox_extras_render_as_in_transformers(pair):
    lean, hf = pair
    chat = CHATS[2] + [{"role": "stop", "content": "x"}, {"role": "user", "content": "never"}]
    for gen in (True, False):
        text = lean.apply_chat_template(chat, chat_template=TEMPLATE, add_generation_prompt=gen, tokenize=False)
        assert text == hf.apply_chat_template(chat, chat_template=TEMPLATE, add_generation_prompt=gen, tokenize=False)
        assert "never" not in text and '"Hello! 👋"' in text
    bad = "{{ raise_exception('no system role') }}"
    with pytest.raises(Exception, match="no system role") as lean_err:
        lean.apply_chat_template(CHATS[0], chat_template=bad)
    with pytest.raises(Exception, match="no system role") as hf_err:
        hf.apply_chat_template(CHATS[0], chat_template=bad)
    assert type(lean_err.value) is type(hf_err.value)
    with pytest.raises(Exception, match="underscore"):
        lean.apply_chat_template(CHATS[0], chat_template="{% set ns = namespace(_x=1) %}")


def test_detokenizer_streams_equal(pair):
    from chunktui.engine.tokens import Detokenizer

    lean, hf = pair
    ids = hf("<|im_start|>assistant\nÜber 👨‍👩‍👧‍👦 日本語 ok.<|im_end|>\n" + TEXTS[4], add_special_tokens=False)["input_ids"]
    streams = []
    for tok in (lean, hf):
        detok = Detokenizer(tok)
        streams.append(([detok.add(i) for i in ids], detok.text))
    assert streams[0] == streams[1]
    assert streams[0][1] == hf.decode(ids)


def test_pad_token_setter_and_unsupported_arguments(folder):
    tok = LeanTokenizer(folder)
    tok.pad_token = tok.eos_token  # what load_model does when a tokenizer has none
    assert tok.pad_token_id == tok.eos_token_id
    tok.pad_token = None
    assert tok.pad_token_id is None
    with pytest.raises(UnsupportedTokenizer, match="not in the vocabulary"):
        tok.pad_token = "<|no such token|>"
    with pytest.raises(NotImplementedError, match="transformers"):
        tok("text", padding=True)
    with pytest.raises(NotImplementedError, match="transformers"):
        tok.apply_chat_template(CHATS[0], continue_final_message=True)
    with pytest.raises(NotImplementedError, match="transformers"):
        tok.decode([1, 2], clean_up_tokenization_spaces=True)
    with pytest.raises(AttributeError):
        tok.save_pretrained  # noqa: B018 - not on the lean path: a clear AttributeError, not a silent stub


def _copy(folder: Path, tmp: Path) -> Path:
    tmp.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (folder / name).exists():
            shutil.copy(folder / name, tmp / name)
    return tmp


def test_folders_it_cannot_reproduce_fall_back_to_transformers(folder, tmp_path):
    from chunktui.engine.lean import load_tokenizer

    assert type(load_tokenizer(folder)).__name__ == "LeanTokenizer"
    bos = _copy(folder, tmp_path / "bos")
    config = json.loads((bos / "tokenizer_config.json").read_text())
    (bos / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    assert "add_bos_token" in supported(bos)
    with pytest.raises(UnsupportedTokenizer):
        LeanTokenizer(bos)
    fallback = load_tokenizer(bos)
    assert type(fallback).__name__ == "TokenizersBackend"
    trunc = _copy(folder, tmp_path / "trunc")
    doc = json.loads((trunc / "tokenizer.json").read_text())
    doc["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    (trunc / "tokenizer.json").write_text(json.dumps(doc))
    assert supported(trunc) is None
    with pytest.raises(UnsupportedTokenizer, match="truncation"):
        LeanTokenizer(trunc)
    assert type(load_tokenizer(trunc)).__name__ == "TokenizersBackend"
    both = _copy(folder, tmp_path / "both")
    (both / "special_tokens_map.json").write_text("{}")
    assert "special_tokens_map.json" in supported(both)
