"""Advantage estimators and policy losses: pure tensor functions, no config, no I/O.

Shapes: ``rewards``/``advantages`` are ``[N]`` with the ``G`` samples of a prompt contiguous
(``N = prompts x G``); token tensors are ``[B, T]`` right-padded with a boolean ``mask``.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, std_normalize: bool = True, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages ``(r - mean_g) / (std_g + eps)`` (``std_normalize=False``: Dr. GRPO's ``r - mean_g``).

    Returns the advantages and a ``[prompts]`` mask of zero-variance groups (all samples
    rewarded alike: no learning signal). ``std`` is the unbiased sample std, as in GRPO.
    """
    r = rewards.reshape(-1, group_size)
    centred = r - r.mean(-1, keepdim=True)
    std = r.std(-1, keepdim=True) if group_size > 1 else torch.zeros_like(centred[:, :1])
    adv = centred / (std + eps) if std_normalize else centred
    zero_var = (r.max(-1).values - r.min(-1).values) == 0
    return adv.reshape(-1), zero_var


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: each sample's reward minus the mean of the other ``G - 1`` samples of its group."""
    if group_size < 2:
        raise ValueError(f"rloo needs a group size >= 2, got {group_size}.")
    r = rewards.reshape(-1, group_size)
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    zero_var = (r.max(-1).values - r.min(-1).values) == 0
    return (r - baseline).reshape(-1), zero_var


def clipped_surrogate(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped loss ``-min(ratio * A, clip(ratio, 1-lo, 1+hi) * A)``.

    ``advantages`` is per sequence ``[B]`` (broadcast over tokens) or per token ``[B, T]``.
    Returns the per-token loss, the ratio, and where clipping was active.
    """
    adv = advantages.unsqueeze(-1) if advantages.ndim == log_probs.ndim - 1 else advantages
    ratio = torch.exp(log_probs - old_log_probs)
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    return loss, ratio, (clipped < unclipped)


def k3_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || ref) per token: ``exp(d) - d - 1`` with ``d = ref - logp``.

    Non-negative, unbiased, low variance; its gradient pulls the policy toward the reference.
    """
    d = ref_log_probs - log_probs
    return torch.exp(d) - d - 1.0


def policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    *,
    clip_low: float,
    clip_high: float,
    ref_log_probs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss of the clipped policy gradient, plus ``kl_coef`` x k3 KL, minus ``entropy_coef`` x entropy.

    All token tensors are ``[B, T]``; ``advantages`` is ``[B]`` or ``[B, T]``. Returns the
    per-token loss (reduce it with :func:`aggregate`) and detached per-token statistics: ``pg``,
    ``ratio``, ``clipped`` (bool), ``log_ratio``, and ``kl``/``entropy`` when those terms are on.
    """
    pg, ratio, clipped = clipped_surrogate(log_probs, old_log_probs, advantages, clip_low, clip_high)
    per_token = pg
    stats = {"pg": pg.detach(), "ratio": ratio.detach(), "clipped": clipped,
             "log_ratio": log_probs.detach() - old_log_probs}  # fmt: skip
    if ref_log_probs is not None:
        kl = k3_kl(log_probs, ref_log_probs)
        per_token = per_token + kl_coef * kl
        stats["kl"] = kl.detach()
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
        stats["entropy"] = entropy.detach()
    return per_token, stats


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    num_tokens: float,
    num_seqs: float,
    max_len: int,
) -> torch.Tensor:
    """Reduce a per-token loss of one micro-batch to its share of the minibatch loss.

    The normalisers describe the whole minibatch (all gradient-accumulation micro-batches), so
    summing the micro-batch results gives exactly the loss of the full minibatch:

    - ``token_mean``: sum over all tokens / ``num_tokens`` (every token weighs the same);
    - ``seq_mean``: mean over each sequence's tokens, then sum / ``num_seqs``;
    - ``seq_sum_norm``: sum over tokens / (``num_seqs`` x ``max_len``), Dr. GRPO's constant.
    """
    m = mask.to(per_token.dtype)
    if mode == "token_mean":
        return (per_token * m).sum() / max(num_tokens, 1.0)
    if mode == "seq_mean":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(num_seqs, 1.0)
    if mode == "seq_sum_norm":
        return (per_token * m).sum() / max(num_seqs * max_len, 1.0)
    raise ValueError(f"loss aggregation must be token_mean, seq_mean or seq_sum_norm, got {mode!r}.")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def effective_sample_size(log_ratio: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised ESS of the importance weights ``exp(log_ratio)`` over masked tokens, in (0, 1].

    ``(sum w)^2 / (n * sum w^2)``: 1 when every weight is equal (on-policy), ``1/n`` when one
    token carries all the weight. Without ``mask`` every element of ``log_ratio`` counts.
    """
    w = torch.exp((log_ratio if mask is None else log_ratio[mask.bool()]).double())
    if w.numel() == 0:
        return torch.tensor(1.0)
    return (w.sum() ** 2 / (w.numel() * (w**2).sum())).float()
