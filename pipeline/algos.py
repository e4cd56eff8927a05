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
    return adv.reshape(-1), zero_variance_groups(rewards, group_size)


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: each sample's reward minus the mean of the other ``G - 1`` samples of its group."""
    if group_size < 2:
        raise ValueError(f"rloo needs a group size >= 2, got {group_size}.")
    r = rewards.reshape(-1, group_size)
    baseline = (r.sum(-1, keepdim=True) - r) / (group_size - 1)
    return (r - baseline).reshape(-1), zero_variance_groups(rewards, group_size)


def zero_variance_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[prompts]`` mask of groups whose ``group_size`` samples all got the same reward (no signal)."""
    r = rewards.reshape(-1, group_size)
    return (r.max(-1).values - r.min(-1).values) == 0


def overlong_penalty(lengths: torch.Tensor, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """DAPO's soft overlong punishment ``[B]``: 0 up to ``max_len - buffer`` tokens, then falling
    linearly to ``-factor`` at ``max_len`` (and beyond). ``lengths`` count the EOS token."""
    if buffer <= 0:
        return torch.zeros(lengths.shape, dtype=torch.float32, device=lengths.device)
    excess = (lengths.float() - (max_len - buffer)).clamp(min=0.0)
    return -factor * (excess / buffer).clamp(max=1.0)


def clipped_surrogate(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    *,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token PPO clipped loss ``-min(ratio * A, clip(ratio, 1-lo, 1+hi) * A)``.

    ``advantages`` is per sequence ``[B]`` (broadcast over tokens) or per token ``[B, T]``.
    ``dual_clip=c`` (> 1) also bounds the loss of negative advantages by ``-c * A`` (dual-clip PPO).
    Returns the per-token loss, the ratio, and where clipping (either kind) was active.
    """
    ratio = torch.exp(log_probs - old_log_probs)
    loss, clipped, dual = surrogate_from_ratio(ratio, advantages, clip_low, clip_high, dual_clip=dual_clip)
    return loss, ratio, clipped | dual


def surrogate_from_ratio(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    *,
    dual_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clipped surrogate of an importance ratio ``[B, T]`` (token- or sequence-level).

    Returns the per-token loss, where the PPO clip was active, and where the dual clip was
    (Ye et al. 2020: for ``A < 0`` the loss is ``min(-min(ratio A, clip(ratio) A), -c A)``, so a
    huge ratio on a bad token cannot blow the loss up).
    """
    adv = advantages.unsqueeze(-1) if advantages.ndim == ratio.ndim - 1 else advantages
    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    loss = -torch.minimum(unclipped, clipped)
    if dual_clip is None:
        return loss, clipped < unclipped, torch.zeros_like(loss, dtype=torch.bool)
    bound = -dual_clip * adv  # positive where A < 0
    dual = (adv < 0) & (loss > bound)
    return torch.where(dual, bound, loss), (clipped < unclipped) & ~dual, dual


def sequence_log_ratio(
    log_probs: torch.Tensor, old_log_probs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's length-normalised sequence log-ratio ``mean_t(logp_t - old_t)`` over each row's mask: ``[B]``.

    ``exp`` of it is the geometric mean of the token ratios (Zheng et al. 2025); it is differentiable
    in ``log_probs``, each token receiving ``1/|y|`` of the sequence's gradient.
    """
    m = mask.to(log_probs.dtype)
    return ((log_probs - old_log_probs) * m).sum(-1) / m.sum(-1).clamp(min=1.0)


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
    dual_clip: float | None = None,
    importance_ratio: str = "token",
    mask: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss of the clipped policy gradient, plus ``kl_coef`` x k3 KL, minus ``entropy_coef`` x entropy.

    All token tensors are ``[B, T]``; ``advantages`` is ``[B]`` or ``[B, T]``. ``importance_ratio``:
    ``token`` (PPO/GRPO) or ``sequence`` (GSPO: every token of a row gets the row's
    :func:`sequence_log_ratio`, which needs ``mask``). ``dual_clip``: see :func:`surrogate_from_ratio`.
    ``is_weights``: ``[B, T]`` detached per-token weights of the policy-gradient term (truncated
    importance sampling against the sampler/trainer mismatch, :mod:`pipeline.mismatch`); not the KL
    or entropy terms.
    Returns the per-token loss (reduce it with :func:`aggregate`) and detached per-token statistics:
    ``pg``, ``ratio``, ``clipped`` (bool), ``log_ratio`` (token-level), ``dual_clipped`` when dual-clip
    is on, and ``kl``/``entropy`` when those terms are on.
    """
    if importance_ratio == "token":
        ratio = torch.exp(log_probs - old_log_probs)
    elif importance_ratio == "sequence":
        if mask is None:
            raise ValueError("importance_ratio='sequence' needs the response mask.")
        ratio = (
            torch.exp(sequence_log_ratio(log_probs, old_log_probs, mask)).unsqueeze(-1).expand_as(log_probs)
        )
    else:
        raise ValueError(f"importance_ratio must be token or sequence, got {importance_ratio!r}.")
    pg, clipped, dual = surrogate_from_ratio(ratio, advantages, clip_low, clip_high, dual_clip=dual_clip)
    if is_weights is not None:
        pg = pg * is_weights.detach()
    per_token = pg
    stats = {
        "pg": pg.detach(),
        "ratio": ratio.detach(),
        "clipped": clipped,
        "log_ratio": log_probs.detach() - old_log_probs,
    }
    if dual_clip is not None:
        stats["dual_clipped"] = dual
    if ref_log_probs is not None:
        kl = k3_kl(log_probs, ref_log_probs)
        per_token = per_token + kl_coef * kl
        stats["kl"] = kl.detach()
    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
        stats["entropy"] = entropy.detach()
    return per_token, stats


# Loss aggregations (verl's names) and the names this project used before them.
LOSS_AGG_ALIASES = {"seq_mean": "seq_mean_token_mean", "seq_sum_norm": "seq_mean_token_sum_norm"}


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

    - ``token_mean`` (DAPO): sum over all tokens / ``num_tokens`` (every token weighs the same);
    - ``seq_mean_token_mean`` (GRPO): mean over each sequence's tokens, then sum / ``num_seqs``;
    - ``seq_mean_token_sum_norm`` (Dr. GRPO): sum over tokens / (``num_seqs`` x ``max_len``), a constant.

    ``seq_mean`` and ``seq_sum_norm`` are accepted as the older names of the last two.
    """
    mode = LOSS_AGG_ALIASES.get(mode, mode)
    m = mask.to(per_token.dtype)
    if mode == "token_mean":
        return (per_token * m).sum() / max(num_tokens, 1.0)
    if mode == "seq_mean_token_mean":
        per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1.0)
        return per_seq.sum() / max(num_seqs, 1.0)
    if mode == "seq_mean_token_sum_norm":
        return (per_token * m).sum() / max(num_seqs * max_len, 1.0)
    raise ValueError(
        f"loss aggregation must be token_mean, seq_mean_token_mean or seq_mean_token_sum_norm, got {mode!r}."
    )


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


# ----------------------------------------------------------------------------- PPO: values and GAE
def terminal_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` token rewards: each sequence's reward ``[B]`` on its last response token, 0 elsewhere."""
    out = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    lengths = mask.sum(-1)
    rows = torch.nonzero(lengths > 0).squeeze(-1)
    out[rows, lengths[rows] - 1] = rewards[rows]
    return out


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over right-padded token sequences.

    ``rewards``, ``values`` and ``mask`` are ``[B, T]``; ``values[b, t]`` estimates the return from
    the state before token ``t``. The episode ends after each row's last token (value 0 after it).
    ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``; returns ``A + V``.
    Both outputs are 0 on padding.
    """
    m = mask.to(values.dtype)
    v, r = values * m, rewards.to(values.dtype) * m
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(v.shape[1])):
        next_v = v[:, t + 1] if t + 1 < v.shape[1] else torch.zeros_like(last)
        last = (r[:, t] + gamma * next_v - v[:, t] + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / (std + eps)`` over the masked entries (unbiased std); 0 elsewhere."""
    m = mask.to(x.dtype)
    n = m.sum().clamp(min=1.0)
    mean = (x * m).sum() / n
    var = (((x - mean) * m) ** 2).sum() / (n - 1).clamp(min=1.0)
    return (x - mean) / (var.sqrt() + eps) * m


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, clip: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``0.5 (V - R)^2``; with ``clip``, PPO's ``0.5 max((V - R)^2, (V_clip - R)^2)`` where
    ``V_clip = V_old + clamp(V - V_old, -clip, clip)``. Returns the loss and where the clipped term won."""
    unclipped = (values - returns) ** 2
    if not clip:
        return 0.5 * unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped = (v_clip - returns) ** 2
    return 0.5 * torch.maximum(unclipped, clipped), clipped > unclipped


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: 1 is a perfect critic, 0 predicts the mean.
    0.0 when the returns do not vary."""
    r, v = returns[mask.bool()].double(), values[mask.bool()].double()
    if r.numel() < 2 or float(r.var()) == 0.0:
        return 0.0
    return float(1.0 - (r - v).var() / r.var())
