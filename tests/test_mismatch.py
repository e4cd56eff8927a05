"""Truncated importance sampling weights (pipeline.mismatch) against hand-computed values."""

import math

import pytest
import torch
from tensordict import TensorDict

from pipeline import algos
from pipeline.algorithm import Algorithm
from pipeline.config import validate
from pipeline.metrics import UpdateStats
from pipeline.mismatch import truncated_is_weights
from tests.helpers import compose_train


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


# ----------------------------------------------------------------------------- TIS in the loss
def test_policy_loss_is_weights_scale_the_pg_term_only():
    """On-policy ratio 1, A = 2: pg = -2 per token; weights (0.5, 2) give -1 and -4 (gradient likewise),
    the k3 KL term (0 here: ref = logp) and the entropy term are not weighted."""
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    adv, weights = torch.tensor([2.0]), torch.tensor([[0.5, 2.0]])
    kwargs = {"clip_low": 0.2, "clip_high": 0.2, "kl_coef": 0.1, "entropy_coef": 0.01}
    entropy = torch.tensor([[1.0, 3.0]])
    per_token, stats = algos.policy_loss(
        lp, lp.detach(), adv, ref_log_probs=lp.detach(), entropy=entropy, is_weights=weights, **kwargs
    )
    torch.testing.assert_close(per_token, torch.tensor([[-1.0 - 0.01, -4.0 - 0.03]]))
    torch.testing.assert_close(stats["pg"], torch.tensor([[-1.0, -4.0]]))
    per_token.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, -4.0]]))  # d(-w r A)/dlp = -w A at r = 1
    plain, _ = algos.policy_loss(lp, lp.detach(), adv, **{**kwargs, "kl_coef": 0.0, "entropy_coef": 0.0})
    torch.testing.assert_close(plain, torch.tensor([[-2.0, -2.0]]))


def test_algorithm_tis_against_hand_values():
    """rollout.tis_cap=2: the ratio is taken against the trainer's log-probs at sampling (the first pass),
    each token weighted by min(exp(train - sampler), 2); the stats and the sampler gap are logged."""
    cfg = validate(compose_train(["rollout.tis_cap=2.0", "algo.loss_agg=token_mean"]))
    algo = Algorithm(cfg)
    assert algo.tis_cap == 2.0 and not algo.tis_pass  # one optimizer step per rollout: the first pass
    sampler = torch.tensor([[-1.0, -2.0, -0.5]])
    train = sampler + torch.tensor([[0.0, math.log(3.0), -math.log(2.0)]])  # ratios 1, 3 (capped), 0.5
    batch = TensorDict(log_probs=sampler, advantage=torch.tensor([1.0]), batch_size=[1])
    lp = train.clone().requires_grad_(True)
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = algo(batch, lp, None, None, mask, num_tokens=3.0, num_seqs=1.0)
    # -mean(w * ratio * A) with the ratio against the trainer's log-probs = 1
    assert float(loss.detach()) == pytest.approx(-(1.0 + 2.0 + 0.5) / 3)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.0, -2.0, -0.5]]) / 3)
    torch.testing.assert_close(stats["tis_ratio"], torch.tensor([[1.0, 3.0, 0.5]]))
    assert stats["tis_capped"].tolist() == [[False, True, False]]
    torch.testing.assert_close(stats["log_ratio"], train - sampler)  # the gen/train gap metric's input
    summary = UpdateStats()
    summary.add_tokens(stats, mask)
    summary.add_step(float(loss.detach()), 1.0, skipped=False)
    out = summary.summary()
    assert out["logprobs/tis_mean_ratio"] == pytest.approx(1.5) and out[
        "logprobs/tis_capped_frac"
    ] == pytest.approx(1 / 3)
    off = Algorithm(validate(compose_train(["algo.loss_agg=token_mean"])))
    plain, plain_stats = off(batch, train.clone(), None, None, mask, num_tokens=3.0, num_seqs=1.0)
    assert "tis_ratio" not in plain_stats  # off: the ratio against the sampler, unweighted
    expected = -(1.0 + 1.2 + 0.5) / 3  # ratios 1, 3 -> clipped at 1.2, 0.5 (A > 0: min of the two)
    assert float(plain) == pytest.approx(expected)
    several = Algorithm(validate(compose_train(["rollout.tis_cap=2.0", "algo.ppo_epochs=2"])))
    assert several.tis_pass  # the recipe then stores train_log_probs before the first step
    batch["train_log_probs"] = train
    loss2, _ = several(batch, train.clone(), None, None, mask, num_tokens=3.0, num_seqs=1.0)
    assert torch.isfinite(loss2)


def test_rollout_config_group():
    cfg = validate(compose_train(["rollout=vllm", "rollout.sync_every=2", "rollout.tis_cap=3"]))
    assert cfg.rollout.engine.value == "vllm" and cfg.rollout.sync_every == 2 and cfg.rollout.tis_cap == 3.0
    assert validate(compose_train()).rollout.engine.value == "hf"
    with pytest.raises(ValueError, match=r"rollout\.sync_every"):
        validate(compose_train(["rollout.sync_every=0"]))
    with pytest.raises(ValueError, match=r"rollout\.tis_cap"):
        validate(compose_train(["rollout.tis_cap=0"]))
