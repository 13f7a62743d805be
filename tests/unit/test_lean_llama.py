"""engine.lean computes transformers' LlamaForCausalLM forward exactly (a tiny random checkpoint, CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from chunktui.engine import lean
from chunktui.engine.hooks import ResidualRecorder
from chunktui.engine.layout import find_layout
from chunktui.engine.models import load_model
from chunktui.engine.streaming import left_pad
from chunktui.shared.errors import ModelLoadError


def _save_random_llama(folder, *, tie: bool, seed: int = 0, **overrides) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from chunktui.engine.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=tie, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a norm that is skipped or misplaced shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama-tied" if request.param else "llama-untied")
    _save_random_llama(folder, tie=request.param)
    return folder


def _both(folder, dtype):
    from transformers import AutoModelForCausalLM

    ours, tokenizer = lean.load(folder, dtype, torch.device("cpu"))
    theirs = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
    return ours, theirs, tokenizer


def _run(model, rows, pad_id):
    """Prefill a left-padded batch with states recorded, then 3 greedy decode steps on the cache, then the
    same rows without mask or cache, then logits_to_keep=1: every output of the forward pass the engine uses."""
    out = []
    ids, mask = left_pad(rows, pad_id)
    position = (mask.cumsum(-1) - 1).clamp(min=0)
    layout = find_layout(model)
    with torch.no_grad():
        with ResidualRecorder(layout) as rec:
            step = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True)
        out += [rec.states(), step.logits]
        cache = step.cache
        nxt, pos = step.logits[:, -1].argmax(-1)[:, None], position[:, -1:] + 1
        for _ in range(3):
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            with ResidualRecorder(layout) as rec:
                step = model(input_ids=nxt, attention_mask=mask, position_ids=pos, use_cache=True, cache=cache)
            out += [rec.states(), step.logits]
            cache, nxt, pos = step.cache, step.logits[:, -1].argmax(-1)[:, None], pos + 1
        out.append(model(input_ids=torch.tensor([rows[0]]), use_cache=False).logits)
        out.append(model(input_ids=torch.tensor([rows[0]])).logits)  # use_cache from the config, no mask
        out.append(model(input_ids=ids, attention_mask=mask[:, :ids.shape[1]], position_ids=position,
                         use_cache=False, logits_to_keep=1).logits)
        # as the corpus pass feeds it: right-padded rows, a mask, no positions, no cache, the states recorded
        right = torch.full_like(ids, pad_id)
        right_mask = torch.zeros_like(ids)
        for k, row in enumerate(rows):
            right[k, :len(row)], right_mask[k, :len(row)] = torch.tensor(row), 1
        with ResidualRecorder(layout) as rec:
            step = model(input_ids=right, attention_mask=right_mask, use_cache=False, logits_to_keep=1)
        out += [rec.states(), step.logits]
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_every_state_and_logit_equals_transformers(checkpoint, dtype):
    ours, theirs, tokenizer = _both(checkpoint, dtype)
    texts = ["The cheese was on the table next to the cake.", "A dog", "Three dogs, ten cats and one horse"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert len({len(r) for r in rows}) == 3  # padding in two rows of three
    a, b = _run(ours, rows, tokenizer.pad_token_id), _run(theirs, rows, tokenizer.pad_token_id)
    assert len(a) == len(b) == 13
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype == dtype
        assert x.shape == y.shape, i
        assert torch.equal(x, y), f"output {i} differs by {(x.float() - y.float()).abs().max().item():.3g}"


def test_the_cache_across_its_blocks_equals_transformers(checkpoint, monkeypatch):
    """Blocks of 2 rows: the prefill and every decode step cross a block's end; results stay bit-identical."""
    monkeypatch.setattr(lean.KVCache, "BLOCK", 2)
    ours, theirs, tokenizer = _both(checkpoint, torch.float32)
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in ["The cheese on the table.", "A dog"]]
    a, b = _run(ours, rows, tokenizer.pad_token_id), _run(theirs, rows, tokenizer.pad_token_id)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_cache_writes_each_token_in_place_and_grows_by_blocks(monkeypatch):
    """A token writes its own row (no copy of the cache) until the room is full; the views hold every row."""
    monkeypatch.setattr(lean.KVCache, "BLOCK", 4)
    torch.manual_seed(0)
    cache = lean.KVCache(2)
    prompt = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    cache.update(*prompt, 1)
    keys, values, rooms = [prompt[0]], [prompt[1]], set()
    for _ in range(17):
        key, value = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
        k, v = cache.update(key, value, 1)
        keys.append(key)
        values.append(value)
        rooms.add(k.untyped_storage().data_ptr())
        assert torch.equal(k, torch.cat(keys, dim=-2)) and torch.equal(v, torch.cat(values, dim=-2))
        # the memory figures count room_for(rows): never less than the buffers hold
        assert cache._key_room[1].shape[-2] <= lean.KVCache.room_for(k.shape[-2])
    assert cache.get_seq_length(1) == 20 and cache.get_seq_length(0) == 0
    assert len(rooms) == 3  # rooms of 8, 16 and 24 rows (each a block past what it had to hold): 2 copies, not 17


def test_memory_figures_count_the_caches_room(checkpoint, monkeypatch):
    """The model card's KV cache: the lean cache's buffers with their room to grow, transformers' rows as they are."""
    from chunktui.engine.memory import estimate_run, kv_bytes_per_token, memory_report

    loaded = load_model(str(checkpoint), device="cpu")
    per_token = kv_bytes_per_token(loaded)["cpu"]
    block = lean.KVCache.BLOCK
    for tokens, rows in [(0, 0), (1, 2 * block), (block, 2 * block), (block + 1, 3 * block)]:
        (row,) = memory_report(loaded, kv_tokens=tokens)
        assert row.kv_cache == per_token * rows, tokens
    assert estimate_run(loaded, 10, 20)["cpu"]["kv_cache"] == per_token * 2 * block
    assert estimate_run(loaded, 10, 20, cached=False)["cpu"]["kv_cache"] == 0  # a scan or corpus pass: no cache
    monkeypatch.setenv(lean.ENV, "transformers")
    plain = load_model(str(checkpoint), device="cpu")
    (row,) = memory_report(plain, kv_tokens=block + 1)
    assert row.kv_cache == per_token * (block + 1)


def test_same_parameters_names_and_ties(checkpoint):
    ours, theirs, _ = _both(checkpoint, torch.float32)
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    tied = json.loads((checkpoint / "config.json").read_text())["tie_word_embeddings"]
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == tied
    assert not any(p.is_meta for p in ours.parameters()) and not ours.model.rotary_emb.inv_freq.is_meta
    assert torch.equal(ours.model.rotary_emb.inv_freq, theirs.model.rotary_emb.inv_freq)


def test_load_model_uses_it_and_says_so(checkpoint, monkeypatch):
    loaded = load_model(str(checkpoint), device="cpu")
    assert loaded.model_code == "chunktui-llama" and loaded.card()["model_code"] == "chunktui-llama"
    assert loaded.layout.n_layers == 3
    monkeypatch.setenv(lean.ENV, "transformers")
    again = load_model(str(checkpoint), device="cpu")
    assert again.model_code == "transformers" and type(again.model).__module__.startswith("transformers.")
    assert again.fingerprint == loaded.fingerprint


def test_other_checkpoints_go_to_transformers(tmp_path):
    assert lean.supported(tmp_path) is not None  # nothing there
    folder = tmp_path / "scaled"
    _save_random_llama(folder, tie=True)
    assert lean.supported(folder) is None
    config = json.loads((folder / "config.json").read_text())
    for change, reason in [({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}, "rope"),
                           ({"attention_bias": True}, "bias"), ({"model_type": "mistral"}, "Llama"),
                           ({"hidden_act": "gelu"}, "SiLU")]:
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        assert reason in lean.supported(folder)
    (folder / "config.json").write_text(json.dumps(config))
    assert load_model(str(folder), device="cpu", device_map="sequential").model_code == "transformers"


def test_weights_that_do_not_fit_the_config_are_a_load_error(tmp_path):
    folder = tmp_path / "misfit"
    _save_random_llama(folder, tie=True)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    with pytest.raises(ModelLoadError, match="size mismatch|shape"):
        load_model(str(folder), device="cpu")
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(str(folder), device="cpu")


def test_packed_position_ids_are_refused_not_silently_wrong(checkpoint):
    ours, _, _ = _both(checkpoint, torch.float32)
    with pytest.raises(ValueError, match="packed"):
        ours(input_ids=torch.tensor([[5, 6, 7, 8]]), position_ids=torch.tensor([[0, 1, 0, 1]]), use_cache=False)
