"""task=hf_dataset: every local format, answer extractors, held-out splits, messages, the sampler, errors.

The data sets are written by the tests (Parquet, JSONL, CSV, a folder of files, ``save_to_disk``
folders); nothing reaches the network (conftest sets HF_HUB_OFFLINE=1, the hub tests use a
subprocess with a fresh cache and a closed port).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from pipeline.config import HFDatasetTaskConfig, instantiate_node, validate
from pipeline.config_tasks import AnswerExtractor
from pipeline.hf_dataset import HFDatasetTask, read_examples
from pipeline.tasks import Example, JsonlTask, Message
from tests.helpers import compose_train

ROOT = Path(__file__).resolve().parents[1]
ROWS = [{"prompt": f"{i}+1=", "answer": i + 1} for i in range(20)]
TEST_ROWS = [{"prompt": f"{i}+2=", "answer": i + 2} for i in range(100, 105)]
GSM8K = [
    {"question": "Tom has 40 apples and finds 2 more. How many?", "answer": "40 + 2 = 42\n#### 42"},
    {"question": "A farm sells 1000 eggs and 234 more. How many?", "answer": "1000 + 234\n#### 1,234"},
    {"question": "What is 5 - 7?", "answer": "5 - 7 = -2\n####  -2 "},
    {"question": "Half of 3?", "answer": "3 / 2\n#### 1.5"},
]
CHATS = [
    [{"role": "user", "content": "2+2?"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ],
    [{"role": "user", "content": "9-4?"}, {"role": "assistant", "content": "5"}],
]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Every source format with the same 20 training rows (a held-out `test` split where one fits)."""
    root = tmp_path_factory.mktemp("hf_data")
    train, test = Dataset.from_list(ROWS), Dataset.from_list(TEST_ROWS)
    train.to_parquet(root / "train.parquet")
    train.to_csv(root / "train.csv", index=False)
    (root / "files").mkdir()
    _jsonl(root / "files" / "train.jsonl", ROWS)
    _jsonl(root / "files" / "test.jsonl", TEST_ROWS)
    DatasetDict(train=train, test=test).save_to_disk(root / "saved")
    train.save_to_disk(root / "saved_one")  # a single Dataset: its rows are split `train`
    DatasetDict(train=Dataset.from_list(GSM8K), test=Dataset.from_list(GSM8K[:2])).save_to_disk(
        root / "gsm8k"
    )
    Dataset.from_list(GSM8K).to_parquet(root / "gsm8k.parquet")
    rows = [{"messages": chat, "answer": str(i % len(CHATS))} for i, chat in enumerate(CHATS * 4)]
    _jsonl(root / "chats.jsonl", rows)
    return {
        "parquet": root / "train.parquet",
        "jsonl": _jsonl(root / "train.jsonl", ROWS),
        "csv": root / "train.csv",
        "files": root / "files",
        "saved": root / "saved",
        "saved_one": root / "saved_one",
        "gsm8k": root / "gsm8k",
        "gsm8k_parquet": root / "gsm8k.parquet",
        "chats": root / "chats.jsonl",
        "cache": root / "cache",
    }


def make(data: dict[str, Path], source: str | Path, **kwargs) -> HFDatasetTask:
    path = data[source] if isinstance(source, str) else source
    return HFDatasetTask(path=path, cache_dir=data["cache"], **kwargs)


# ---------------------------------------------------------------------- formats
@pytest.mark.parametrize("source", ["parquet", "jsonl", "csv", "files", "saved", "saved_one"])
def test_every_local_format_gives_the_same_examples(data, source):
    task = make(data, source, eval_fraction=0.25, seed=3)
    reference = make(data, "jsonl", eval_fraction=0.25, seed=3)
    assert task.train_examples == reference.train_examples
    assert task.eval_examples == reference.eval_examples
    assert len(task.eval_examples) == 5 and len(task.train_examples) == 15
    assert Example("7+1=", "8") in task.train_examples + task.eval_examples  # numbers become strings


def test_fraction_split_matches_jsonl_task(data):
    for fraction, seed in ((0.1, 0), (0.25, 7), (0.0, 1)):
        ours = make(data, "parquet", eval_fraction=fraction, seed=seed)
        theirs = JsonlTask(path=data["jsonl"], eval_fraction=fraction, seed=seed)
        assert (ours.train_examples, ours.eval_examples) == (theirs.train_examples, theirs.eval_examples)
    assert make(data, "parquet", eval_fraction=0.0).eval_examples == []


@pytest.mark.parametrize("source", ["files", "saved"])
def test_eval_split_is_held_out_whole(data, source):
    task = make(data, source, eval_split="test", eval_fraction=0.5)  # eval_fraction unused
    assert [e.prompt for e in task.eval_examples] == [r["prompt"] for r in TEST_ROWS]
    assert [e.prompt for e in task.train_examples] == [r["prompt"] for r in ROWS]


def test_max_examples_and_streaming_keep_the_first_rows(data):
    eager = make(data, "parquet", max_examples=8, eval_fraction=0.25)
    assert len(eager.train_examples) + len(eager.eval_examples) == 8
    assert {e.prompt for e in eager.train_examples + eager.eval_examples} == {r["prompt"] for r in ROWS[:8]}
    for source in ("parquet", "jsonl", "saved"):
        streamed = make(data, source, streaming=True, max_examples=8, eval_fraction=0.25)
        assert (streamed.train_examples, streamed.eval_examples) == (
            eager.train_examples,
            eager.eval_examples,
        )
    both = make(data, "files", streaming=True, max_examples=3, eval_split="test")
    assert len(both.train_examples) == len(both.eval_examples) == 3


# ---------------------------------------------------------------------- answers
def test_gsm8k_extractor(data):
    task = make(data, "gsm8k_parquet", prompt_field="question", answer_extractor="gsm8k", eval_fraction=0)
    assert [e.answer for e in task.train_examples] == ["42", "1234", "-2", "1.5"]
    assert task.train_examples[0].prompt == GSM8K[0]["question"]
    plain = make(data, "gsm8k_parquet", prompt_field="question", eval_fraction=0)
    assert plain.train_examples[0].answer == GSM8K[0]["answer"]  # answer_extractor=none: as it is


def test_regex_extractor_uses_the_first_group_or_the_match(data):
    kw = {"prompt_field": "question", "answer_extractor": "regex", "eval_fraction": 0}
    grouped = make(data, "gsm8k_parquet", answer_regex=r"####\s*(-?[\d,.]+)", **kw)
    assert [e.answer for e in grouped.train_examples] == ["42", "1,234", "-2", "1.5"]
    whole = make(data, "gsm8k_parquet", answer_regex=r"-?\d+\s*$", **kw)
    assert [e.answer for e in whole.train_examples] == ["42", "234", "-2", "5"]


# ---------------------------------------------------------------------- messages
def test_messages_column_keeps_the_chat_up_to_the_last_user_turn(data):
    task = make(data, "chats", prompt_field=None, messages_field="messages", eval_fraction=0)
    first, second, third = task.train_examples[:3]
    assert first == Example("2+2?", "0", (Message("user", "2+2?"),))
    assert second.prompt == "and 3+3?"
    assert [m.role for m in second.messages] == ["system", "user", "assistant", "user"]
    assert second.messages[0] == Message("system", "Be brief.")
    assert third.messages == (Message("user", "9-4?"),)  # the reply after the last user turn is dropped
    assert len({*task.train_examples}) == len(CHATS)  # hashable: rows repeat 4 times
    assert Example("a", "1") == Example("a", "1", None)  # two-field construction still works


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        (
            [{"role": "assistant", "content": "hi"}],
            r"row 0: 'messages' has no user turn \(roles: \['assistant'\]\)",
        ),
        ([], r"row 0: 'messages' must be a non-empty list"),
        ("hello", r"row 0: 'messages' must be a non-empty list"),
        ([{"role": "user"}], r"row 0: 'messages': each turn must be"),
        ([{"role": "user", "content": "  "}], r"row 0: 'messages': the last user turn is empty"),
    ],
)
def test_bad_messages_name_the_row(tmp_path, messages, match):
    path = _jsonl(
        tmp_path / "m.jsonl",
        [{"messages": messages, "answer": "1"}, *([{"messages": CHATS[0], "answer": "1"}] * 3)],
    )
    with pytest.raises(ValueError, match=match):
        HFDatasetTask(path=path, prompt_field=None, messages_field="messages", cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------- sampler
def test_sampler_is_deterministic_and_resumes(data):
    a, b = make(data, "parquet", seed=5), make(data, "parquet", seed=5)
    assert a.sample(30) == b.sample(30)
    assert make(data, "parquet", seed=6).sample(30) != make(data, "parquet", seed=5).sample(30)

    uninterrupted = make(data, "parquet", seed=5)
    expected = uninterrupted.sample(13) + uninterrupted.sample(25)
    run = make(data, "parquet", seed=5)
    head = run.sample(13)
    state = json.loads(json.dumps(run.state_dict()))  # a checkpoint round trip
    assert state == {"seed": 5, "epoch": 0, "position": 13, "num_train": 18}
    resumed = make(data, "parquet", seed=5)
    resumed.sample(3)
    resumed.load_state_dict(state)
    assert head + resumed.sample(25) == expected
    with pytest.raises(ValueError, match="training examples"):
        make(data, "parquet", seed=5, max_examples=10).load_state_dict(state)  # a different data set


# ---------------------------------------------------------------------- errors
BAD_ARGUMENTS = [
    ({"split": "dev"}, r"task\.split='dev' is not a split of .*saved; available: \['test', 'train'\]"),
    (
        {"eval_split": "validation"},
        r"task\.eval_split='validation' is not a split of .*available: \['test', 'train'\]",
    ),
    (
        {"prompt_field": "question"},
        r"task\.prompt_field='question' is not a column of .*saved \[train\]; columns: \['answer', 'prompt'\]",
    ),
    (
        {"answer_field": "solution"},
        r"task\.answer_field='solution' is not a column of .*columns: \['answer', 'prompt'\]",
    ),
    ({"prompt_field": None, "messages_field": "chat"}, r"task\.messages_field='chat' is not a column"),
    ({"eval_split": "test", "answer_field": "solution"}, r"task\.answer_field='solution'"),
    ({"prompt_field": None}, r"exactly one of task\.prompt_field and task\.messages_field"),
    ({"messages_field": "messages"}, r"exactly one of task\.prompt_field and task\.messages_field"),
    ({"prompt_field": ""}, r"task\.prompt_field must be a non-empty string"),
    ({"answer_field": ""}, r"task\.answer_field must be a non-empty string"),
    ({"split": ""}, r"task\.split must be a non-empty string"),
    ({"eval_split": "train"}, r"task\.eval_split must differ from task\.split"),
    ({"answer_extractor": "gsm9k"}, r"task\.answer_extractor must be one of \['none', 'gsm8k', 'regex'\]"),
    ({"answer_extractor": "regex"}, r"task\.answer_regex"),
    ({"answer_regex": r"\d+"}, r"task\.answer_regex"),
    (
        {"answer_extractor": "regex", "answer_regex": "(unclosed"},
        r"task\.answer_regex='\(unclosed' is not a regular",
    ),
    ({"eval_fraction": 1.0}, r"task\.eval_fraction must be in \[0, 1\)"),
    ({"eval_fraction": "0.1"}, r"task\.eval_fraction must be a number"),
    ({"max_examples": 0}, r"task\.max_examples must be an int >= 1"),
    ({"streaming": True}, r"task\.streaming=true needs task\.max_examples"),
    ({"streaming": "yes"}, r"task\.streaming must be true or false"),
    ({"seed": -1}, r"task\.seed must be an int >= 0"),
    ({"name": "main"}, r"task\.name='main': .*saved is a save_to_disk folder"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_ARGUMENTS, ids=lambda x: str(x)[:60])
def test_bad_arguments_name_the_key(data, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(data, "saved", **kwargs)


@pytest.mark.parametrize(
    ("rows", "kwargs", "match"),
    [
        ([{"prompt": " ", "answer": "1"}], {}, r"d\.jsonl \[train\] row 0: 'prompt' is empty"),
        ([{"prompt": "a", "answer": ""}], {}, r"row 0: 'answer' is empty"),
        ([{"prompt": "a", "answer": None}], {}, r"row 0: 'answer' must be a string or number, got NoneType"),
        ([{"prompt": "a", "answer": True}], {}, r"row 0: 'answer' must be a string or number, got bool"),
        ([{"prompt": 3, "answer": "1"}], {}, r"row 0: 'prompt' must be a string, got int"),
        (
            [{"prompt": "a", "answer": "42"}],
            {"answer_extractor": "gsm8k"},
            r"row 0: 'answer' has no '#### ' answer marker",
        ),
        (
            [{"prompt": "a", "answer": "x"}],
            {"answer_extractor": "regex", "answer_regex": r"\d"},
            r"row 0: 'answer' does not match task\.answer_regex",
        ),
        (
            [{"prompt": "a", "answer": "1"}],
            {"eval_fraction": 0.1},
            r"d\.jsonl \[train\]: eval_fraction=0\.1 holds out 1 of 1 .*task\.eval_split",
        ),
        (["{not json"], {}, r"task\.path='.*d\.jsonl': cannot load a json file"),
    ],
)
def test_bad_rows_name_the_row_and_field(tmp_path, rows, kwargs, match):
    good = [] if kwargs.get("eval_fraction") else [{"prompt": "ok", "answer": "1"}] * 3
    path = _jsonl(tmp_path / "d.jsonl", [*rows, *good])
    with pytest.raises(ValueError, match=match):
        HFDatasetTask(path=path, cache_dir=tmp_path / "c", **{"eval_fraction": 0, **kwargs})


def test_missing_and_unreadable_paths(tmp_path):
    for missing in ("nope.parquet", "data/train.jsonl", "./folder", "a/b/c"):
        with pytest.raises(FileNotFoundError, match=rf"task\.path='{missing}': no such file or folder"):
            HFDatasetTask(path=missing)
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=r"cannot read \.txt files; use \['\.arrow', '\.csv'"):
        HFDatasetTask(path=tmp_path / "notes.txt")
    empty = Dataset.from_dict({"prompt": [], "answer": []})
    empty.to_parquet(tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match=r"task\.path='.*empty\.parquet': cannot load a parquet file"):
        HFDatasetTask(path=tmp_path / "empty.parquet", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match=r"empty \[train\]: no examples \(the split is empty\)"):
        read_examples(
            empty, where="empty [train]", prompt_field="prompt", messages_field=None, answer_field="answer"
        )


_HUB_PROBE = """
import json, sys, time
import datasets.config, huggingface_hub.constants
from pipeline.hf_dataset import HFDatasetTask, read_examples
out = {}
for mode in ("unreachable", "offline"):
    if mode == "offline":
        huggingface_hub.constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    start = time.monotonic()
    try:
        HFDatasetTask(path="openai/gsm8k", name="main", prompt_field="question")
        message = "loaded"
    except ValueError as err:
        message = str(err)
    out[mode] = [time.monotonic() - start, message]
print(json.dumps(out))
"""


def test_hub_id_without_network_fails_fast(tmp_path):
    """No retries for minutes: a closed port fails the one probe; offline mode reads only the (empty) cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", _HUB_PROBE], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    seconds, message = out["unreachable"]
    assert seconds < 5, out
    assert "task.path='openai/gsm8k' is not a local file or folder and the Hub cannot be reached" in message
    assert "HF_HUB_OFFLINE=1" in message
    seconds, message = out["offline"]
    assert seconds < 5, out
    assert "task.path='openai/gsm8k': cannot load a hub data set: HF_HUB_OFFLINE is set" in message


# ---------------------------------------------------------------------- Hydra
def test_compose_validate_and_instantiate(data):
    cfg = compose_train(
        [
            "task=hf_dataset",
            f"task.path={data['parquet']}",
            f"task.cache_dir={data['cache']}",
            "task.eval_fraction=0.25",
            "seed=3",
        ]
    )
    typed = validate(cfg)
    assert isinstance(typed.task, HFDatasetTaskConfig) and typed.task.seed == 3
    task = instantiate_node(typed.task, "task")
    assert isinstance(task, HFDatasetTask)
    assert task.eval_examples == make(data, "jsonl", eval_fraction=0.25, seed=3).eval_examples


def test_gsm8k_preset_on_a_local_copy(data):
    cfg = compose_train(["task=gsm8k"])
    typed = validate(cfg)
    assert (typed.task.path, typed.task.name, typed.task.eval_split) == ("openai/gsm8k", "main", "test")
    assert typed.task.answer_extractor is AnswerExtractor.gsm8k and typed.task.prompt_field == "question"
    local = compose_train(
        ["task=gsm8k", f"task.path={data['gsm8k']}", "task.name=null", f"task.cache_dir={data['cache']}"]
    )
    task = instantiate_node(validate(local).task, "task")
    assert [e.answer for e in task.train_examples] == ["42", "1234", "-2", "1.5"]
    assert [e.answer for e in task.eval_examples] == ["42", "1234"]


def test_messages_through_hydra(data):
    cfg = compose_train(
        [
            "task=hf_dataset",
            f"task.path={data['chats']}",
            "task.prompt_field=null",
            "task.messages_field=messages",
            "task.eval_fraction=0",
        ]
    )
    task = instantiate_node(validate(cfg).task, "task")
    assert task.train_examples[1].messages[-1] == Message("user", "and 3+3?")


@pytest.mark.parametrize(
    ("overrides", "err", "match"),
    [
        (["task=hf_dataset"], Exception, r"task\.path"),
        (
            ["task=hf_dataset", "task.path=x.parquet", "task.answer_extractor=gsm9k"],
            Exception,
            r"answer_extractor",
        ),
        (["task=hf_dataset", "task.path=x.parquet", "task.prompt_fild=q"], Exception, r"prompt_fild"),
        (
            ["task=hf_dataset", "task.path={saved}", "task.prompt_field=question"],
            ValueError,
            r"task\.prompt_field='question'",
        ),
        (
            ["task=hf_dataset", "task.path={saved}", "task.split=dev"],
            ValueError,
            r"task\.split='dev'.*\['test', 'train'\]",
        ),
        (
            ["task=hf_dataset", "task.path=missing/train.parquet"],
            FileNotFoundError,
            r"task\.path='missing/train\.parquet'",
        ),
    ],
)
def test_bad_config_fails_at_compose_validate_or_build(data, overrides, err, match):
    """Composition, validation or the task constructor: the recipe builds the task before the model."""
    with pytest.raises(err, match=match):
        cfg = compose_train([o.format(saved=data["saved"]) for o in overrides])
        instantiate_node(validate(cfg).task, "task")


def test_streaming_is_off_by_default():
    assert HFDatasetTaskConfig().streaming is False
    assert "streaming: false" in (ROOT / "conf" / "task" / "hf_dataset.yaml").read_text()
    started = time.monotonic()
    with pytest.raises(ValueError, match="streaming"):
        HFDatasetTask(path="openai/gsm8k", streaming=True)  # rejected before any hub access
    assert time.monotonic() - started < 1
