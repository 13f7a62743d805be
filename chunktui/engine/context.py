"""A model's context length, and what to do with text that does not fit in it.

Every path that runs a model asks here: corpora are read in windows of at
most `context_length` tokens (see `corpus.collect`), and a prompt that cannot
hold its answer (prompt + max new tokens > context) is refused, or cut from
the left when the user asked for that (`fit_prompt(..., truncate=True)`).
"""

from __future__ import annotations

from dataclasses import dataclass

from chunktui.shared.errors import ChunkError


class ContextError(ChunkError):
    """A text or prompt does not fit in the model's context."""


def context_problem(loaded, n_prompt_tokens: int, max_new_tokens: int) -> str | None:
    """None when the prompt and its answer fit in the model's context, else a one-sentence warning."""
    limit = loaded.context_length
    if n_prompt_tokens + max_new_tokens <= limit:
        return None
    if n_prompt_tokens >= limit:
        return (f"The prompt is {n_prompt_tokens} tokens; {loaded.name} reads at most {limit} (its context), "
                "so there is no room to generate.")
    return (f"The prompt is {n_prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
            f"{n_prompt_tokens + max_new_tokens} in all, more than {loaded.name}'s context of {limit}. "
            f"Ask for at most {limit - n_prompt_tokens} new tokens, or shorten the prompt.")


def check_fits(loaded, n_prompt_tokens: int, max_new_tokens: int) -> None:
    """Raise ContextError when prompt + max new tokens exceed the model's context (the app warns with the text)."""
    problem = context_problem(loaded, n_prompt_tokens, max_new_tokens)
    if problem:
        raise ContextError(problem)


@dataclass
class FittedPrompt:
    text: str
    ids: list[int]
    dropped_tokens: int = 0  # tokens cut from the start of the prompt text

    def note(self) -> str | None:
        if not self.dropped_tokens:
            return None
        return f"the prompt was cut by its first {self.dropped_tokens} tokens to fit the context (--truncate)"


def fit_prompt(loaded, prompt: str, max_new_tokens: int, chat: bool = False, truncate: bool = False,
               option_hint: str = "--truncate") -> FittedPrompt:
    """The prompt as it will be fed; refused if it cannot hold max_new_tokens, or cut from the left if `truncate`.

    With the chat template, only the user's text is cut (the template stays whole).
    """
    from chunktui.engine.tokens import encode_prompt

    ids = encode_prompt(loaded, prompt, chat)
    limit = loaded.context_length
    if len(ids) + max_new_tokens <= limit:
        return FittedPrompt(prompt, ids)
    if max_new_tokens >= limit:
        raise ContextError(f"{max_new_tokens} new tokens cannot fit in {loaded.name}'s context of {limit} tokens "
                           f"with any prompt; ask for at most {limit - 2}.")
    if not truncate:
        raise ContextError(context_problem(loaded, len(ids), max_new_tokens)
                           + f" Or pass {option_hint} to cut the prompt from the start.")
    tok = loaded.tokenizer
    body = tok(prompt, add_special_tokens=False)["input_ids"]
    overhead = len(ids) - len(body)  # template and BOS tokens around the user's text
    room = limit - max_new_tokens - overhead
    if room < 1:
        raise ContextError(f"The prompt template alone is {overhead} tokens: no room for the prompt and "
                           f"{max_new_tokens} new tokens in {loaded.name}'s context of {limit}.")
    # decoding a cut can re-tokenise a little differently: shrink until it fits
    keep = room
    while keep > 0:
        text = tok.decode(body[len(body) - keep:], skip_special_tokens=True)
        fitted = encode_prompt(loaded, text, chat)
        if len(fitted) + max_new_tokens <= limit:
            return FittedPrompt(text, fitted, dropped_tokens=len(body) - keep)
        keep -= max(1, (len(fitted) + max_new_tokens - limit))
    raise ContextError(f"The prompt could not be cut to fit {loaded.name}'s context of {limit} tokens.")
