"""The Task protocol shared by every chat dataset, plus slicing and mixing.

A task is a sequence of conversations in the tokenizer's format
(``{"messages": [{"role": ..., "content": ...}, ...]}``, see ``nanochat.tokenizer``).
Midtraining and SFT train on a ``Mixture`` of tasks (each conversation rendered with
``Tokenizer.render_conversation``); chat eval walks a task (often a ``TaskSlice`` of it) and
scores each item according to ``eval_type``:

- ``"categorical"``: the last assistant message is one letter out of ``letters(i)``; the
  evaluator restricts the logits at the answer position to those letters.
- ``"generative"``: the model completes the prompt (``render_for_completion``) and
  ``evaluate(conversation, completion_text)`` says whether the completion is right.
- ``None``: training data only.

Every task that ships a miniature takes ``source="embedded"|"hub"``; the embedded data is built
offline and deterministically, the hub data is read from the local task-data cache
(``nanochat.tasks.hub``), and nothing ever falls back silently from one source to the other.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

SOURCES = ("embedded", "hub")
EVAL_TYPES = ("categorical", "generative", None)


def check_source(source: str, *, hub: bool = True) -> str:
    """Validate a ``source`` argument; ``hub=False`` for tasks that only exist embedded."""
    allowed = SOURCES if hub else ("embedded",)
    if source not in allowed:
        raise ValueError(f"source must be one of {allowed}, got {source!r}")
    return source


class Task:
    """Base class: subclasses set ``self._items`` (a list of conversations) or override
    ``__len__``/``__getitem__``. ``eval_type`` picks how chat eval scores the task."""

    name: str = "task"
    eval_type: str | None = None

    def __init__(self) -> None:
        self._items: list[dict] = []

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict:
        return self._items[_check_index(index, len(self))]

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def letters(self, index: int) -> list[str]:
        """Categorical tasks: the answer letters allowed for item ``index``."""
        raise TypeError(f"{self.name} is not a categorical task (eval_type={self.eval_type!r})")

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Generative tasks: whether ``completion`` answers ``conversation`` correctly."""
        raise TypeError(f"{self.name} is not a generative task (eval_type={self.eval_type!r})")

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} n={len(self)}>"


def _check_index(index: int, n: int) -> int:
    if not isinstance(index, int) or isinstance(index, bool):
        raise TypeError(f"task index must be an int, got {type(index).__name__}")
    if index < 0:
        index += n
    if not 0 <= index < n:
        raise IndexError(f"task index {index} out of range for {n} items")
    return index


class TaskSlice(Task):
    """Items ``range(len(task))[start:stop:step]`` of ``task`` (e.g. a held-out eval split),
    keeping its name, eval type, letters and evaluate."""

    def __init__(self, task: Task, start: int = 0, stop: int | None = None, step: int = 1):
        super().__init__()
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        self.task = task
        self.indices = range(len(task))[start:stop:step]
        self.name = task.name
        self.eval_type = task.eval_type

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict:
        return self.task[self.indices[_check_index(index, len(self))]]

    def letters(self, index: int) -> list[str]:
        return self.task.letters(self.indices[_check_index(index, len(self))])

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return self.task.evaluate(conversation, completion)


class Mixture(Task):
    """Every item of every task in ``tasks``, in one order shuffled by ``seed``.

    The same tasks and seed always give the same order. Epochs are by repetition: listing a
    task twice includes each of its items twice. ``source(i)`` says which task item ``i`` is
    from (as an index into ``tasks``).
    """

    def __init__(self, tasks: Sequence[Task], seed: int = 0):
        super().__init__()
        if not tasks:
            raise ValueError("a Mixture needs at least one task")
        self.tasks = list(tasks)
        self.name = "mixture(" + ",".join(t.name for t in self.tasks) + ")"
        self.order = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(seed).shuffle(self.order)

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, index: int) -> dict:
        t, i = self.order[_check_index(index, len(self))]
        return self.tasks[t][i]

    def source(self, index: int) -> int:
        return self.order[_check_index(index, len(self))][0]


def user_assistant(user: str, assistant: str | list) -> dict:
    """A two-message conversation."""
    return {
        "messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": assistant},
        ]
    }
