"""HumanEval: write a Python function from its signature and docstring; tests decide.

Chat eval scores it generatively: ``evaluate`` takes the code from the model's completion (the
first fenced block if there is one) and has ``nanochat.inference.answer_check`` score it: the
answer runs in the sandbox (``nanochat.inference.execution``), the problem's tests in a separate
checker process that calls it and receives plain values back, so nothing the answer does (exit
early, fake a proof, return an object equal to anything) can make the tests pass; only right values
can. The conversation is the prompt as the user message and prompt + reference solution as the
answer.

``source="embedded"``: a dozen tiny hand-written problems in HumanEval's format (prompt,
canonical solution, ``check(candidate)`` tests, entry point); ``source="hub"`` reads the
openai/openai_humaneval parquet files (same columns) from the task-data cache
(``nanochat.tasks.hub``, split "test").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nanochat.tasks.base import Task, check_source, user_assistant
from nanochat.tasks.hub import read_rows, row_error

FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)```", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    entry_point: str
    prompt: str
    solution: str
    test: str


def _p(entry: str, signature: str, doc: str, solution: str, asserts: list[str]) -> Problem:
    prompt = f'def {entry}{signature}:\n    """{doc}"""\n'
    test = "def check(candidate):\n" + "".join(f"    assert {a}\n" for a in asserts)
    return Problem(entry, prompt, solution, test)


PROBLEMS = [
    _p("add", "(a: int, b: int) -> int", "Return the sum of a and b.", "    return a + b\n",
       ["candidate(2, 3) == 5", "candidate(-1, 1) == 0"]),
    _p("is_even", "(n: int) -> bool", "Return True if n is even.", "    return n % 2 == 0\n",
       ["candidate(4) is True", "candidate(7) is False", "candidate(0) is True"]),
    _p("reverse_string", "(s: str) -> str", "Return s reversed.", "    return s[::-1]\n",
       ["candidate('abc') == 'cba'", "candidate('') == ''"]),
    _p("max_of_list", "(xs: list) -> int", "Return the largest number in the non-empty list xs.",
       "    return max(xs)\n", ["candidate([1, 5, 3]) == 5", "candidate([-2, -9]) == -2"]),
    _p("count_vowels", "(s: str) -> int", "Count the vowels (a, e, i, o, u) in lowercase s.",
       "    return sum(c in 'aeiou' for c in s)\n",
       ["candidate('banana') == 3", "candidate('xyz') == 0"]),
    _p("factorial", "(n: int) -> int", "Return n! for n >= 0.",
       "    result = 1\n    for i in range(2, n + 1):\n        result *= i\n    return result\n",
       ["candidate(0) == 1", "candidate(5) == 120"]),
    _p("fizzbuzz", "(n: int) -> str",
       "Return 'Fizz' if n is divisible by 3, 'Buzz' if by 5, 'FizzBuzz' if by both, "
       "else str(n).",
       "    if n % 15 == 0:\n        return 'FizzBuzz'\n    if n % 3 == 0:\n        return 'Fizz'\n"
       "    if n % 5 == 0:\n        return 'Buzz'\n    return str(n)\n",
       ["candidate(9) == 'Fizz'", "candidate(10) == 'Buzz'", "candidate(30) == 'FizzBuzz'",
        "candidate(7) == '7'"]),
    _p("is_palindrome", "(s: str) -> bool", "Return True if s reads the same backwards.",
       "    return s == s[::-1]\n",
       ["candidate('level') is True", "candidate('abc') is False"]),
    _p("sum_squares", "(xs: list) -> int", "Return the sum of the squares of xs.",
       "    return sum(x * x for x in xs)\n", ["candidate([1, 2, 3]) == 14", "candidate([]) == 0"]),
    _p("unique_sorted", "(xs: list) -> list", "Return the distinct elements of xs, sorted.",
       "    return sorted(set(xs))\n", ["candidate([3, 1, 3, 2]) == [1, 2, 3]"]),
    _p("fibonacci", "(n: int) -> int", "Return the n-th Fibonacci number (fib(0)=0, fib(1)=1).",
       "    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
       ["candidate(0) == 0", "candidate(1) == 1", "candidate(10) == 55"]),
    _p("word_count", "(s: str) -> int", "Return the number of whitespace-separated words in s.",
       "    return len(s.split())\n", ["candidate('a b  c') == 3", "candidate('') == 0"]),
]  # fmt: skip


def extract_code(completion: str) -> str:
    """The first fenced code block in ``completion``, else the completion itself."""
    match = FENCE.search(completion)
    return match.group(1) if match else completion


def answer_code(problem: Problem, completion: str) -> str:
    """The code of an answer: the completion's (its first fenced block if it has one), with
    the prompt prepended when it is only a function body."""
    code = extract_code(completion)
    if f"def {problem.entry_point}" not in code:
        code = problem.prompt + code
    return code


class HumanEval(Task):
    """HumanEval problems; ``eval_type = "generative"``. Each conversation also carries its
    ``"prompt"``, ``"entry_point"`` and ``"test"`` (ignored by the tokenizer)."""

    name = "humaneval"
    eval_type = "generative"

    def __init__(self, source: str = "embedded"):
        super().__init__()
        check_source(source)
        if source == "hub":
            self.problems = []
            for i, row in enumerate(read_rows(self.name, "test")):
                try:
                    fields = [
                        row[k] for k in ("entry_point", "prompt", "canonical_solution", "test")
                    ]
                    if not all(isinstance(f, str) for f in fields):
                        raise TypeError("entry_point, prompt, canonical_solution, test: strings")
                except (KeyError, TypeError) as exc:
                    raise row_error(self.name, i, exc) from None
                self.problems.append(Problem(*fields))
        else:
            self.problems = list(PROBLEMS)
        for p in self.problems:
            conversation = user_assistant(p.prompt, p.prompt + p.solution)
            conversation.update(prompt=p.prompt, entry_point=p.entry_point, test=p.test)
            self._items.append(conversation)

    def evaluate(self, conversation: dict, completion: str, timeout_s: float = 5.0) -> bool:
        from nanochat.inference.answer_check import check_answer

        problem = Problem(
            conversation["entry_point"], conversation["prompt"], "", conversation["test"]
        )
        code = answer_code(problem, completion)
        return check_answer(
            code, problem.entry_point, problem.prompt, problem.test, timeout_s
        ).success
