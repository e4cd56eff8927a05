"""ChatArithmeticTask: chat prompts, correct answers, a disjoint seeded split, a resumable sampler, config."""

from __future__ import annotations

import ast
import operator
import re

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.config import ChatArithmeticTaskConfig, validate
from pipeline.rewards import exact_answer
from pipeline.tasks import ChatArithmeticTask
from tests.helpers import compose_train

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _reference(expr: str) -> int:
    """Python's own precedence rules, on the parsed expression (an independent reference)."""

    def ev(node):
        if isinstance(node, ast.BinOp):
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        assert isinstance(node, ast.Constant)
        return node.value

    return ev(ast.parse(expr, mode="eval").body)


def _expr(prompt: str) -> str:
    return re.fullmatch(r"What is (.*)\? Reply with only the number\.", prompt).group(1)


def test_default_prompt_and_answer():
    task = ChatArithmeticTask()
    ex = task.eval_examples[0]
    assert re.fullmatch(r"What is \d\d \+ \d\d\? Reply with only the number\.", ex.prompt), ex.prompt
    assert ex.answer == str(_reference(_expr(ex.prompt)))
    # 90 x 90 two-digit problems: 200 held out, the rest for training
    assert (len(task.eval_examples), len(task.train_examples)) == (200, 90 * 90 - 200)


@pytest.mark.parametrize(("num_terms", "digits", "ops"), [(3, 2, "+-*"), (2, 3, "-"), (4, 1, "*+")])
def test_answers_follow_precedence_and_digit_counts(num_terms, digits, ops):
    task = ChatArithmeticTask(num_terms=num_terms, digits=digits, ops=ops, num_eval=50, num_train=300, seed=3)
    for ex in task.train_examples + task.eval_examples:
        expr = _expr(ex.prompt)
        tokens = expr.split(" ")
        operands, symbols = tokens[::2], tokens[1::2]
        assert len(operands) == num_terms and set(symbols) <= set(ops)
        assert all(len(x) == digits for x in operands), expr
        assert ex.answer == str(_reference(expr)), expr
    # a completion that ends with the answer scores 1 with the chat reward's extraction
    ex = task.eval_examples[0]
    assert exact_answer([f"{_expr(ex.prompt)} = {ex.answer}"], [ex.answer], extract="tag_or_last_number") == [
        1.0
    ]


def test_answer_tag_template():
    template = "Compute {expr}. Give the final answer inside <answer></answer> tags."
    ex = ChatArithmeticTask(template=template).eval_examples[0]
    assert ex.prompt.startswith("Compute ") and ex.prompt.endswith("inside <answer></answer> tags.")
    assert "{expr}" not in ex.prompt


def test_split_is_disjoint_and_seeded():
    a = ChatArithmeticTask(num_terms=3, digits=2, num_train=2000, seed=1)
    b = ChatArithmeticTask(num_terms=3, digits=2, num_train=2000, seed=1)
    c = ChatArithmeticTask(num_terms=3, digits=2, num_train=2000, seed=2)
    assert a.eval_examples == b.eval_examples and a.train_examples == b.train_examples
    assert a.eval_examples != c.eval_examples
    train, held_out = {e.prompt for e in a.train_examples}, {e.prompt for e in a.eval_examples}
    assert len(train) == 2000 and len(held_out) == 200 and not train & held_out


def test_sampler_resumes_exactly():
    task = ChatArithmeticTask(num_terms=2, digits=1, num_eval=20, seed=5)  # 100 problems, 80 to train
    task.sample(70)
    state = task.state_dict()
    expected = task.sample(30)  # crosses an epoch boundary
    resumed = ChatArithmeticTask(num_terms=2, digits=1, num_eval=20, seed=5)
    resumed.load_state_dict(state)
    assert resumed.sample(30) == expected


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"template": "What is 2 + 2?"}, r"\{expr\}"),
        ({"ops": "/"}, "ops"),
        ({"num_terms": 1}, "num_terms"),
        ({"digits": 1, "num_eval": 100}, "num_eval=100"),  # 100 problems, none left to train
        ({"num_terms": 3, "digits": 3}, "set num_train"),  # 7.29e8 problems: no implicit "all the rest"
    ],
)
def test_bad_arguments_say_which(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ChatArithmeticTask(**kwargs)


def test_config_option_composes_and_instantiates():
    cfg = validate(compose_train(["task=chat_arithmetic", "task.num_terms=3", "task.digits=1"]))
    assert isinstance(cfg.task, ChatArithmeticTaskConfig)
    task = instantiate(OmegaConf.structured(cfg.task))
    assert isinstance(task, ChatArithmeticTask)
    assert re.fullmatch(
        r"What is \d \+ \d \+ \d\? Reply with only the number\.", task.eval_examples[0].prompt
    )
    with pytest.raises(ValueError, match=r"task\.template"):
        validate(compose_train(["task=chat_arithmetic", "task.template=no placeholder"]))
