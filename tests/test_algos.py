"""Advantage and loss math against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import algos


def test_group_advantages_grpo_and_zero_variance_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    adv, zero_var = algos.group_advantages(rewards, 4, eps=1e-4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 1
    assert adv[:2].tolist() == pytest.approx(expected)
    assert adv[4:].tolist() == [0.0] * 4
    assert zero_var.tolist() == [False, True]


def test_group_advantages_without_std_is_dr_grpo():
    adv, _ = algos.group_advantages(torch.tensor([3.0, 1.0, 2.0, 2.0]), 2, std_normalize=False)
    assert adv.tolist() == [1.0, -1.0, 0.0, 0.0]


def test_rloo_leave_one_out_baseline():
    adv, zero_var = algos.rloo_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4)
    assert adv.tolist() == pytest.approx([1.0, -1 / 3, -1 / 3, -1 / 3])
    assert zero_var.tolist() == [False]
    with pytest.raises(ValueError, match="group size"):
        algos.rloo_advantages(torch.tensor([1.0]), 1)


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "clipped"),
    [
        (1.5, 1.0, -1.2, True),
        (1.5, -1.0, 1.5, False),
        (0.5, 1.0, -0.5, False),
        (0.5, -1.0, 0.8, True),
        (1.1, 1.0, -1.1, False),
    ],
)
def test_clipped_surrogate_hand_values(ratio, adv, loss, clipped):
    lp = torch.tensor([[math.log(ratio)]])
    out, r, c = algos.clipped_surrogate(lp, torch.zeros(1, 1), torch.tensor([adv]), 0.2, 0.2)
    assert out.item() == pytest.approx(loss)
    assert r.item() == pytest.approx(ratio)
    assert c.item() is clipped


def test_asymmetric_clip_range():
    lp = torch.tensor([[math.log(1.25)]])
    out, _, c = algos.clipped_surrogate(lp, torch.zeros(1, 1), torch.tensor([1.0]), 0.2, 0.28)
    assert out.item() == pytest.approx(-1.25) and not c.item()  # inside [0.8, 1.28]


def test_surrogate_gradient_is_policy_gradient_on_policy():
    lp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, _, _ = algos.clipped_surrogate(lp, lp.detach(), torch.tensor([2.0]), 0.2, 0.2)
    loss.sum().backward()
    assert lp.grad.tolist() == [[-2.0, -2.0]]  # d/dlogp of -ratio*A at ratio 1 is -A


def test_k3_kl_hand_value_and_properties():
    kl = algos.k3_kl(torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)]))
    assert kl.item() == pytest.approx(0.5 + math.log(2) - 1)
    assert algos.k3_kl(torch.tensor([-1.3]), torch.tensor([-1.3])).item() == 0.0
    # unbiased: E_{x~p}[k3] = KL(p || q) for categorical p, q
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.5, 0.3, 0.2])
    expectation = (p * algos.k3_kl(p.log(), q.log())).sum()
    assert expectation.item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-6)


def test_aggregate_modes_and_micro_batch_additivity():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    kw = {"num_tokens": 4.0, "num_seqs": 2.0, "max_len": 3}
    assert algos.aggregate(per_token, mask, "token_mean", **kw).item() == pytest.approx(2.5)
    assert algos.aggregate(per_token, mask, "seq_mean", **kw).item() == pytest.approx(3.0)
    assert algos.aggregate(per_token, mask, "seq_sum_norm", **kw).item() == pytest.approx(10 / 6)
    for mode in ("token_mean", "seq_mean", "seq_sum_norm"):
        whole = algos.aggregate(per_token, mask, mode, **kw)
        split = sum(algos.aggregate(per_token[i : i + 1], mask[i : i + 1], mode, **kw) for i in range(2))
        assert split.item() == pytest.approx(whole.item())
    with pytest.raises(ValueError, match="token_mean"):
        algos.aggregate(per_token, mask, "mean", **kw)


def test_effective_sample_size():
    assert algos.effective_sample_size(
        torch.zeros(5), torch.ones(5, dtype=torch.bool)
    ).item() == pytest.approx(1.0)
    lr = torch.tensor([0.0, math.log(3.0)])
    assert algos.effective_sample_size(lr, torch.ones(2, dtype=torch.bool)).item() == pytest.approx(0.8)
