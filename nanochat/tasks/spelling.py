"""Spelling and letter counting ("How many 'r' are in strawberry?") with the python tool.

Small models see tokens, not letters, so midtraining and SFT mix in this task: the assistant
spells the word out, checks the count with a python part ``'strawberry'.count('r')`` (which
``nanochat.inference.engine.use_calculator`` evaluates), reads the python_output part and ends with
``#### <count>``. It is generative: ``evaluate`` compares the number after ``####``.

Embedded only, generated from a word list with a seeded generator.
"""

from __future__ import annotations

import random

from nanochat.tasks.base import Task, check_source, user_assistant
from nanochat.tasks.gsm8k import answers_match, conversation_text, extract_answer

WORDS = [
    "strawberry", "banana", "mississippi", "bookkeeper", "committee", "balloon", "letter",
    "parallel", "necessary", "occurrence", "programming", "assessment", "coffee", "giraffe",
    "pepper", "raspberry", "tomorrow", "success", "bottle", "puzzle", "hippopotamus",
    "accommodate", "embarrass", "possession", "address", "umbrella", "elephant", "alphabet",
    "engineering", "millennium", "vacuum", "apple", "butterfly", "cinnamon", "grammar",
    "kangaroo", "lollipop", "noodle", "referee", "sheep", "tennis", "yellow", "zucchini",
    "chocolate", "dictionary", "excellent", "happiness", "independent", "mammal", "papaya",
]  # fmt: skip

TEMPLATES = [
    "How many '{letter}' are in {word}?",
    "How many times does the letter {letter} appear in the word {word}?",
    "Count the letter '{letter}' in '{word}'.",
    "how many {letter}s are there in {word}",
]


def spelling_conversation(word: str, letter: str, template: str = TEMPLATES[0]) -> dict:
    count = word.count(letter)
    spelled = ",".join(word)
    return user_assistant(
        template.format(letter=letter, word=word),
        [
            {
                "type": "text",
                "text": f"Spelled out, {word} is: {spelled}. "
                f"Let me count the '{letter}' with the tool.\n",
            },
            {"type": "python", "text": f"'{word}'.count('{letter}')"},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\nThere are {count} '{letter}' in {word}.\n#### {count}"},
        ],
    )


class SpellingBee(Task):
    """``n`` letter-counting conversations; about one in five asks for a letter the word lacks
    (answer 0). ``eval_type = "generative"``."""

    name = "spelling_bee"
    eval_type = "generative"

    def __init__(self, source: str = "embedded", n: int = 200, seed: int = 0):
        super().__init__()
        check_source(source, hub=False)
        rng = random.Random(f"spelling/{seed}")
        for _ in range(n):
            word = rng.choice(WORDS)
            if rng.random() < 0.2:
                letter = rng.choice([c for c in "abcdefghijklmnopqrstuvwxyz" if c not in word])
            else:
                letter = rng.choice(word)
            self._items.append(spelling_conversation(word, letter, rng.choice(TEMPLATES)))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answers_match(
            extract_answer(completion), extract_answer(conversation_text(conversation))
        )
