"""Chat tasks (nanochat/tasks/): rendering masks, mixtures, slices, GSM8K parsing, metadata.

A small BPE is trained once per module on the tasks' own text. CPU only, offline.
"""

from __future__ import annotations

import json

import pytest
from helpers.builders import tokenizer_for

from nanochat.inference.engine import use_calculator
from nanochat.tasks import (
    ARC,
    GSM8K,
    MMLU,
    CustomJSONL,
    HumanEval,
    Identity,
    Mixture,
    SmolTalk,
    SpellingBee,
    Task,
    TaskSlice,
    extract_answer,
    render_question,
    solution_parts,
)
from nanochat.tasks.base import user_assistant
from nanochat.tasks.hub import task_data_dir
from nanochat.tasks.multiple_choice import INSTRUCTION


def all_tasks() -> dict[str, Task]:
    return {
        "gsm8k": GSM8K(n=40),
        "arc-easy": ARC("ARC-Easy"),
        "arc-challenge": ARC("ARC-Challenge"),
        "mmlu": MMLU(),
        "spelling": SpellingBee(n=40),
        "identity": Identity(),
        "smoltalk": SmolTalk(),
        "humaneval": HumanEval(),
    }


def message_texts(conversation: dict) -> list[str]:
    out = []
    for m in conversation["messages"]:
        content = m["content"]
        out += [content] if isinstance(content, str) else [p["text"] for p in content]
    return out


@pytest.fixture(scope="module")
def tok():
    texts = [t for task in all_tasks().values() for c in task for t in message_texts(c)]
    return tokenizer_for(iter(texts * 3), 600)


def supervised_text(conversation: dict) -> str:
    """What the mask should select: assistant text and python code, with their specials."""
    out = []
    for m in conversation["messages"]:
        if m["role"] != "assistant":
            continue
        content = m["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        for p in parts:
            if p["type"] == "text":
                out.append(p["text"])
            elif p["type"] == "python":
                out.append(f"<|python_start|>{p['text']}<|python_end|>")
        out.append("<|assistant_end|>")
    return "".join(out)


# --- rendering masks -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(all_tasks()))
def test_only_assistant_tokens_are_supervised(tok, name):
    task = all_tasks()[name]
    for conversation in list(task)[:25]:
        ids, mask = tok.render_conversation(conversation, max_tokens=100_000)
        assert len(ids) == len(mask) and set(mask) <= {0, 1}
        chosen = [i for i, m in zip(ids, mask, strict=True) if m]
        assert tok.decode(chosen) == supervised_text(conversation)
        prompt = tok.render_for_completion(conversation)
        assert ids[: len(prompt) - 1] == prompt[:-1]


def test_tool_outputs_are_not_supervised(tok):
    conversation = GSM8K(n=5)[0]
    ids, mask = tok.render_conversation(conversation)
    start, end = tok.special_id("<|output_start|>"), tok.special_id("<|output_end|>")
    inside = False
    seen = 0
    for i, m in zip(ids, mask, strict=True):
        if i == start:
            inside, seen = True, seen + 1
        if inside:
            assert m == 0
        if i == end:
            inside = False
    assert seen >= 2


# --- embedded builds ----------------------------------------------------------------------


def test_embedded_builds_are_deterministic():
    first, second = all_tasks(), all_tasks()
    for name in first:
        assert len(first[name]) >= 10, name
        assert list(first[name]) == list(second[name]), name
    assert list(GSM8K(n=20, seed=1)) != list(GSM8K(n=20, seed=0))
    assert list(GSM8K(n=20, split="test")) != list(GSM8K(n=20, split="train"))


def test_calculator_parts_agree_with_the_engine():
    for task in (GSM8K(n=200), SpellingBee(n=100)):
        for conversation in task:
            parts = conversation["messages"][-1]["content"]
            pairs = list(zip(parts, parts[1:], strict=False))
            calls = [(a, b) for a, b in pairs if a["type"] == "python"]
            assert calls
            for call, output in calls:
                assert output["type"] == "python_output"
                assert use_calculator(call["text"]) == output["text"], call["text"]


def test_generative_tasks_accept_their_own_answers():
    for task in (GSM8K(n=30), SpellingBee(n=30)):
        for c in task:
            answer = "".join(p["text"] for p in c["messages"][-1]["content"])
            assert task.evaluate(c, answer)
            assert not task.evaluate(c, answer.rsplit("####", 1)[0] + "#### 123456")
    assert GSM8K(n=1).reward(GSM8K(n=1)[0], "no answer") == 0.0


def test_humaneval_runs_the_tests():
    task = HumanEval()
    c = task[0]
    assert task.evaluate(c, "```python\n" + c["messages"][1]["content"] + "```")
    assert task.evaluate(c, "    return a + b\n")  # body only: the prompt is prepended
    assert not task.evaluate(c, "    return a - b\n")


def test_sources():
    with pytest.raises(FileNotFoundError, match="openai/gsm8k"):
        GSM8K(source="hub")  # never a silent fallback to the embedded data
    with pytest.raises(ValueError, match="source"):
        MMLU(source="web")
    with pytest.raises(ValueError, match="source"):
        Identity(source="hub")


# --- mixtures and slices ------------------------------------------------------------------


class Numbers(Task):
    def __init__(self, name: str, n: int):
        super().__init__()
        self.name = name
        self._items = [user_assistant(f"{name}{i}", "ok") for i in range(n)]


def keys(task: Task) -> list[str]:
    return [c["messages"][0]["content"] for c in task]


def test_mixture_is_deterministic_and_shuffled():
    a, b = Numbers("a", 20), Numbers("b", 30)
    m1, m2 = Mixture([a, b], seed=7), Mixture([a, b], seed=7)
    assert keys(m1) == keys(m2)
    assert sorted(keys(m1)) == sorted(keys(a) + keys(b))
    assert keys(m1) != keys(a) + keys(b)
    assert keys(Mixture([a, b], seed=8)) != keys(m1)
    assert m1.tasks[m1.source(0)][0]["messages"][0]["content"][0] in "ab"


def test_mixture_epochs_by_repetition():
    a, b = Numbers("a", 5), Numbers("b", 3)
    m = Mixture([a, a, b], seed=0)
    assert len(m) == 13
    ks = keys(m)
    assert all(ks.count(f"a{i}") == 2 for i in range(5))
    assert all(ks.count(f"b{i}") == 1 for i in range(3))
    with pytest.raises(IndexError):
        m[13]
    assert m[-1] == m[12]
    with pytest.raises(ValueError):
        Mixture([])


def test_task_slice():
    a = Numbers("a", 10)
    assert keys(TaskSlice(a, 2, 8, 2)) == ["a2", "a4", "a6"]
    assert keys(TaskSlice(a, 7)) == ["a7", "a8", "a9"]
    assert len(TaskSlice(a, 20)) == 0
    mmlu = MMLU()
    s = TaskSlice(mmlu, 1, 10, 3)
    assert s.eval_type == "categorical" and s.letters(1) == mmlu.letters(4)
    assert s[2] == mmlu[7]
    with pytest.raises(ValueError):
        TaskSlice(a, 0, 5, 0)


# --- GSM8K parsing ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so 18 eggs\n#### 18", "18"),
        ("#### 1,234,567", "1234567"),
        ("#### -42", "-42"),
        ("#### 3.75", "3.75"),
        ("#### $1,000.50", None),  # not a number after ####
        ("the answer is 18", None),
        ("#### 1\nno wait\n#### 2", "2"),
        ("####7", "7"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_evaluate_compares_numbers():
    task = GSM8K(n=1)
    ref = user_assistant("q", "#### 3.5")
    assert task.evaluate(ref, "#### 3.50")
    assert not task.evaluate(ref, "#### 35")
    assert not task.evaluate(ref, "3.5")  # missing ####
    assert task.evaluate(user_assistant("q", "#### 1200"), "#### 1,200")
    assert task.evaluate(user_assistant("q", "#### -5"), "x\n#### -5")


def test_calculator_annotations_become_parts():
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nTotal <<48+24=72>>72.\n#### 72"
    assert solution_parts(solution) == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nTotal "},
        {"type": "python", "text": "48+24"},
        {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72.\n#### 72"},
    ]
    assert solution_parts("no calls\n#### 1") == [{"type": "text", "text": "no calls\n#### 1"}]
    assert solution_parts("<<a>> b") == [{"type": "text", "text": "<<a>> b"}]


# --- multiple choice ----------------------------------------------------------------------


def test_multiple_choice_rendering_and_letters():
    text = render_question("2+2?", ["3", "4", "5"])
    assert text == "2+2?\n- 3=A\n- 4=B\n- 5=C\n" + INSTRUCTION
    for task in (ARC("ARC-Easy"), ARC("ARC-Challenge"), MMLU(), MMLU("auxiliary_train")):
        assert task.eval_type == "categorical"
        answers = set()
        for i, c in enumerate(task):
            assert task.letters(i) == ["A", "B", "C", "D"] == c["letters"]
            answer = c["messages"][-1]["content"]
            assert answer in task.letters(i) and task.answer(i) == answer
            assert f"={answer}\n" in c["messages"][0]["content"]
            assert c["messages"][0]["content"].endswith(INSTRUCTION)
            assert task.evaluate(c, f" {answer}\n")
            answers.add(answer)
        assert len(answers) >= 3  # answers are spread over the letters
    with pytest.raises(TypeError, match="categorical"):
        GSM8K(n=1).letters(0)
    with pytest.raises(ValueError, match="subset"):
        ARC("ARC-Medium")


# --- custom JSONL -------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_custom_jsonl_loads(tmp_path):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    path = write_lines(tmp_path / "mine.jsonl", [json.dumps(good), "", json.dumps(good)])
    task = CustomJSONL(path)
    assert len(task) == 2 and task[1] == good and task.eval_type is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "messages"),
        ('{"messages": []}', "at least one message"),
        ('{"messages": [{"role": "assistant", "content": "x"}]}', "expected role 'user'"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role"),
        (
            '{"messages": [{"role": "user", "content": "x"}, '
            '{"role": "assistant", "content": [{"type": "image", "text": "y"}]}]}',
            "unknown part type",
        ),
    ],
)
def test_custom_jsonl_errors_name_the_line(tmp_path, line, message):
    good = json.dumps(user_assistant("hi", "yo"))
    path = write_lines(tmp_path / "bad.jsonl", [good, "", line])
    with pytest.raises(ValueError, match=message) as info:
        CustomJSONL(path)
    assert "bad.jsonl:3:" in str(info.value)


def test_custom_jsonl_file_errors(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        CustomJSONL(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="no conversations"):
        CustomJSONL(write_lines(tmp_path / "empty.jsonl", [""]))
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\n")
    with pytest.raises(ValueError, match="UTF-8"):
        CustomJSONL(tmp_path / "bin.jsonl")


# --- hub source (parquet files in the local task-data cache) -------------------------------


def put_parquet(name: str, split: str, rows: list[dict], file: str = "part-0.parquet"):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = task_data_dir(name, split)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / file)


def test_hub_tasks_read_the_cache(tok, base_dir):
    put_parquet("gsm8k", "train", [{"question": "q?", "answer": "2 * 3 = <<2*3=6>>6\n#### 6"}])
    arc_choices = {"text": ["red", "blue", "green"], "label": ["1", "2", "3"]}
    put_parquet(
        "arc-easy", "test", [{"question": "Sky?", "choices": arc_choices, "answerKey": "2"}]
    )
    mmlu_row = {"question": "1+1?", "choices": ["1", "2", "3", "4"], "answer": 1, "subject": "m"}
    put_parquet("mmlu", "test", [mmlu_row])
    put_parquet("mmlu-auxiliary_train", "train", [{"train": mmlu_row}])
    problem = HumanEval().problems[0]
    put_parquet(
        "humaneval",
        "test",
        [
            {
                "task_id": "HumanEval/0",
                "prompt": problem.prompt,
                "canonical_solution": problem.solution,
                "test": problem.test,
                "entry_point": problem.entry_point,
            }
        ],
    )
    put_parquet("smoltalk", "train", [user_assistant("hi", "hello")])

    gsm = GSM8K(source="hub", split="train")
    assert gsm[0]["messages"][1]["content"][1] == {"type": "python", "text": "2*3"}
    arc = ARC("ARC-Easy", source="hub")
    assert arc[0]["messages"][0]["content"] == render_question("Sky?", ["red", "blue", "green"])
    assert arc.answer(0) == "B" and arc.letters(0) == ["A", "B", "C"]
    assert MMLU(source="hub").answer(0) == "B"
    assert MMLU("auxiliary_train", source="hub")[0] == MMLU(source="hub")[0]
    humaneval = HumanEval(source="hub")
    assert len(humaneval) == 1 and humaneval[0]["entry_point"] == problem.entry_point
    smol = SmolTalk(source="hub")
    assert smol[0] == user_assistant("hi", "hello")
    for task in (gsm, arc, humaneval, smol):
        ids, mask = tok.render_conversation(task[0])
        assert tok.decode([i for i, m in zip(ids, mask, strict=True) if m]) == supervised_text(
            task[0]
        )


def test_hub_errors_name_the_row_or_folder(base_dir):
    with pytest.raises(FileNotFoundError, match="task_data/arc-challenge/test"):
        ARC("ARC-Challenge", source="hub")
    put_parquet("gsm8k", "test", [{"question": "q?", "answer": "#### 1"}, {"question": "q?"}])
    with pytest.raises(ValueError, match="gsm8k: row 1"):
        GSM8K(source="hub", split="test")
    put_parquet("mmlu", "test", [{"question": "q", "choices": ["a", "b"], "answer": 5}])
    with pytest.raises(ValueError, match="mmlu: row 0"):
        MMLU(source="hub")
    put_parquet("smoltalk", "test", [{"messages": [{"role": "assistant", "content": "x"}]}])
    with pytest.raises(ValueError, match="smoltalk: row 0.*expected role"):
        SmolTalk(source="hub", split="test")
    folder = task_data_dir("humaneval", "test")
    folder.mkdir(parents=True)
    (folder / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="broken.parquet: not a readable parquet"):
        HumanEval(source="hub")
