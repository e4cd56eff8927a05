"""The sampler-vs-trainer mismatch: truncated importance sampling (TIS) weights. Pure tensor functions.

A fast engine (vLLM) samples with its own kernels and often another dtype, so the behaviour
log-probs it reports (``sampler_lp``) differ from the trainer's log-probs of the same tokens under the
same weights (``train_lp``). The policy gradient is then, strictly, off-policy; TIS reweights each
token by ``min(exp(train_lp - sampler_lp), C)`` (Yao et al., 2025, "Your efficient RL framework
secretly brings you off-policy RL training"). With an fp32 engine and an fp32 trainer the ratio is 1
to about 1e-5 and TIS changes nothing; with a bf16 engine and an fp32 trainer it corrects a gap of
0.03 mean / 0.2 max |Δ log-prob| per token.
"""

from __future__ import annotations

import math

import torch

# Log-ratios are clamped here before exp() for the statistics, so one extreme token cannot make them inf.
MAX_LOG_RATIO = 20.0


def truncated_is_weights(
    train_lp: torch.Tensor, sampler_lp: torch.Tensor, mask: torch.Tensor, cap: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token truncated importance weights ``min(exp(train_lp - sampler_lp), cap)``, detached.

    Args:
        train_lp: ``[B, T]`` trainer log-probs of the sampled tokens, under the weights that sampled
            (the rollout's old policy, not the policy being updated).
        sampler_lp: ``[B, T]`` the engine's behaviour log-probs of the same tokens.
        mask: ``[B, T]`` boolean, True on response tokens.
        cap: ``C > 0``, the truncation; typical values 2 to 5.

    Returns:
        ``weights`` ``[B, T]`` (0 outside ``mask``, no gradient), to multiply the per-token
        policy-gradient loss; and statistics over the masked tokens (0-dim tensors):
        ``mean_ratio`` (the untruncated ratio; 1 = no mismatch) and ``capped_frac`` (share of
        tokens whose ratio exceeded ``cap``). With no masked token: 1 and 0.
    """
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0 or math.isinf(cap):
        raise ValueError(f"cap must be a positive finite number, got {cap!r}.")
    if train_lp.shape != sampler_lp.shape or train_lp.shape != mask.shape:
        raise ValueError(
            f"train_lp {tuple(train_lp.shape)}, sampler_lp {tuple(sampler_lp.shape)} and mask "
            f"{tuple(mask.shape)} must have the same shape."
        )
    mask = mask.bool()
    log_ratio = torch.where(mask, train_lp.detach() - sampler_lp.detach().to(train_lp.dtype), 0.0)
    ratio = log_ratio.clamp(max=MAX_LOG_RATIO).exp()
    weights = torch.where(mask, ratio.clamp(max=cap), 0.0)
    n = mask.sum()
    stats = {
        "mean_ratio": torch.where(n > 0, ratio[mask].sum() / n.clamp(min=1), 1.0),
        "capped_frac": (mask & (ratio > cap)).sum() / n.clamp(min=1),
    }
    return weights, stats
