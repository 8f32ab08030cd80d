"""GSM8K: grade-school math word problems, solved step by step with calculator calls.

Midtraining and SFT train on it (the model learns to call the python tool for arithmetic), chat
eval scores it generatively, and RL uses ``reward`` on it. A GSM8K solution marks
each calculation as ``<<48/2=24>>`` and ends with ``#### <answer>``; ``solution_parts`` turns
each annotation into a python part (``48/2``) and its python_output part (``24``), which
``Tokenizer.render_conversation`` supervises and masks respectively.

``source="embedded"`` builds a miniature offline from templates with random numbers (seeded,
so the same arguments give the same items); ``source="hub"`` reads the openai/gsm8k parquet
files (columns ``question``, ``answer``) from the task-data cache (``nanochat.tasks.hub``).
"""

from __future__ import annotations

import random
import re
from decimal import Decimal, InvalidOperation

from nanochat.tasks.base import Task, check_source, user_assistant
from nanochat.tasks.hub import read_rows, row_error

ANNOTATION = re.compile(r"<<([^<>]*)>>")
ANSWER = re.compile(r"####\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?|-?\.[0-9]+)")


def solution_parts(solution: str) -> list[dict]:
    """A GSM8K solution as assistant parts: each ``<<expr=result>>`` becomes a python part
    ``expr`` followed by a python_output part ``result``; the text around stays text parts.
    An annotation without ``=`` is kept as plain text."""
    parts: list[dict] = []

    def text(value: str) -> None:
        if value:
            parts.append({"type": "text", "text": value})

    position = 0
    for match in ANNOTATION.finditer(solution):
        expr, eq, result = match.group(1).rpartition("=")
        if not eq:
            continue  # left in the surrounding text
        text(solution[position : match.start()])
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
        position = match.end()
    text(solution[position:])
    return parts


def extract_answer(text: str) -> str | None:
    """The number after the last ``####`` with thousands commas dropped, or None."""
    matches = ANSWER.findall(text)
    if not matches:
        return None
    return matches[-1].replace(",", "")


def _as_number(answer: str) -> Decimal | None:
    try:
        return Decimal(answer)
    except InvalidOperation:
        return None


def answers_match(predicted: str | None, reference: str | None) -> bool:
    """Numeric equality of two extracted answers (``3.50`` == ``3.5``); False if either is None."""
    if predicted is None or reference is None:
        return False
    a, b = _as_number(predicted), _as_number(reference)
    return a == b if a is not None and b is not None else predicted == reference


def conversation_text(conversation: dict) -> str:
    """All the text of the last assistant message (parts joined)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content)


class GSM8K(Task):
    """GSM8K as conversations; ``eval_type = "generative"``.

    ``source="embedded"``: ``n`` template problems from ``seed``. ``source="hub"``: the real
    split from ``BASE_DIR/task_data/gsm8k/<split>/`` (``n`` and ``seed`` unused).
    """

    name = "gsm8k"
    eval_type = "generative"

    def __init__(self, source: str = "embedded", split: str = "train", n: int = 200, seed=0):
        super().__init__()
        check_source(source)
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if source == "hub":
            for i, row in enumerate(read_rows(self.name, split)):
                try:
                    self._items.append(self.conversation(row["question"], row["answer"]))
                except (KeyError, TypeError) as exc:
                    raise row_error(self.name, i, exc) from None
            return
        # train and test draw from different seeds, so the splits differ
        rng = random.Random(f"gsm8k/{split}/{seed}")
        self._items = [self.conversation(*_problem(rng)) for _ in range(n)]

    @staticmethod
    def conversation(question: str, solution: str) -> dict:
        return user_assistant(question, solution_parts(solution))

    def reference(self, index: int) -> str | None:
        return extract_answer(conversation_text(self[index]))

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return answers_match(
            extract_answer(completion), extract_answer(conversation_text(conversation))
        )

    def reward(self, conversation: dict, completion: str) -> float:
        """RL reward: 1.0 when the final answer matches, else 0.0."""
        return float(self.evaluate(conversation, completion))


NAMES = [
    ("Natalia", "she", "her"), ("Tom", "he", "his"), ("Aisha", "she", "her"),
    ("Carlos", "he", "his"), ("Mei", "she", "her"), ("Ravi", "he", "his"),
    ("Olga", "she", "her"), ("Kwame", "he", "his"), ("Lena", "she", "her"),
    ("Diego", "he", "his"),
]  # fmt: skip
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards"]


def _problem(rng: random.Random) -> tuple[str, str]:
    """One (question, annotated solution ending in ``#### answer``) from a random template."""
    name, he, his = rng.choice(NAMES)
    He = he.capitalize()
    item = rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b, c = rng.randint(2, 30), rng.randint(2, 9), rng.randint(2, 12)
        bc, total = b * c, a + b * c
        question = (
            f"{name} has {a} {item}. {He} buys {b} packs with {c} {item} in each pack. "
            f"How many {item} does {name} have now?"
        )
        solution = (
            f"The packs hold {b} * {c} = <<{b}*{c}={bc}>>{bc} {item}.\n"
            f"{name} now has {a} + {bc} = <<{a}+{bc}={total}>>{total} {item}.\n#### {total}"
        )
    elif kind == 1:
        n, price = rng.randint(2, 9), rng.randint(2, 15)
        cost = n * price
        bill = rng.choice([b for b in (20, 50, 100, 200) if b > cost])
        change = bill - cost
        question = (
            f"{name} buys {n} notebooks that cost ${price} each and pays with a ${bill} bill. "
            f"How much change does {he} get, in dollars?"
        )
        solution = (
            f"The notebooks cost {n} * {price} = <<{n}*{price}={cost}>>{cost} dollars.\n"
            f"{He} gets {bill} - {cost} = <<{bill}-{cost}={change}>>{change} dollars back.\n"
            f"#### {change}"
        )
    elif kind == 2:
        k, q = rng.randint(2, 8), rng.randint(3, 12)
        total, eaten = k * q, rng.randint(1, 2)
        left = q - eaten
        question = (
            f"{name} shares {total} {item} equally among {k} friends. Each friend then gives "
            f"away {eaten} of them. How many {item} does each friend have left?"
        )
        solution = (
            f"Each friend gets {total} / {k} = <<{total}/{k}={q}>>{q} {item}.\n"
            f"After giving some away, each has {q} - {eaten} = <<{q}-{eaten}={left}>>{left}.\n"
            f"#### {left}"
        )
    elif kind == 3:
        s1, h1, s2, h2 = (
            rng.randint(30, 70),
            rng.randint(2, 5),
            rng.randint(30, 70),
            rng.randint(1, 4),
        )
        d1, d2 = s1 * h1, s2 * h2
        total = d1 + d2
        question = (
            f"A train travels at {s1} miles per hour for {h1} hours, then at {s2} miles per hour "
            f"for {h2} hours. How many miles does it travel in total?"
        )
        solution = (
            f"First it covers {s1} * {h1} = <<{s1}*{h1}={d1}>>{d1} miles.\n"
            f"Then it covers {s2} * {h2} = <<{s2}*{h2}={d2}>>{d2} miles.\n"
            f"In total that is {d1} + {d2} = <<{d1}+{d2}={total}>>{total} miles.\n#### {total}"
        )
    elif kind == 4:
        weekly, weeks = rng.randint(5, 40), rng.randint(3, 20)
        target, have = weekly * weeks, rng.randint(0, 3) * weekly
        need = target - have
        left = need // weekly
        question = (
            f"{name} wants a bike that costs ${target}. {He} already has ${have} and saves "
            f"${weekly} every week. How many more weeks must {he} save?"
        )
        solution = (
            f"{He} still needs {target} - {have} = <<{target}-{have}={need}>>{need} dollars.\n"
            f"That takes {need} / {weekly} = <<{need}/{weekly}={left}>>{left} weeks.\n#### {left}"
        )
    else:
        price, n, pct = rng.randint(1, 10) * 20, rng.randint(2, 6), rng.choice([10, 20, 25, 50])
        full = price * n
        off = full * pct // 100
        paid = full - off
        question = (
            f"A shirt costs ${price}. {name} buys {n} shirts during a sale with {pct}% off "
            f"{his} whole order. How many dollars does {he} pay?"
        )
        solution = (
            f"Before the sale the shirts cost {price} * {n} = <<{price}*{n}={full}>>{full} "
            f"dollars.\nThe discount is {full} * {pct} / 100 = <<{full}*{pct}/100={off}>>{off} "
            f"dollars.\nSo {he} pays {full} - {off} = <<{full}-{off}={paid}>>{paid} dollars.\n"
            f"#### {paid}"
        )
    return question, solution
