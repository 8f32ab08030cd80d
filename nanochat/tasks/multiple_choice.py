"""Multiple-choice tasks (ARC-Easy, ARC-Challenge, MMLU) with one shared rendering.

The user message is the question, one line per option ``- {choice}={letter}``, then "Respond
only with the letter of the correct answer."; the assistant answers with the letter
alone. Chat eval scores these categorically: the logits at the answer position are restricted to
``letters(i)`` (also stored in each conversation under ``"letters"``). Midtraining and SFT mix
MMLU (and ARC) in so the model learns the format.

``source="embedded"`` builds small deterministic miniatures offline (simple science facts and
arithmetic, options shuffled by a seeded generator; each split shuffles differently but draws on
the same facts); ``source="hub"`` reads allenai/ai2_arc or cais/mmlu parquet files from the
task-data cache (``nanochat.tasks.hub``). ARC's option labels (sometimes "1".."4") are replaced
by letters in order.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from nanochat.tasks.base import Task, check_source
from nanochat.tasks.hub import read_rows, row_error

LETTERS = "ABCDEFGHIJ"
INSTRUCTION = "Respond only with the letter of the correct answer."


def render_question(question: str, choices: Sequence[str]) -> str:
    """The user message for a multiple-choice question."""
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"need 2..{len(LETTERS)} choices, got {len(choices)}")
    lines = [question] + [f"- {c}={letter}" for c, letter in zip(choices, LETTERS, strict=False)]
    return "\n".join(lines) + "\n" + INSTRUCTION


def mc_conversation(question: str, choices: Sequence[str], answer: int) -> dict:
    """A multiple-choice conversation; ``answer`` indexes ``choices``."""
    if not 0 <= answer < len(choices):
        raise ValueError(f"answer index {answer} out of range for {len(choices)} choices")
    letters = list(LETTERS[: len(choices)])
    return {
        "messages": [
            {"role": "user", "content": render_question(question, choices)},
            {"role": "assistant", "content": letters[answer]},
        ],
        "letters": letters,
    }


class MultipleChoice(Task):
    """Base for categorical tasks built from ``(question, choices, answer_index)`` rows."""

    eval_type = "categorical"

    def _build(self, rows: Sequence[tuple[str, Sequence[str], int]]) -> None:
        self._items = [mc_conversation(q, c, a) for q, c, a in rows]

    def _build_hub(self, split: str, convert) -> None:
        for i, row in enumerate(read_rows(self.name, split)):
            try:
                question, choices, answer = convert(row)
                if not isinstance(question, str) or not all(isinstance(c, str) for c in choices):
                    raise TypeError("question and choices must be strings")
                self._items.append(mc_conversation(question, list(choices), answer))
            except (KeyError, TypeError, ValueError) as exc:
                raise row_error(self.name, i, exc) from None

    def letters(self, index: int) -> list[str]:
        return list(self[index]["letters"])

    def answer(self, index: int) -> str:
        return self[index]["messages"][-1]["content"]

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Whether the predicted letter (``completion`` stripped) is the right one."""
        return completion.strip() == conversation["messages"][-1]["content"]


# (question, correct answer, three wrong answers)
SCIENCE = [
    ("Which planet is closest to the Sun?", "Mercury", ["Venus", "Earth", "Mars"]),
    ("What gas do plants take in from the air to make food?", "carbon dioxide",
     ["oxygen", "nitrogen", "helium"]),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100",
     ["50", "0", "212"]),
    ("Which organ pumps blood through the body?", "the heart",
     ["the lungs", "the liver", "the stomach"]),
    ("What is frozen water called?", "ice", ["steam", "fog", "dew"]),
    ("Which force pulls objects toward the ground?", "gravity",
     ["magnetism", "friction", "wind"]),
    ("What do bees collect from flowers to make honey?", "nectar",
     ["seeds", "bark", "soil"]),
    ("Which of these is a mammal?", "a whale", ["a shark", "a trout", "a frog"]),
    ("What is the largest planet in our solar system?", "Jupiter",
     ["Saturn", "Earth", "Neptune"]),
    ("What part of a plant takes up water from the soil?", "the roots",
     ["the petals", "the leaves", "the seeds"]),
    ("Which state of matter has a fixed shape?", "solid", ["liquid", "gas", "vapor"]),
    ("What does a thermometer measure?", "temperature", ["mass", "length", "time"]),
    ("Which star is at the center of our solar system?", "the Sun",
     ["Polaris", "Sirius", "the Moon"]),
    ("What do caterpillars turn into?", "butterflies", ["spiders", "beetles", "worms"]),
    ("Which material is a good conductor of electricity?", "copper",
     ["rubber", "wood", "glass"]),
    ("How many legs does an insect have?", "six", ["four", "eight", "ten"]),
    ("What causes day and night on Earth?", "Earth spinning on its axis",
     ["the Moon's orbit", "clouds", "the seasons"]),
    ("Which sense organ is used to hear?", "the ear", ["the nose", "the eye", "the tongue"]),
    ("What is the main gas in the air we breathe?", "nitrogen",
     ["oxygen", "carbon dioxide", "hydrogen"]),
    ("Which of these is a renewable energy source?", "sunlight",
     ["coal", "oil", "natural gas"]),
]  # fmt: skip

GENERAL = [
    ("What is the capital of France?", "Paris", ["Rome", "Madrid", "Berlin"]),
    ("How many days are in a leap year?", "366", ["365", "364", "360"]),
    ("Who wrote 'Romeo and Juliet'?", "William Shakespeare",
     ["Charles Dickens", "Jane Austen", "Mark Twain"]),
    ("What is the chemical symbol for gold?", "Au", ["Ag", "Gd", "Go"]),
    ("Which ocean is the largest?", "the Pacific", ["the Atlantic", "the Indian", "the Arctic"]),
    ("How many sides does a hexagon have?", "6", ["5", "7", "8"]),
    ("What is the square root of 81?", "9", ["8", "7", "18"]),
    ("In computing, what does CPU stand for?", "central processing unit",
     ["computer power unit", "core program utility", "central print unit"]),
    ("Which continent is Egypt in?", "Africa", ["Asia", "Europe", "South America"]),
    ("What is the freezing point of water in degrees Fahrenheit?", "32",
     ["0", "100", "212"]),
]  # fmt: skip


def _fact_rows(facts, rng: random.Random) -> list[tuple[str, list[str], int]]:
    rows = []
    for question, right, wrong in facts:
        choices = [right, *wrong]
        rng.shuffle(choices)
        rows.append((question, choices, choices.index(right)))
    return rows


def _arithmetic_rows(n: int, rng: random.Random, hard: bool) -> list[tuple[str, list[str], int]]:
    rows = []
    for _ in range(n):
        if hard:
            a, b, c = rng.randint(11, 49), rng.randint(3, 12), rng.randint(2, 60)
            question, right = f"What is {a} * {b} - {c}?", a * b - c
        else:
            a, b = rng.randint(2, 60), rng.randint(2, 60)
            question, right = f"What is {a} + {b}?", a + b
        wrong: set[int] = set()
        while len(wrong) < 3:
            guess = right + rng.choice([-10, -2, -1, 1, 2, 10])
            if guess != right:
                wrong.add(guess)
        choices = [str(right), *map(str, sorted(wrong))]
        rng.shuffle(choices)
        rows.append((question, choices, choices.index(str(right))))
    return rows


def _arc_row(row: dict) -> tuple[str, list[str], int]:
    labels = list(row["choices"]["label"])
    return row["question"], list(row["choices"]["text"]), labels.index(row["answerKey"])


def _mmlu_row(row: dict) -> tuple[str, list[str], int]:
    row = row.get("train", row)  # auxiliary_train nests each row under "train"
    answer = row["answer"]
    if not isinstance(answer, int):
        raise TypeError(f"answer must be an int index, got {answer!r}")
    return row["question"], list(row["choices"]), answer


class ARC(MultipleChoice):
    """AI2 Reasoning Challenge; ``subset`` is "ARC-Easy" or "ARC-Challenge", ``split`` one of
    "train", "validation", "test"."""

    def __init__(
        self,
        subset: str = "ARC-Easy",
        source: str = "embedded",
        split: str = "test",
        seed: int = 0,
    ):
        super().__init__()
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"subset must be 'ARC-Easy' or 'ARC-Challenge', got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be train, validation or test, got {split!r}")
        check_source(source)
        self.name = subset.lower()
        if source == "hub":
            self._build_hub(split, _arc_row)
            return
        rng = random.Random(f"{subset}/{split}/{seed}")
        if subset == "ARC-Easy":
            rows = _fact_rows(SCIENCE, rng) + _arithmetic_rows(20, rng, hard=False)
        else:
            rows = _arithmetic_rows(40, rng, hard=True)
        self._build(rows)


class MMLU(MultipleChoice):
    """Massive Multitask Language Understanding; ``subset`` "all" (eval; ``split`` "test",
    "validation" or "dev") or "auxiliary_train" (the training mixture; ``split`` "train")."""

    def __init__(
        self,
        subset: str = "all",
        source: str = "embedded",
        split: str | None = None,
        seed: int = 0,
    ):
        super().__init__()
        splits = {"all": ("test", "validation", "dev"), "auxiliary_train": ("train",)}
        if subset not in splits:
            raise ValueError(f"subset must be 'all' or 'auxiliary_train', got {subset!r}")
        split = split or splits[subset][0]
        if split not in splits[subset]:
            raise ValueError(f"split for MMLU {subset} must be one of {splits[subset]}")
        check_source(source)
        self.name = "mmlu" if subset == "all" else "mmlu-auxiliary_train"
        if source == "hub":
            self._build_hub(split, _mmlu_row)
            return
        rng = random.Random(f"mmlu/{subset}/{split}/{seed}")
        rows = _fact_rows(GENERAL + SCIENCE, rng) + _arithmetic_rows(30, rng, hard=True)
        rng.shuffle(rows)
        self._build(rows)
