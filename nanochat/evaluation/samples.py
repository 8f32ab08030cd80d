"""Greedy samples of a base model: a few fixed prompts and their argmax continuations.

Pretraining prints three of them every ``--sample-every`` steps (scripts/base_train.py), and
base-eval writes all of them into its report section (scripts/base_eval.py): a quick look at
what the model learned, next to the numbers.
"""

from __future__ import annotations

SAMPLE_TOKENS = 24  # continuation length in base-eval's report
# General knowledge (what CORE asks about) and the docstring register the embedded corpus is
# written in (what the tiny model read).
SAMPLE_PROMPTS = (
    "The largest planet in the solar system is",
    "The opposite of cold is",
    "Seven days make one",
    "Return a new list containing",
    "This function raises ValueError if",
    "If the timeout argument is None,",
)


def greedy_completion(model, tokenizer, prompt: str, max_tokens: int, context: int, device) -> str:
    """The argmax continuation of ``prompt``, one full forward per token (no KV cache)."""
    import torch

    ids = tokenizer.encode(prompt, prepend=tokenizer.bos_id)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_tokens):
            x = torch.tensor([ids[-context:]], dtype=torch.long, device=device)
            next_id = int(model(x)[0, -1].argmax())
            if tokenizer.is_special(next_id):
                break
            ids.append(next_id)
            out.append(next_id)
    return tokenizer.decode(out)


def printable(text: str) -> str:
    """One line: control characters (a random model emits plenty) shown escaped."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)
