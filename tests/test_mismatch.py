"""Truncated importance sampling weights (pipeline.mismatch) against hand-computed values."""

import math

import pytest
import torch

from pipeline.mismatch import truncated_is_weights


def test_weights_and_stats_match_hand_values():
    # log-ratios: row 0 -> 0, ln 3, -ln 2 ; row 1 -> ln 1.5, (masked out: huge), ln 4
    sampler = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -50.0, -2.0]])
    delta = torch.tensor([[0.0, math.log(3.0), -math.log(2.0)], [math.log(1.5), 40.0, math.log(4.0)]])
    train = sampler + delta
    mask = torch.tensor([[True, True, True], [True, False, True]])
    weights, stats = truncated_is_weights(train, sampler, mask, cap=2.0)
    expected = torch.tensor([[1.0, 2.0, 0.5], [1.5, 0.0, 2.0]])
    torch.testing.assert_close(weights, expected)
    ratios = [1.0, 3.0, 0.5, 1.5, 4.0]  # the masked tokens, untruncated
    assert float(stats["mean_ratio"]) == pytest.approx(sum(ratios) / 5, rel=1e-6)
    assert float(stats["capped_frac"]) == pytest.approx(2 / 5)


def test_weights_are_detached_and_keep_dtype():
    train = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    sampler = torch.tensor([[-1.5, -2.0]], dtype=torch.float32)
    weights, _ = truncated_is_weights(train, sampler, torch.ones(1, 2, dtype=torch.bool), cap=5.0)
    assert not weights.requires_grad and weights.dtype == torch.float64
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.5), 1.0]], dtype=torch.float64))


def test_identical_log_probs_give_unit_weights():
    lp = torch.randn(3, 4)
    mask = torch.rand(3, 4) > 0.3
    weights, stats = truncated_is_weights(lp, lp.clone(), mask, cap=2.0)
    torch.testing.assert_close(weights, mask.float())
    assert float(stats["mean_ratio"]) == pytest.approx(1.0) and float(stats["capped_frac"]) == 0.0


def test_no_masked_token_and_extreme_ratio_stay_finite():
    train, sampler = torch.tensor([[0.0, 0.0]]), torch.tensor([[-200.0, 0.0]])
    weights, stats = truncated_is_weights(train, sampler, torch.zeros(1, 2, dtype=torch.bool), cap=2.0)
    assert weights.sum() == 0 and float(stats["mean_ratio"]) == 1.0 and float(stats["capped_frac"]) == 0.0
    weights, stats = truncated_is_weights(train, sampler, torch.ones(1, 2, dtype=torch.bool), cap=2.0)
    assert torch.isfinite(stats["mean_ratio"]) and weights[0, 0] == 2.0 and float(stats["capped_frac"]) == 0.5


@pytest.mark.parametrize("cap", [0.0, -1.0, float("inf"), True, "2"])
def test_bad_cap_is_rejected(cap):
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weights(lp, lp, torch.ones(1, 2, dtype=torch.bool), cap=cap)


def test_shape_mismatch_is_rejected():
    with pytest.raises(ValueError, match="same shape"):
        truncated_is_weights(
            torch.zeros(2, 3), torch.zeros(2, 2), torch.ones(2, 3, dtype=torch.bool), cap=2.0
        )
