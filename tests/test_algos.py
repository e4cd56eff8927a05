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


# ----------------------------------------------------------------------------- GRPO family (issue 10)
def test_aggregate_new_names_and_legacy_aliases_single_token_rows():
    per_token = torch.tensor([[2.0, 9.0, 9.0], [1.0, 3.0, 5.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, False], [True, True, True], [True, False, False]])  # 1-token rows
    kw = {"num_tokens": 5.0, "num_seqs": 3.0, "max_len": 4}
    assert algos.aggregate(per_token, mask, "token_mean", **kw).item() == pytest.approx(15 / 5)
    assert algos.aggregate(per_token, mask, "seq_mean_token_mean", **kw).item() == pytest.approx(
        (2 + 3 + 4) / 3
    )
    assert algos.aggregate(per_token, mask, "seq_mean_token_sum_norm", **kw).item() == pytest.approx(15 / 12)
    for old, new in algos.LOSS_AGG_ALIASES.items():
        assert algos.aggregate(per_token, mask, old, **kw) == algos.aggregate(per_token, mask, new, **kw)
    # an all-padding micro-batch contributes nothing
    assert algos.aggregate(per_token, torch.zeros_like(mask), "seq_mean_token_mean", **kw).item() == 0.0


@pytest.mark.parametrize(
    ("ratio", "adv", "loss", "dual"),
    [
        (5.0, -1.0, 3.0, True),  # PPO alone: -min(5 * -1, 1.2 * -1) = 5; dual clip caps it at c|A| = 3
        (2.0, -1.0, 2.0, False),  # below the cap
        (5.0, 1.0, -1.2, False),  # positive advantages: ordinary clipping
        (0.5, -2.0, 1.6, False),  # ratio < 1 - eps with A < 0: clipped at 0.8 * 2
    ],
)
def test_dual_clip_hand_values(ratio, adv, loss, dual):
    lp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    out, d = algos.surrogate_from_ratio(torch.exp(lp), torch.tensor([adv]), 0.2, 0.2, dual_clip=3.0)[::2]
    assert out.item() == pytest.approx(loss) and d.item() is dual
    out.sum().backward()
    if dual:  # a constant: no gradient from a dual-clipped token
        assert lp.grad.item() == 0.0


def test_sequence_importance_ratio_is_gspo():
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0, 7.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])  # padding never counts
    seq = algos.sequence_log_ratio(lp, old, mask)
    assert seq.tolist() == pytest.approx([(0.5 - 1.0) / 2, 0.0])
    per_token, stats = algos.policy_loss(
        lp,
        old,
        torch.tensor([1.0, -1.0]),
        clip_low=0.2,
        clip_high=0.2,
        importance_ratio="sequence",
        mask=mask,
    )
    s0 = math.exp(-0.25)
    assert per_token[0, :2].tolist() == pytest.approx([-s0, -s0]) and per_token[1, 0].item() == pytest.approx(
        1.0
    )
    assert stats["ratio"][0].tolist() == pytest.approx([s0] * 3)
    loss = algos.aggregate(per_token, mask, "seq_mean_token_mean", num_tokens=3.0, num_seqs=2.0, max_len=3)
    loss.backward()
    # d/dlogp_t of -(s A)/2 (seq mean): -A s / |y| / 2 on each of the row's tokens, 0 on padding
    assert lp.grad[0].tolist() == pytest.approx([-s0 / 2 / 2, -s0 / 2 / 2, 0.0])
    assert lp.grad[1].tolist() == pytest.approx([0.5, 0.0, 0.0])
    with pytest.raises(ValueError, match="mask"):
        algos.policy_loss(lp, old, torch.ones(2), clip_low=0.2, clip_high=0.2, importance_ratio="sequence")


def test_token_policy_loss_unchanged_by_new_options():
    lp, old, adv = torch.tensor([[-1.0, -0.1]]), torch.tensor([[-1.2, -0.1]]), torch.tensor([1.0])
    mask = torch.ones(1, 2, dtype=torch.bool)
    base, _ = algos.policy_loss(lp, old, adv, clip_low=0.2, clip_high=0.2)
    opts = {"dual_clip": 3.0, "importance_ratio": "token", "mask": mask}
    token, _ = algos.policy_loss(lp, old, adv, clip_low=0.2, clip_high=0.2, **opts)
    assert torch.equal(base, token)


def test_zero_variance_groups_and_overlong_penalty():
    flags = algos.zero_variance_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0]), 2)
    assert flags.tolist() == [True, False, True]
    # max_len 8, buffer 3: free up to 5 tokens, then -1/3 per token, -1 at 8
    lengths = torch.tensor([1, 5, 6, 7, 8])
    assert algos.overlong_penalty(lengths, 8, 3).tolist() == pytest.approx([0, 0, -1 / 3, -2 / 3, -1])
    assert algos.overlong_penalty(lengths, 8, 3, factor=0.5).tolist() == pytest.approx(
        [0, 0, -1 / 6, -1 / 3, -0.5]
    )
    assert algos.overlong_penalty(lengths, 8, 0).tolist() == [0.0] * 5


# ----------------------------------------------------------------------------- PPO: GAE, values
def _gae_reference(rewards, values, lengths, gamma, lam):
    """A plain Python loop, one sequence at a time (Schulman et al. 2016, eq. 16 with V after the end = 0)."""
    advs, rets = [], []
    for r, v, n in zip(rewards, values, lengths):
        adv, last = [0.0] * len(r), 0.0
        for t in reversed(range(n)):
            next_v = v[t + 1] if t + 1 < n else 0.0
            last = r[t] + gamma * next_v - v[t] + gamma * lam * last
            adv[t] = last
        advs.append(adv)
        rets.append([adv[t] + v[t] if t < n else 0.0 for t in range(len(r))])
    return advs, rets


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_matches_a_python_loop_float64(gamma, lam):
    g = torch.Generator().manual_seed(0)
    lengths = torch.tensor([1, 7, 3, 7, 5, 1])  # single-token responses and padding
    mask = torch.arange(7).unsqueeze(0) < lengths.unsqueeze(1)
    rewards = torch.randn(6, 7, generator=g, dtype=torch.float64) * mask  # dense per-token rewards
    values = torch.randn(6, 7, generator=g, dtype=torch.float64)  # garbage on padding: must be ignored
    adv, ret = algos.gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_reference(rewards.tolist(), values.tolist(), lengths.tolist(), gamma, lam)
    assert torch.allclose(adv, torch.tensor(ref_adv, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.allclose(ret, torch.tensor(ref_ret, dtype=torch.float64), atol=1e-12, rtol=0)
    assert adv.dtype == torch.float64 and bool((adv[~mask] == 0).all())


def test_gae_hand_values_terminal_reward():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rewards = algos.terminal_rewards(torch.tensor([1.0, -1.0]), mask)
    assert rewards.tolist() == [[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0]]
    values = torch.tensor([[0.5, 0.25, 0.5], [0.2, 9.0, 9.0]])
    adv, ret = algos.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # deltas row 0: 0 + .25 - .5 = -.25, 0 + .5 - .25 = .25, 1 - .5 = .5
    assert adv[0].tolist() == pytest.approx([-0.25 + 0.5 * (0.25 + 0.5 * 0.5), 0.25 + 0.5 * 0.5, 0.5])
    assert adv[1].tolist() == pytest.approx([-1.2, 0.0, 0.0]) and ret[1].tolist() == pytest.approx(
        [-1.0, 0, 0]
    )
    # lam = 1: advantages are the return minus the value (Monte Carlo)
    mc, _ = algos.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert mc[0].tolist() == pytest.approx([0.5, 0.75, 0.5])


def test_whiten_value_loss_and_explained_variance():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    w = algos.whiten(x, mask, eps=0.0)
    assert w[mask].tolist() == pytest.approx([-1.0, 0.0, 1.0]) and w[~mask].tolist() == [0.0] * 3
    v, old, ret = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 0.0, 0.0]), torch.tensor([2.0, 1.0, 0.0])
    loss, clipped = algos.value_loss(v, old, ret, clip=0.2)
    # v=1 clipped to 0.2: max((1-2)^2, (0.2-2)^2) = 3.24; v=0 inside; v=.5 -> .2: max(.25, .04) = .25
    assert loss.tolist() == pytest.approx([0.5 * 3.24, 0.5, 0.125]) and clipped.tolist() == [
        True,
        False,
        False,
    ]
    plain, none = algos.value_loss(v, old, ret, clip=None)
    assert plain.tolist() == pytest.approx([0.5, 0.5, 0.125]) and not none.any()
    m = torch.ones(3, dtype=torch.bool)
    assert algos.explained_variance(ret, ret, m) == 1.0
    assert algos.explained_variance(torch.full((3,), ret.mean().item()), ret, m) == pytest.approx(0.0)
    assert algos.explained_variance(v, torch.ones(3), m) == 0.0  # constant returns
