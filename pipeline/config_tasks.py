"""Schemas of what is trained on and measured: ``task`` (one per task class, chosen by ``_target_``),
``reward`` and ``eval`` (evaluate.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from omegaconf import MISSING

from pipeline.config_types import OnError, _require


@dataclass
class ArithmeticTaskConfig:
    _target_: str = "pipeline.tasks.ArithmeticTask"
    digits: int = 2
    ops: str = "+"
    num_eval: int = 200
    num_train: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from pipeline.tasks import ArithmeticTask

        ArithmeticTask.check_args(
            digits=self.digits,
            ops=self.ops,
            num_eval=self.num_eval,
            num_train=self.num_train,
            seed=self.seed,
            prefix="task.",
        )


@dataclass
class JsonlTaskConfig:
    _target_: str = "pipeline.tasks.JsonlTask"
    path: str = MISSING
    eval_path: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    eval_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        from pipeline.tasks import check_fraction

        check_fraction("task.eval_fraction", self.eval_fraction)


class AnswerExtractor(Enum):
    none = "none"  # the answer field as it is
    gsm8k = "gsm8k"  # the text after "#### ", commas removed
    regex = "regex"  # task.answer_regex's first group, or its whole match


@dataclass
class HFDatasetTaskConfig:
    """Types only: ``HFDatasetTask`` checks the values, the splits and the fields when it is built
    (one home for every check; the recipe builds the task before it loads a model)."""

    _target_: str = "pipeline.hf_dataset.HFDatasetTask"
    path: str = MISSING
    name: str | None = None
    revision: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.1
    prompt_field: str | None = "prompt"
    messages_field: str | None = None
    answer_field: str = "answer"
    answer_extractor: AnswerExtractor = AnswerExtractor.none
    answer_regex: str | None = None
    max_examples: int | None = None
    streaming: bool = False
    cache_dir: str | None = None
    seed: int = 0


@dataclass
class ChatArithmeticTaskConfig:
    _target_: str = "pipeline.tasks.ChatArithmeticTask"
    num_terms: int = 2
    digits: int = 2
    ops: str = "+"
    template: str = "What is {expr}? Reply with only the number."  # the user message; {expr}: "23 + 58"
    num_eval: int = 200
    num_train: int | None = None  # None: every problem not held out (small problem spaces only)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.num_terms >= 2, "task.num_terms", "an int >= 2", self.num_terms)
        _require(self.digits >= 1, "task.digits", "an int >= 1", self.digits)
        _require(self.num_eval >= 1, "task.num_eval", "an int >= 1", self.num_eval)
        ok_train = self.num_train is None or self.num_train >= 1
        _require(ok_train, "task.num_train", "null or an int >= 1", self.num_train)
        ok_ops = bool(self.ops) and set(self.ops) <= set("+-*")
        _require(ok_ops, "task.ops", "a non-empty subset of '+-*'", self.ops)
        _require("{expr}" in self.template, "task.template", "a string containing {expr}", self.template)


@dataclass
class RewardConfig:
    functions: dict[str, Any] = field(default_factory=dict)
    accuracy: str | None = None  # the reward function whose value 1.0 means "correct"
    on_error: OnError = OnError.zero

    def __post_init__(self) -> None:
        for name, fn in self.functions.items():
            if not isinstance(fn, dict) or "_target_" not in fn:
                raise ValueError(f"reward.functions.{name} must be a node with a _target_, got {fn!r}.")
            weight = fn.get("weight", 1.0)
            _require(isinstance(weight, (int, float)) and not isinstance(weight, bool),
                     f"reward.functions.{name}.weight", "a number", weight)  # fmt: skip
        if self.accuracy is not None:
            _require(
                self.accuracy in self.functions,
                "reward.accuracy",
                f"one of {sorted(self.functions)}",
                self.accuracy,
            )


@dataclass
class EvalConfig:
    """``evaluate.py`` only (training ignores it): what to evaluate and how many samples per prompt."""

    checkpoint: str | None = None  # a training checkpoint (.../checkpoints/step_N): its weights or adapters
    num_samples: int = 1  # 1: greedy; N > 1: N samples per prompt at generate.temperature (+ pass@N)
    size: int | None = None  # the first N held-out examples (null: all of them)
    label: str | None = None  # the model column of the table (null: the checkpoint or model.name_or_path)

    def __post_init__(self) -> None:
        _require(self.num_samples >= 1, "eval.num_samples", ">= 1", self.num_samples)
        _require(self.size is None or self.size >= 1, "eval.size", "null or >= 1", self.size)
