"""Tasks: deterministic and resumable sampling, disjoint eval sets, JSONL parsing and its errors."""

from __future__ import annotations

import json

import pytest

from pipeline.tasks import ArithmeticTask, Example, JsonlTask, Task, read_jsonl


def _write(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------- sampler
def test_sampler_is_deterministic_and_seed_dependent():
    a, b, c = ArithmeticTask(seed=1), ArithmeticTask(seed=1), ArithmeticTask(seed=2)
    assert a.sample(50) == b.sample(50)
    assert a.sample(50) == b.sample(50)
    assert ArithmeticTask(seed=1).sample(50) != c.sample(50)


def test_sampler_walks_a_permutation_per_epoch():
    examples = [Example(f"{i}=", str(i)) for i in range(7)]
    task = Task(examples, [], seed=3)
    first, second = task.sample(7), task.sample(7)
    assert sorted(first, key=lambda e: e.prompt) == examples
    assert sorted(second, key=lambda e: e.prompt) == examples
    assert first != second  # a fresh shuffle each epoch
    assert task.state_dict() == {"seed": 3, "epoch": 1, "position": 7, "num_train": 7}


@pytest.mark.parametrize("cut", [1, 5, 7, 9, 20])
def test_resume_draws_the_same_examples(cut):
    examples = [Example(f"{i}=", str(i)) for i in range(7)]
    uninterrupted = Task(examples, [], seed=0)
    expected = uninterrupted.sample(cut) + uninterrupted.sample(11) + uninterrupted.sample(3)

    run = Task(examples, [], seed=0)
    head = run.sample(cut)
    state = json.loads(json.dumps(run.state_dict()))  # survives a checkpoint round trip
    assert all(type(v) is int for v in state.values())
    resumed = Task(examples, [], seed=0)
    resumed.sample(4)  # a resumed task may have drawn before loading: the state wins
    resumed.load_state_dict(state)
    assert head + resumed.sample(11) + resumed.sample(3) == expected


def test_load_state_dict_rejects_bad_state():
    task = ArithmeticTask(digits=1, num_eval=10)
    with pytest.raises(ValueError, match="missing keys"):
        task.load_state_dict({"seed": 0})
    with pytest.raises(ValueError, match="training examples"):
        task.load_state_dict({"seed": 0, "epoch": 0, "position": 0, "num_train": 5})
    with pytest.raises(ValueError, match="position"):
        task.load_state_dict({"seed": 0, "epoch": 0, "position": -1})


# ---------------------------------------------------------------------- arithmetic
def test_arithmetic_examples_are_correct_and_plain_text():
    task = ArithmeticTask(digits=2, ops="+-*", num_eval=50, seed=0)
    for ex in task.train_examples[:300] + task.eval_examples:
        a, op, b = ex.prompt[:-1].partition(next(c for c in ex.prompt if c in "+-*"))
        assert ex.prompt.endswith("=") and a.isdigit() and b.isdigit()
        assert int(ex.answer) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
        assert int(ex.answer) >= 0


def test_arithmetic_eval_is_heldout_deterministic_and_covers_the_space():
    task = ArithmeticTask(digits=2, ops="+", num_eval=200, seed=0)
    train, held = {e.prompt for e in task.train_examples}, {e.prompt for e in task.eval_examples}
    assert len(held) == len(task.eval_examples) == 200
    assert not train & held
    assert len(train) + len(held) == 100 * 100
    assert ArithmeticTask(digits=2, ops="+", num_eval=200, seed=0).eval_examples == task.eval_examples
    assert ArithmeticTask(digits=2, ops="+", num_eval=200, seed=1).eval_examples != task.eval_examples
    # "-" maps (a, b) and (b, a) to one prompt: no duplicates, still disjoint
    sub = ArithmeticTask(digits=1, ops="-", num_eval=5)
    prompts = [e.prompt for e in sub.train_examples + sub.eval_examples]
    assert len(prompts) == len(set(prompts)) == 55


def test_arithmetic_num_train_subsamples():
    task = ArithmeticTask(digits=3, ops="+", num_eval=20, num_train=500, seed=0)
    assert len(task.train_examples) == 500
    assert not {e.prompt for e in task.train_examples} & {e.prompt for e in task.eval_examples}


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"digits": 0}, "digits"),
        ({"digits": -1}, "digits"),
        ({"digits": 1.5}, "digits"),
        ({"num_eval": 0}, "num_eval"),
        ({"num_train": 0}, "num_train"),
        ({"ops": "/"}, "ops"),
        ({"ops": ""}, "ops"),
        ({"ops": "++"}, "ops"),
        ({"seed": -1}, "seed"),
        ({"digits": 1, "num_eval": 100}, "num_eval"),
        ({"digits": 4}, "num_train"),
    ],
)
def test_arithmetic_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ArithmeticTask(**kwargs)


# ---------------------------------------------------------------------- jsonl
def test_jsonl_happy_path(tmp_path):
    rows = [{"prompt": f"q{i}", "answer": i, "extra": True} for i in range(20)]
    path = _write(tmp_path / "data.jsonl", [*rows[:10], "", *rows[10:]])  # blank lines are skipped
    task = JsonlTask(path=path, eval_fraction=0.1, seed=0)
    assert len(task.eval_examples) == 2 and len(task.train_examples) == 18
    assert {e.prompt for e in task.train_examples}.isdisjoint(e.prompt for e in task.eval_examples)
    assert all(isinstance(e.answer, str) for e in task.train_examples)
    assert Example("q3", "3") in task.train_examples + task.eval_examples
    assert JsonlTask(path=path, seed=0).eval_examples == task.eval_examples
    assert len(JsonlTask(path=path, eval_fraction=0).eval_examples) == 0


def test_jsonl_eval_path_and_custom_keys(tmp_path):
    train = _write(tmp_path / "t.jsonl", [{"q": "1+1=", "a": "2"}, {"q": "2+2=", "a": 4.5}])
    held = _write(tmp_path / "e.jsonl", [{"q": "3+3=", "a": "6"}])
    task = JsonlTask(path=train, eval_path=held, prompt_key="q", answer_key="a")
    assert task.train_examples == [Example("1+1=", "2"), Example("2+2=", "4.5")]
    assert task.eval_examples == [Example("3+3=", "6")]


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (['{"prompt": "a", "answer": "1"}', "{not json"], r"bad\.jsonl:2: invalid JSON"),
        (['{"prompt": "a", "answer": "1"}', '{"answer": "1"}'], r"bad\.jsonl:2: missing key 'prompt'"),
        (['{"prompt": "a"}'], r"bad\.jsonl:1: missing key 'answer'"),
        (['{"prompt": 3, "answer": "1"}'], r"bad\.jsonl:1: 'prompt' must be a string"),
        (['{"prompt": "  ", "answer": "1"}'], r"bad\.jsonl:1: 'prompt' is empty"),
        (['{"prompt": "a", "answer": ""}'], r"bad\.jsonl:1: 'answer' is empty"),
        (['{"prompt": "a", "answer": [1]}'], r"bad\.jsonl:1: 'answer' must be a string or number"),
        (['{"prompt": "a", "answer": true}'], r"bad\.jsonl:1: 'answer' must be a string or number"),
        (['["a", "1"]'], r"bad\.jsonl:1: expected a JSON object"),
        ([], r"bad\.jsonl: no examples"),
        (['{"prompt": "a", "answer": "1"}'], r"bad\.jsonl: eval_fraction=0\.1 holds out 1 of 1"),
    ],
)
def test_jsonl_bad_input_names_file_line_and_key(tmp_path, lines, match):
    path = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=match):
        JsonlTask(path=path)


def test_jsonl_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        JsonlTask(path=tmp_path / "nope.jsonl")
    good = _write(tmp_path / "ok.jsonl", [{"prompt": "a", "answer": "1"}] * 3)
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl"):
        JsonlTask(path=good, eval_path=tmp_path / "missing.jsonl")
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match="eval_fraction"):
            JsonlTask(path=good, eval_fraction=bad)
    with pytest.raises(ValueError, match="seed"):
        JsonlTask(path=good, seed=-1)
    assert read_jsonl(good) == [Example("a", "1")] * 3
