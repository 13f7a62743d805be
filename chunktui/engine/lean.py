"""The LLaMA forward pass without importing transformers' modelling code: the built-in model in under 3 s.

Importing `transformers.models.llama.modeling_llama` costs about 1.5 s on a
2-core machine (it pulls torch.distributed.tensor, torch._dynamo and sympy), more
than half of the app's start. For a plain LLaMA checkpoint (the built-in
SmolLM2, and any folder of the same form) this module computes the same
forward pass with the same modules, parameter names and operations, in the
same order, as transformers' `LlamaForCausalLM` with its default SDPA
attention: RMSNorm in float32, rotary embeddings, the same attention mask
rules (none when nothing is padded, SDPA's own causal flag, grouped-query
attention as transformers dispatches it) and the same KV cache.

It is checked against transformers (tests/unit/test_lean_llama.py: every
hidden state and logit equal, bit for bit, on CPU in float32 and bfloat16,
with and without padding and cache; tests/integration/test_lean_builtin.py on
the built-in model). Everything else (other architectures, rope scaling,
biases, device maps, quantised or sharded checkpoints) goes through
transformers as before, and `CHUNKTUI_MODEL_CODE=transformers` sends every
model there.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

ENV = "CHUNKTUI_MODEL_CODE"

# config keys whose presence (with a non-default value) sends a model to transformers
_UNSUPPORTED = ("quantization_config", "rope_scaling", "sliding_window", "layer_types")


class LeanConfig(SimpleNamespace):
    """The checkpoint's config.json as attributes (what the engine reads of `model.config`)."""

    def to_dict(self) -> dict:
        return dict(vars(self))

    def get_text_config(self) -> "LeanConfig":
        return self


def supported(folder: Path) -> str | None:
    """None if `folder` holds a checkpoint this module computes exactly; else why not (for the model card)."""
    if os.environ.get(ENV, "").strip().lower() == "transformers":
        return f"{ENV}=transformers"
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        tok_config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable config.json / tokenizer_config.json"
    if config.get("model_type") != "llama" or config.get("architectures") != ["LlamaForCausalLM"]:
        return "not a LlamaForCausalLM checkpoint"
    if tok_config.get("tokenizer_class") != "TokenizersBackend" or not (folder / "tokenizer.json").is_file():
        return "tokenizer is not a plain tokenizer.json"
    if not (folder / "model.safetensors").is_file():
        return "weights are not one model.safetensors file"
    rope = config.get("rope_parameters") or {"rope_type": "default"}
    if rope.get("rope_type", "default") != "default" or "rope_theta" not in rope:
        return "rope scaling or rope settings outside rope_parameters"
    if any(config.get(key) for key in _UNSUPPORTED):
        return "quantised, rope-scaled or sliding-window config"
    if config.get("attention_bias") or config.get("mlp_bias") or config.get("hidden_act", "silu") != "silu":
        return "biases or a non-SiLU activation"
    if config.get("pretraining_tp", 1) != 1:
        return "pretraining_tp"
    return None


def load(folder: Path, dtype: torch.dtype, device: torch.device):
    """(model, tokenizer) from a supported folder, the weights read straight onto `device` in `dtype`."""
    from safetensors.torch import load_file

    config = LeanConfig(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
    config.dtype = str(dtype).replace("torch.", "")
    config._attn_implementation = "sdpa"
    tokenizer = load_tokenizer(folder)
    # read on the host, then one copy per tensor straight to the device in the model's dtype (no float32
    # staging on the GPU)
    state = load_file(str(folder / "model.safetensors"))
    model = LlamaForCausalLM(config)  # every parameter an empty meta tensor until the weights are assigned
    model.load_state(state, dtype=dtype, device=device)
    model.generation_config = _generation_config(folder, config)
    return model.eval(), tokenizer


def load_tokenizer(folder: Path):
    """The folder's tokenizer: LeanTokenizer (no transformers import, checked equal to transformers'
    TokenizersBackend) where it reproduces the folder exactly, else transformers' TokenizersBackend."""
    from chunktui.engine.lean_tokenizer import LeanTokenizer, UnsupportedTokenizer

    try:
        return LeanTokenizer(folder)
    except UnsupportedTokenizer:
        from chunktui.engine.quiet import quiet_transformers
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        quiet_transformers()
        return TokenizersBackend.from_pretrained(str(folder), local_files_only=True)


def _generation_config(folder: Path, config: LeanConfig) -> SimpleNamespace:
    """generation_config.json if the folder has one, else the config's token ids (as transformers derives it)."""
    try:
        doc = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = {}
    return SimpleNamespace(**{key: doc.get(key, getattr(config, key, None))
                              for key in ("bos_token_id", "eos_token_id", "pad_token_id")})


# ---------------------------------------------------------------------------------------------------- modules


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """An nn.Linear (no bias) whose weight is an empty meta tensor: no random init, which on the meta device
    would import torch._dynamo (2 s); the checkpoint's weights are assigned afterwards."""
    layer = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(layer)
    layer.in_features, layer.out_features = in_features, out_features
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, device="meta"))
    layer.register_parameter("bias", None)
    return layer


def _embedding(num: int, dim: int, padding_idx: int | None) -> nn.Embedding:
    return nn.Embedding(num, dim, padding_idx, _weight=torch.empty(num, dim, device="meta"))


class LlamaRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, device="meta"))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class LlamaRotaryEmbedding(nn.Module):
    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        base = config.rope_parameters["rope_theta"]
        dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.dim, self.base = dim, base
        self.register_buffer("inv_freq", torch.empty(dim // 2, device="meta"), persistent=False)

    def _inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device="cpu") / self.dim))

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype=x.dtype), emb.sin().to(dtype=x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _repeat_kv(states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, kv_heads, length, head_dim = states.shape
    states = states[:, :, None, :, :].expand(batch, kv_heads, n_rep, length, head_dim)
    return states.reshape(batch, kv_heads * n_rep, length, head_dim)


class LlamaMLP(nn.Module):
    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        self.gate_proj = _linear(config.hidden_size, config.intermediate_size)
        self.up_proj = _linear(config.hidden_size, config.intermediate_size)
        self.down_proj = _linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaAttention(nn.Module):
    def __init__(self, config: LeanConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.q_proj = _linear(config.hidden_size, heads * self.head_dim)
        self.k_proj = _linear(config.hidden_size, kv_heads * self.head_dim)
        self.v_proj = _linear(config.hidden_size, kv_heads * self.head_dim)
        self.o_proj = _linear(heads * self.head_dim, config.hidden_size)

    def forward(self, hidden_states, position_embeddings, attention_mask, cache):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        query = (query * cos) + (_rotate_half(query) * sin)
        key = (key * cos) + (_rotate_half(key) * sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        out = _sdpa(query, key, value, attention_mask, self.num_key_value_groups, self.scaling)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())


def _sdpa(query, key, value, mask, groups: int, scaling: float) -> torch.Tensor:
    """transformers' sdpa_attention_forward for a causal decoder, step for step."""
    kwargs = {}
    q_length = query.shape[2]
    if groups > 1:
        if mask is None and key.shape[-1] == value.shape[-1] <= 256:
            kwargs["enable_gqa"] = True
        elif q_length == 1:  # one query: run on the key/value heads, the query heads as rows (the mask is shared)
            batch, heads, _, dim = query.shape
            query = query.reshape(batch, heads // groups, groups, dim)
        else:
            key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    is_causal = q_length > 1 and mask is None
    if is_causal and key.shape[2] > q_length:
        key, value = key[:, :, :q_length, :], value[:, :, :q_length, :]
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, scale=scaling,
                                         is_causal=is_causal, **kwargs)
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1])
    return out.transpose(1, 2).contiguous()


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LeanConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, cache=None) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states = residual + self.self_attn(hidden_states, position_embeddings, attention_mask, cache)
        residual = hidden_states
        return residual + self.mlp(self.post_attention_layernorm(hidden_states))


class KVCache:
    """transformers' DynamicCache for full attention: keys and values of every layer, the same tensors' values.

    DynamicCache concatenates: every token copies the whole cache, 2 x layers x (tokens so far) rows, 46 MB
    a token for the built-in model at 1,000 tokens. Here each layer's keys and values live in buffers with
    room to grow (`room_for`: at least a block of BLOCK tokens more each time they fill), a token writes its
    own row, and attention reads a view of the rows written: the same values in the same order, so the same results
    (tests/unit/test_lean_llama.py checks every state and logit against transformers, bit for bit).
    """

    BLOCK = 256

    def __init__(self, n_layers: int) -> None:
        self.keys: list[torch.Tensor | None] = [None] * n_layers  # views of the rows written
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self._key_room: list[torch.Tensor | None] = [None] * n_layers
        self._value_room: list[torch.Tensor | None] = [None] * n_layers

    @classmethod
    def room_for(cls, tokens: int) -> int:
        """The rows a layer's buffers get when `tokens` rows must fit: room for a block more, rounded up to whole
        blocks. Also the most they hold with `tokens` rows written, however the rows came (the memory figures'
        KV cache): a buffer only grows when a row does not fit, and then to room_for of that row count."""
        return 0 if tokens <= 0 else -(-(tokens + cls.BLOCK) // cls.BLOCK) * cls.BLOCK

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        done = self.get_seq_length(layer_idx)
        total = done + key.shape[-2]
        room = self._key_room[layer_idx]
        if room is None or total > room.shape[-2]:
            size = self.room_for(total)
            key_room = key.new_empty((*key.shape[:-2], size, key.shape[-1]))
            value_room = value.new_empty((*value.shape[:-2], size, value.shape[-1]))
            if done:
                key_room[..., :done, :].copy_(self.keys[layer_idx])
                value_room[..., :done, :].copy_(self.values[layer_idx])
            self._key_room[layer_idx], self._value_room[layer_idx] = key_room, value_room
        key_room, value_room = self._key_room[layer_idx], self._value_room[layer_idx]
        key_room[..., done:total, :].copy_(key)
        value_room[..., done:total, :].copy_(value)
        self.keys[layer_idx], self.values[layer_idx] = key_room[..., :total, :], value_room[..., :total, :]
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        keys = self.keys[layer_idx]
        return 0 if keys is None else keys.shape[-2]


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    cache: KVCache | None = None

    @property
    def past_key_values(self) -> KVCache | None:
        return self.cache


def _causal_mask(attention_mask: torch.Tensor | None, batch: int, q_length: int, past: int,
                 device: torch.device) -> torch.Tensor | None:
    """transformers' create_causal_mask for SDPA: None where SDPA's own causal flag (or nothing) is exact, else
    a boolean (B, 1, q, kv) mask, True where a query may attend."""
    kv_length = past + q_length
    padding = None
    if attention_mask is not None:
        padding = attention_mask.to(device=device, dtype=torch.bool)
        if padding.shape[-1] < kv_length:
            padding = F.pad(padding, (0, kv_length - padding.shape[-1]))
        elif padding.shape[-1] > kv_length:
            padding = padding[:, :kv_length]
    if (q_length == 1 or kv_length == q_length) and (padding is None or bool(padding.all())):
        return None
    if past == 0 and (padding is None or (bool(padding[:, :q_length].all())
                                          and bool((~padding[:, q_length:]).all()))):
        return None
    q_index = torch.arange(q_length, device=device) + past
    kv_index = torch.arange(kv_length, device=device)
    mask = (kv_index[None, None, None, :] <= q_index[None, None, :, None])
    if padding is not None:
        mask = mask & padding[:, None, None, :]
    return mask.expand(batch, -1, q_length, kv_length)


class LlamaModel(nn.Module):
    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        self.config = config
        self.padding_idx = getattr(config, "pad_token_id", None)
        self.embed_tokens = _embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
        hidden = self.embed_tokens(input_ids)
        if use_cache is None:
            use_cache = getattr(self.config, "use_cache", True)
        if use_cache and cache is None:
            cache = KVCache(len(self.layers))
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)
        if attention_mask is None and cache is None and position_ids.shape[-1] > 1:
            _refuse_packed(position_ids.expand(hidden.shape[0], -1))
        mask = _causal_mask(attention_mask, hidden.shape[0], hidden.shape[1], past, hidden.device)
        position_embeddings = self.rotary_emb(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings, cache=cache)
        return self.norm(hidden), cache


def _refuse_packed(position_ids: torch.Tensor) -> None:
    """transformers reads position ids that restart within a row (without a mask) as packed sequences; the
    engine never feeds those, and this module does not imitate it."""
    diff = torch.diff(position_ids, prepend=position_ids[:, :1] - 1, dim=-1)
    if bool((diff != 1).any()):
        raise ValueError("packed sequences (position ids restarting within a row) need the transformers model code")


class LlamaForCausalLM(nn.Module):
    """Parameter for parameter the module tree of transformers' LlamaForCausalLM (hooks and names carry over)."""

    def __init__(self, config: LeanConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = _linear(config.hidden_size, config.vocab_size)
        self.generation_config = None

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def load_state(self, state: dict[str, torch.Tensor], dtype: torch.dtype, device: torch.device) -> None:
        """Fill the (meta) parameters from a state dict: every weight present, none left over, shapes checked."""
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        if tied:
            state = {k: v for k, v in state.items() if k != "lm_head.weight"}
        expected = {name for name, _ in self.named_parameters() if not (tied and name == "lm_head.weight")}
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or extra:
            raise KeyError(f"weights do not fit the config: missing {missing[:4]}, unexpected {extra[:4]}")
        # a shape that does not fit the config is refused here (size mismatch)
        self.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=False,
                             assign=True)
        if tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        # as transformers initialises the buffer: computed on the CPU, then copied to the device
        self.model.rotary_emb.inv_freq = self.model.rotary_emb._inv_freq().to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                use_cache: bool | None = None, logits_to_keep: int = 0,
                past_key_values: KVCache | None = None) -> CausalLMOutput:
        hidden, cache = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   cache=cache if cache is not None else past_key_values, use_cache=use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:, :]
        return CausalLMOutput(logits=self.lm_head(hidden), cache=cache)


def transformers_twin(model: nn.Module) -> nn.Module:
    """transformers' own LlamaForCausalLM over the same parameters (shared, not copied): the reference a test
    or a benchmark compares with (`generate`, the forward pass). Any other model is returned as it is."""
    if not isinstance(model, LlamaForCausalLM):
        return model
    from transformers import GenerationConfig, LlamaConfig
    from transformers import LlamaForCausalLM as Reference

    config = LlamaConfig(**{k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "dtype"})
    with torch.device("meta"):
        twin = Reference(config)
    twin.load_state_dict(dict(model.state_dict()), strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        twin.lm_head.weight = twin.model.embed_tokens.weight
    inv_freq = twin.model.rotary_emb.compute_default_rope_parameters(config)[0]
    twin.model.rotary_emb.inv_freq = inv_freq.to(model.model.rotary_emb.inv_freq.device)
    twin.model.rotary_emb.original_inv_freq = twin.model.rotary_emb.inv_freq.clone()
    gen = model.generation_config
    twin.generation_config = GenerationConfig(bos_token_id=gen.bos_token_id, eos_token_id=gen.eos_token_id,
                                              pad_token_id=gen.pad_token_id)
    return twin.eval()
