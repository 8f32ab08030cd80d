"""Fitting a conversation into the model's context for the next reply (stage chat: the
terminal chat ``scripts/chat_cli.py`` and the web server ``nanochat/serve/``).

``fit_conversation`` renders a conversation for completion (``Tokenizer.render_for_completion``)
and drops its oldest turns, a user message with the assistant's answer at a time, until the
prompt leaves room for the reply: the reply's tokens, at most half the context. The system
prompt and the last user message always stay; when even they fill the context,
``PromptTooLong`` says by how much, and each caller words its own error.

Standard library only: rendering is the tokenizer's job, this module only picks the turns.
"""

from __future__ import annotations

from dataclasses import dataclass


class PromptTooLong(ValueError):
    """Even the system prompt and the last user message alone fill the model's context."""

    def __init__(self, tokens: int, context: int) -> None:
        super().__init__(f"the prompt is {tokens} tokens; the model's context holds {context}")
        self.tokens = tokens
        self.context = context


@dataclass
class FittedPrompt:
    """The tokens to continue, and how many of the oldest turns were left out."""

    tokens: list[int]
    dropped: int  # turns (messages, system prompt not counted) dropped from the front


def fit_conversation(
    tokenizer, turns: list[dict], context: int, reply_tokens: int, system: str | None = None
) -> FittedPrompt:
    """Render ``turns`` (user/assistant messages alternating, starting and ending with the
    user) for completion, dropping the oldest pairs until the prompt leaves room for
    ``reply_tokens`` (at most half of ``context``). ``system``, when given, is rendered first
    and never dropped. PromptTooLong when the last user message alone leaves no room at all.
    """
    reserve = min(reply_tokens, context // 2)

    def render(start: int) -> list[int]:
        kept = turns[start:]
        if system is not None:
            kept = [{"role": "system", "content": system}, *kept]
        return tokenizer.render_for_completion(
            {"messages": [*kept, {"role": "assistant", "content": ""}]}
        )

    def fits(start: int) -> bool:
        return len(render(start)) + reserve <= context

    # The candidate starts are 0, 2, 4, ... len(turns) - 1 (whole pairs dropped, the last
    # user message kept). Fewer turns never render longer, so a binary search finds the first
    # start that fits in a handful of renders instead of one per turn.
    low, high = 0, (len(turns) - 1) // 2  # pairs dropped; at `high` only the last user is left
    while low < high:
        middle = (low + high) // 2
        if fits(2 * middle):
            high = middle
        else:
            low = middle + 1
    start = 2 * low
    tokens = render(start)
    if len(tokens) >= context:
        raise PromptTooLong(len(tokens), context)
    return FittedPrompt(tokens, start)
