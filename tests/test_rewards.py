"""Reward functions and the failure handling of RewardSet."""

from __future__ import annotations

import math

import pytest

from pipeline.rewards import RewardSet, exact_answer, format_match, length_penalty


def test_exact_answer_modes():
    assert exact_answer([" 47 ", "47.0", "46", ""], ["47"] * 4) == [1.0, 1.0, 0.0, 0.0]
    text = ["so it is <answer>12</answer>", "I think 3 then 12", "<answer>x</answer> 12"]
    assert exact_answer(text, ["12"] * 3, extract="tag") == [1.0, 0.0, 0.0]
    assert exact_answer(text, ["12"] * 3, extract="last_number") == [1.0, 1.0, 1.0]
    assert exact_answer(text, ["12"] * 3, extract="tag_or_last_number") == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="extract"):
        exact_answer(["1"], ["1"], extract="first")


def test_format_and_length():
    assert format_match(["42", "-7", "4 2", "x"], [""] * 4, pattern=r"-?\d+") == [1.0, 1.0, 0.0, 0.0]
    assert length_penalty(["a" * 5, "a" * 15], ["", ""], max_chars=10) == [0.0, -0.5]


def _bad_raises(c, a, p):
    raise ZeroDivisionError("boom")


def _bad_length(c, a, p):
    return [1.0]


def _bad_nan(c, a, p):
    return [float("nan"), 1.0, None]


def _ones(c, a, p):
    return [1.0] * len(c)


@pytest.mark.parametrize("bad", [_bad_raises, _bad_length, _bad_nan])
def test_failures_are_counted_zeroed_or_dropped(bad):
    completions, answers = ["1", "2", "3"], ["1", "2", "3"]
    zero = RewardSet({"ok": (_ones, 1.0), "bad": (bad, 2.0)}, on_error="zero")(
        completions, answers, completions
    )
    failed = 3 if bad is not _bad_nan else 2
    assert zero.failures == {"ok": 0, "bad": failed}
    assert zero.valid.all()
    good_bad = [v for v in zero.per_function["bad"].tolist() if not math.isnan(v)]
    assert zero.total.tolist() == pytest.approx(
        [1.0 + 2.0 * (1.0 if i == 1 and good_bad else 0.0) for i in range(3)]
    )

    drop = RewardSet({"ok": (_ones, 1.0), "bad": (bad, 2.0)}, on_error="drop")(
        completions, answers, completions
    )
    assert int((~drop.valid).sum()) == failed

    with pytest.raises(RuntimeError, match="'bad'"):
        RewardSet({"bad": (bad, 1.0)}, on_error="fail")(completions, answers, completions)


def test_reward_set_validates_options():
    with pytest.raises(ValueError, match="on_error"):
        RewardSet({"ok": (_ones, 1.0)}, on_error="ignore")
    with pytest.raises(ValueError, match="at least one"):
        RewardSet({})
