"""transformers' `TokenizersBackend` for a plain tokenizer.json, without importing transformers (0.8 s of start-up).

The built-in model's tokenizer is a `tokenizers` serialisation (tokenizer.json)
plus tokenizer_config.json and a jinja chat template. transformers 5 loads such
a folder as `TokenizersBackend`: the Rust tokenizer from tokenizer.json
unchanged (its own post-processor, no truncation or padding, special tokens not
split), the named special tokens from the config, and the chat template rendered
in a jinja sandbox. `LeanTokenizer` gives the same results for everything the
engine uses: `tok(text or list, add_special_tokens=..., return_offsets_mapping=...)`,
`decode`, `batch_decode`, `apply_chat_template`, the special tokens and their
ids, `backend_tokenizer` (for DecodeStream), `len`, `vocab_size`,
`model_max_length`. tests/integration/test_lean_tokenizer.py checks it against
transformers on the built-in model's folder.

Folders it cannot reproduce exactly (`supported` gives the reason) and
arguments it does not implement (a clear error) go to transformers; the loader
(engine.lean) falls back to `TokenizersBackend` for the former.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# tokenizer_config.json keys whose meaning LeanTokenizer reproduces (anything else: transformers)
_CONFIG_KEYS = {"backend", "tokenizer_class", "is_local", "local_files_only", "model_max_length", "chat_template",
                "clean_up_tokenization_spaces", "name_or_path", *SPECIAL_TOKENS}
# transformers' VERY_LARGE_INTEGER, the model_max_length of a tokenizer that does not say
_NO_LIMIT = int(1e30)
_MISTRAL_VOCAB = 100_000  # above this transformers may patch the pre-tokenizer's regex (Mistral checkpoints)


class UnsupportedTokenizer(ValueError):
    """The folder's tokenizer needs transformers (the message says why)."""


def supported(folder: Path) -> str | None:
    """None if LeanTokenizer loads `folder` exactly as transformers' TokenizersBackend does; else why not.

    The cheap checks (files and tokenizer_config.json); those that need tokenizer.json run in
    LeanTokenizer(), which raises UnsupportedTokenizer."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "no readable tokenizer_config.json"
    if not isinstance(config, dict) or config.get("tokenizer_class") != "TokenizersBackend":
        return "tokenizer_class is not TokenizersBackend"
    if not (folder / "tokenizer.json").is_file():
        return "no tokenizer.json"
    extra = sorted(set(config) - _CONFIG_KEYS)
    if extra:
        return f"tokenizer_config.json sets {', '.join(extra)}"
    for name in ("special_tokens_map.json", "added_tokens.json", "additional_chat_templates"):
        if (folder / name).exists():
            return f"the folder has {name}"
    for name in SPECIAL_TOKENS:
        if not isinstance(config.get(name), (str, type(None))):
            return f"{name} is not a plain string"
    if config.get("clean_up_tokenization_spaces"):
        return "clean_up_tokenization_spaces"
    if "chat_template" in config and (folder / "chat_template.jinja").exists():
        return "a chat template in both tokenizer_config.json and chat_template.jinja"
    if not isinstance(config.get("chat_template"), (str, type(None))):
        return "several named chat templates"
    if not isinstance(config.get("model_max_length", _NO_LIMIT), (int, float)):
        return "model_max_length is not a number"
    return None


class Encoding(dict):
    """transformers' BatchEncoding as the engine reads it: keys, and the same values as attributes."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class LeanTokenizer:
    """A tokenizer.json tokenizer with transformers' TokenizersBackend interface (the part the engine uses)."""

    is_fast = True
    padding_side = "right"
    truncation_side = "right"
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        folder = Path(folder)
        reason = supported(folder)
        if reason is not None:
            raise UnsupportedTokenizer(reason)
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        if tokenizer.truncation is not None or tokenizer.padding is not None:
            raise UnsupportedTokenizer("tokenizer.json sets truncation or padding")
        if tokenizer.post_processor is None:
            raise UnsupportedTokenizer("tokenizer.json has no post-processor (transformers writes one)")
        if tokenizer.get_vocab_size(with_added_tokens=False) > _MISTRAL_VOCAB:
            raise UnsupportedTokenizer("a vocabulary over 100k (transformers may patch its pre-tokenizer)")
        added = tokenizer.get_added_tokens_decoder()
        special = {token.content: token for token in added.values() if token.special}
        self._special: dict[str, str] = {}
        for name in SPECIAL_TOKENS:
            value = config.get(name)
            if value is None:
                continue
            token = special.get(value)
            if token is None or token.normalized or token.lstrip or token.rstrip or token.single_word:
                # transformers would add it (or change its flags) as a special token
                raise UnsupportedTokenizer(f"{name} {value!r} is not a plain special token of tokenizer.json")
            self._special[name] = value
        tokenizer.encode_special_tokens = False  # transformers' split_special_tokens=False
        self._tokenizer = tokenizer
        self._special_ids = {i for i, token in added.items() if token.special}
        self.name_or_path = str(folder)
        self.model_max_length = int(config.get("model_max_length", _NO_LIMIT))
        self.clean_up_tokenization_spaces = False
        template_file = folder / "chat_template.jinja"
        self.chat_template: str | None = (template_file.read_text(encoding="utf-8") if template_file.is_file()
                                          else config.get("chat_template"))
        self._compiled: tuple[str, Any] | None = None

    # ------------------------------------------------------------------ vocabulary and special tokens

    @property
    def backend_tokenizer(self):
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {name: self._special[name] for name in SPECIAL_TOKENS if name in self._special}

    @property
    def all_special_ids(self) -> list[int]:
        return sorted(self._special_ids)

    def convert_tokens_to_ids(self, tokens: str | list[str]):
        if isinstance(tokens, str):
            return self._tokenizer.token_to_id(tokens)
        return [self._tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        return [self._tokenizer.id_to_token(int(i)) for i in ids
                if not (skip_special_tokens and int(i) in self._special_ids)]

    def _set_special(self, name: str, value: str | None) -> None:
        if value is not None:
            value = str(value)
            if self._tokenizer.token_to_id(value) is None:
                raise UnsupportedTokenizer(f"{value!r} is not in the vocabulary: adding tokens needs transformers")
            self._special[name] = value
        else:
            self._special.pop(name, None)

    def _token_id(self, name: str) -> int | None:
        value = self._special.get(name)
        return None if value is None else self._tokenizer.token_to_id(value)

    bos_token = property(lambda self: self._special.get("bos_token"), lambda self, v: self._set_special("bos_token", v))
    eos_token = property(lambda self: self._special.get("eos_token"), lambda self, v: self._set_special("eos_token", v))
    unk_token = property(lambda self: self._special.get("unk_token"), lambda self, v: self._set_special("unk_token", v))
    sep_token = property(lambda self: self._special.get("sep_token"), lambda self, v: self._set_special("sep_token", v))
    pad_token = property(lambda self: self._special.get("pad_token"), lambda self, v: self._set_special("pad_token", v))
    cls_token = property(lambda self: self._special.get("cls_token"), lambda self, v: self._set_special("cls_token", v))
    mask_token = property(lambda self: self._special.get("mask_token"),
                          lambda self, v: self._set_special("mask_token", v))
    bos_token_id = property(lambda self: self._token_id("bos_token"))
    eos_token_id = property(lambda self: self._token_id("eos_token"))
    unk_token_id = property(lambda self: self._token_id("unk_token"))
    sep_token_id = property(lambda self: self._token_id("sep_token"))
    pad_token_id = property(lambda self: self._token_id("pad_token"))
    cls_token_id = property(lambda self: self._token_id("cls_token"))
    mask_token_id = property(lambda self: self._token_id("mask_token"))

    # ------------------------------------------------------------------ encoding and decoding

    def __call__(self, text: str | list[str] | tuple[str, ...], add_special_tokens: bool = True,
                 return_offsets_mapping: bool = False, return_attention_mask: bool | None = None,
                 padding: bool = False, truncation: bool | None = None, max_length: int | None = None,
                 return_tensors: None = None) -> Encoding:
        """input_ids and attention_mask (and offset_mapping), a list per text for a list of texts."""
        if padding or truncation or max_length is not None or return_tensors is not None:
            raise NotImplementedError("padding, truncation and tensors need the transformers tokenizer "
                                      "(CHUNKTUI_MODEL_CODE=transformers)")
        batched = isinstance(text, (list, tuple))
        texts = list(text) if batched else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text input must be of type `str` (single example) or `list[str]` (batch)")
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        out = Encoding(input_ids=[e.ids for e in encodings])
        if return_attention_mask is not False:
            out["attention_mask"] = [e.attention_mask for e in encodings]
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encodings]
        if not batched:
            out = Encoding({key: value[0] for key, value in out.items()})
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None):
        """Text of `token_ids` (an int, a list, a tensor or array; a list of lists gives a list of texts)."""
        if clean_up_tokenization_spaces:
            raise NotImplementedError("clean_up_tokenization_spaces needs the transformers tokenizer")
        if hasattr(token_ids, "tolist"):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if isinstance(token_ids, Mapping):
            token_ids = token_ids["input_ids"]
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self._tokenizer.decode([int(i) for i in seq], skip_special_tokens=skip_special_tokens)
                    for seq in token_ids]
        return self._tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **kwargs) -> list[str]:
        if hasattr(sequences, "tolist"):
            sequences = sequences.tolist()
        return [self.decode(seq, skip_special_tokens=skip_special_tokens, **kwargs) for seq in sequences]

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(self, conversation, tools: list[dict] | None = None, documents: list[dict] | None = None,
                            chat_template: str | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = True, return_dict: bool = True, **kwargs):
        """The chat rendered with transformers' jinja sandbox and variables; tokenized without special tokens
        (a BatchEncoding-like dict unless return_dict=False, as in transformers 5)."""
        unsupported = {"continue_final_message", "return_assistant_tokens_mask", "sanitize_control_tokens",
                       "padding", "truncation", "max_length", "return_tensors", "tokenizer_kwargs"}
        asked = sorted(key for key in unsupported if kwargs.get(key))
        if asked:
            raise NotImplementedError(f"apply_chat_template({', '.join(asked)}) needs the transformers tokenizer "
                                      "(CHUNKTUI_MODEL_CODE=transformers)")
        kwargs = {key: value for key, value in kwargs.items() if key not in unsupported}
        if tools is not None and not all(isinstance(tool, dict) for tool in tools):
            raise NotImplementedError("tools as functions need the transformers tokenizer: pass JSON schemas")
        if documents is not None and not all(isinstance(doc, dict) for doc in documents):
            raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("Cannot use apply_chat_template because this processor does not have a chat template.")
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        batched = isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        compiled = self._compile(template)
        variables = _plain({**self.special_tokens_map, **kwargs})
        rendered = []
        for chat in conversations:
            messages = []
            for message in chat:
                if not isinstance(message, dict):
                    raise TypeError(f"Chat messages should be dicts, but got {message!r}.")
                messages.append({key: value for key, value in message.items() if value is not None})
            messages = _alias_reasoning(_plain(messages))
            rendered.append(compiled.render(messages=messages, tools=_plain(tools), documents=_plain(documents),
                                            add_generation_prompt=add_generation_prompt, **variables))
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(rendered if batched else rendered[0], add_special_tokens=False)
        return out if return_dict else out["input_ids"]

    def _compile(self, template: str):
        if self._compiled is None or self._compiled[0] != template:
            self._compiled = (template, _compile_template(template))
        return self._compiled[1]

    def __repr__(self) -> str:
        return f"LeanTokenizer(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, len={len(self)})"


# ---------------------------------------------------------------------------------------- transformers' jinja sandbox

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    """transformers' _alias_reasoning_fields: older names of a message's reasoning, copied to the standard ones."""
    out = []
    for message in chat:
        reasoning = next((message[key] for key in _REASONING_FIELDS if message.get(key) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def _plain(value: Any) -> Any:
    """Plain JSON data for the sandbox (transformers' _plain_template_data, for the types a chat holds)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, tuple):
        return tuple(_plain(item) for item in value)
    raise NotImplementedError(f"a {type(value).__name__} in a chat needs the transformers tokenizer")


def _compile_template(chat_template: str):
    """transformers' _cached_compile_jinja_template: the same sandbox, options, filters and globals."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (sandbox fixes); this is {jinja2.__version__}")

    class Generation(jinja2.ext.Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text; without assistant masks it renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}.")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env.from_string(chat_template)
