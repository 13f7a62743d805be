"""Text to token ids and back: prompts (chat template or plain), end-of-sequence ids, incremental detokenisation."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chunktui.engine.models import LoadedModel


def encode_prompt(loaded: LoadedModel, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids for a prompt, through the chat template when asked (and the tokenizer has one)."""
    tok = loaded.tokenizer
    if chat and getattr(tok, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    if tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
        ids = [tok.bos_token_id] + ids
    return ids


def eos_ids(loaded: LoadedModel) -> set[int]:
    ids = set()
    tok = loaded.tokenizer
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    gen = getattr(loaded.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(e) for e in eos)
    return ids


class Detokenizer:
    """Incremental text, one token at a time, byte-pair safe.

    With a fast tokenizer this is `tokenizers`' DecodeStream: constant work per
    token, however long the text. Otherwise (slow tokenizers, the RNN) the
    fallback decodes a short window of recent ids and emits what is new.
    """

    WINDOW = 8  # ids of context the fallback re-decodes (enough for any multi-byte character)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self._ids: list[int] = []
        self._emitted = 0  # ids whose text is already in self.text
        self._stream = None
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            try:
                from tokenizers.decoders import DecodeStream

                self._stream, self._backend = DecodeStream(skip_special_tokens=False), backend
            except ImportError:
                self._stream = None

    def add(self, token_id: int) -> str:
        if self._stream is not None:
            piece = self._stream.step(self._backend, int(token_id)) or ""
        else:
            piece = self._add_window(int(token_id))
        self.text += piece
        return piece

    def _add_window(self, token_id: int) -> str:
        self._ids.append(token_id)
        start = max(0, self._emitted - self.WINDOW)
        before = self.tokenizer.decode(self._ids[start:self._emitted], skip_special_tokens=False)
        after = self.tokenizer.decode(self._ids[start:], skip_special_tokens=False)
        if after.endswith("\ufffd") or not after.startswith(before):  # an incomplete UTF-8 sequence: wait
            return ""
        self._emitted = len(self._ids)
        return after[len(before):]
