"""Reward functions and the weighted set that scores a batch of completions robustly.

A reward function is any callable ``fn(completions, answers, prompts, **params) -> list[float | None]``
returning one value per completion (``None``: cannot score it). They are instantiated from config
(``_target_`` + params, ``weight``). A function that raises, returns the wrong length or a
non-finite value is a counted failure handled by ``on_error`` (zero | drop | fail), never a crash.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _extract(text: str, extract: str) -> str:
    text = text.strip()
    if extract == "full":
        return text
    if extract in ("tag", "tag_or_last_number"):
        found = _TAG.findall(text)
        if found:
            return found[-1].strip()
        if extract == "tag":
            return ""
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else ""


def _same(pred: str, answer: str) -> bool:
    if pred == answer:
        return True
    try:
        return math.isclose(float(pred), float(answer), rel_tol=0.0, abs_tol=1e-9)
    except ValueError:
        return False


def exact_answer(
    completions: Sequence[str],
    answers: Sequence[str],
    prompts: Sequence[str] | None = None,
    *,
    extract: str = "full",
) -> list[float]:
    """1.0 when the extracted answer equals the reference (numerically when both are numbers).

    ``extract``: ``full`` (the whole stripped completion), ``tag`` (inside ``<answer>`` tags),
    ``last_number``, or ``tag_or_last_number``.
    """
    if extract not in ("full", "tag", "last_number", "tag_or_last_number"):
        raise ValueError(
            f"exact_answer extract must be full, tag, last_number or tag_or_last_number, got {extract!r}."
        )
    return [
        float(_same(_extract(c, extract), str(a).strip())) for c, a in zip(completions, answers, strict=True)
    ]


def format_match(
    completions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None = None, *, pattern: str
) -> list[float]:
    """1.0 when the stripped completion fully matches the regular expression ``pattern``."""
    rx = re.compile(pattern)
    return [float(rx.fullmatch(c.strip()) is not None) for c in completions]


def length_penalty(
    completions: Sequence[str],
    answers: Sequence[str],
    prompts: Sequence[str] | None = None,
    *,
    max_chars: int,
) -> list[float]:
    """``-(excess / max_chars)`` for completions longer than ``max_chars`` characters, else 0."""
    return [-max(0, len(c) - max_chars) / max_chars for c in completions]


@dataclass
class RewardResult:
    total: torch.Tensor  # [N] weighted sum (failed entries per on_error)
    valid: torch.Tensor  # [N] bool: False where a sample is dropped
    per_function: dict[str, torch.Tensor]  # [N] raw values, NaN where failed
    failures: dict[str, int]  # failed samples per function


class RewardSet:
    """Weighted reward functions applied to a batch; failures are counted per function."""

    def __init__(
        self, functions: dict[str, tuple[Callable[..., Any], float]], on_error: str = "zero"
    ) -> None:
        if on_error not in ("zero", "drop", "fail"):
            raise ValueError(f"reward.on_error must be zero, drop or fail, got {on_error!r}.")
        if not functions:
            raise ValueError("reward.functions must name at least one reward function.")
        self.functions = functions
        self.on_error = on_error

    @classmethod
    def from_config(cls, cfg: Any) -> RewardSet:
        """The ``reward`` config group: each function node instantiated and its signature checked now,
        not at the first step (``reward.functions.NAME`` named in every error)."""
        functions = {name: _reward_fn(name, node) for name, node in cfg.functions.items()}
        return cls(functions, on_error=cfg.on_error.value)

    def __call__(self, completions: list[str], answers: list[str], prompts: list[str]) -> RewardResult:
        n = len(completions)
        total = torch.zeros(n, dtype=torch.float64)
        valid = torch.ones(n, dtype=torch.bool)
        per_fn, failures = {}, {}
        for name, (_, weight) in self.functions.items():
            values = self.score_one(name, completions, answers, prompts)
            bad = ~torch.isfinite(values)
            failures[name] = int(bad.sum())
            if self.on_error == "drop":
                valid &= ~bad
            total += weight * torch.where(bad, torch.zeros_like(values), values)
            per_fn[name] = values
        return RewardResult(total=total.float(), valid=valid, per_function=per_fn, failures=failures)

    def score_one(
        self, name: str, completions: list[str], answers: list[str], prompts: list[str]
    ) -> torch.Tensor:
        """``[N]`` float64 values of one function, NaN where it failed; with ``on_error=fail`` a failure raises.

        Training (``__call__``) and evaluation both go through here, so a reward that fails only
        on held-out prompts is handled the same way.
        """
        values = self._call_one(name, self.functions[name][0], completions, answers, prompts)
        failed = int((~torch.isfinite(values)).sum())
        if failed and self.on_error == "fail":
            raise RuntimeError(
                f"reward function {name!r} failed on {failed} of {len(values)} samples (reward.on_error=fail)."
            )
        return values

    def _call_one(self, name, fn, completions, answers, prompts) -> torch.Tensor:
        n = len(completions)
        try:
            out = fn(completions, answers, prompts)
        except Exception as err:  # a user's reward function must not crash the run
            if self.on_error == "fail":
                raise RuntimeError(f"reward function {name!r} raised {type(err).__name__}: {err}") from err
            return torch.full((n,), float("nan"), dtype=torch.float64)
        try:
            values = [float("nan") if v is None else float(v) for v in out]
        except (TypeError, ValueError):
            values = []
        if len(values) != n:
            if self.on_error == "fail":
                raise RuntimeError(
                    f"reward function {name!r} returned {len(values)} values for {n} completions."
                )
            return torch.full((n,), float("nan"), dtype=torch.float64)
        return torch.tensor(values, dtype=torch.float64)


def _reward_fn(name: str, node: dict[str, Any]) -> tuple[Callable[..., Any], float]:
    """A reward node as ``(fn, weight)``; its signature is checked now, not at the first step."""
    params = {k: v for k, v in node.items() if k != "weight"}
    from pipeline.config import instantiate_node

    try:
        fn = instantiate_node({**params, "_partial_": True}, f"reward.functions.{name}")
        inspect.signature(fn.func).bind(["completion"], ["answer"], ["prompt"], **fn.keywords)
    except Exception as err:
        raise ValueError(
            f"reward.functions.{name}: cannot use {node.get('_target_')!r} with parameters "
            f"{sorted(k for k in params if k != '_target_')} as fn(completions, answers, prompts, **params): {err}"
        ) from err
    return fn, float(node.get("weight", 1.0))


def with_term(result: RewardResult, name: str, values: torch.Tensor) -> RewardResult:
    """``result`` with one more term ``name`` (weight 1, never failing) added to the total: e.g. DAPO's
    overlong penalty, which reads token lengths rather than completion text."""
    return RewardResult(
        total=result.total + values.to(result.total.dtype),
        valid=result.valid,
        per_function={**result.per_function, name: values.double()},
        failures={**result.failures, name: 0},
    )
