"""The configured algorithm (the ``algo`` group): reward shaping, advantages, and the loss of a micro-batch.

The math is in :mod:`pipeline.algos` (pure tensor functions); this module reads the configuration once
and calls it, so the recipe's score and update steps are the same code for every preset (GRPO,
Dr. GRPO, DAPO, GSPO, RLOO, PPO).
"""

from __future__ import annotations

import torch
from tensordict import TensorDictBase

from pipeline import algos
from pipeline.config import TrainConfig
from pipeline.critic import Critic
from pipeline.mismatch import MAX_LOG_RATIO, truncated_is_weights
from pipeline.rewards import RewardResult, with_term


class Algorithm:
    """``rewards`` and ``advantages`` for the score step; ``algorithm(batch, ...) -> (loss, stats)`` for update."""

    def __init__(self, cfg: TrainConfig, critic: Critic | None = None) -> None:
        algo = cfg.algo
        self.algo, self.group_size = algo, cfg.generate.num_samples
        self.critic = critic
        self.mode = algo.loss_agg.value
        self.max_len = cfg.generate.max_new_tokens
        self.kwargs = {
            "clip_low": algo.clip_eps_low,
            "clip_high": algo.clip_eps_high,
            "kl_coef": 0.0 if algo.kl_in_reward else algo.kl_coef,  # in the rewards instead (PPO)
            "entropy_coef": algo.entropy_coef,
            "dual_clip": algo.dual_clip_c,
            "importance_ratio": algo.importance_ratio.value,
        }
        # Truncated importance sampling (rollout.tis_cap): the trainer's log-probs under the weights that
        # sampled come from the first pass, or from a no-grad pass when an update makes several steps.
        self.tis_cap = cfg.rollout.tis_cap
        self.tis_pass = self.tis_cap is not None and cfg.trainer.num_minibatches * algo.ppo_epochs > 1

    def rewards(self, rewards: RewardResult, lengths: torch.Tensor) -> RewardResult:
        """With ``overlong_buffer``: DAPO's soft overlong punishment added as one more reward term."""
        a = self.algo
        if not a.overlong_buffer:
            return rewards
        penalty = algos.overlong_penalty(lengths, self.max_len, a.overlong_buffer, a.overlong_penalty)
        return with_term(rewards, "overlong", penalty)

    def advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence advantages ``[N]`` and the zero-variance groups ``[prompts]``. PPO (``gae``) gets zeros
        here: its token-level advantages need the critic and the reference pass (``Critic.advantages``)."""
        a, g = self.algo, self.group_size
        if a.advantage.value == "rloo":
            return algos.rloo_advantages(rewards, g)
        if a.advantage.value == "grpo":
            return algos.group_advantages(rewards, g, std_normalize=a.std_normalize, eps=a.adv_eps)
        return torch.zeros_like(rewards), algos.zero_variance_groups(rewards, g)

    def valid(self, valid: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """Samples that enter the loss: scorable, and with ``mask_truncated`` ended by EOS."""
        return valid & ended if self.algo.mask_truncated else valid

    def __call__(
        self,
        batch: TensorDictBase,
        log_probs: torch.Tensor,
        entropy: torch.Tensor | None,
        values: torch.Tensor | None,
        mask: torch.Tensor,
        *,
        num_tokens: float,
        num_seqs: float,
        warmup: bool = False,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's share of the minibatch loss (see :func:`pipeline.algos.aggregate`) and detached
        per-token statistics. ``batch`` is a micro-batch of the rollout (behaviour ``log_probs``,
        ``advantage``, optional ``ref_log_probs``; with a critic ``values`` and ``returns``), ``mask`` its
        loss mask. ``warmup``: PPO's value warm-up, the value loss alone."""
        old, tis = batch["log_probs"], {}
        if self.tis_cap is not None:  # PPO's ratio against the trainer's old log-probs, times the TIS weight
            old = batch["train_log_probs"] if "train_log_probs" in batch.keys() else log_probs.detach()
            tis = self._tis(old, batch["log_probs"], mask)
        per_token, stats = algos.policy_loss(
            log_probs,
            old,
            batch["advantage"],
            ref_log_probs=batch.get("ref_log_probs", None),
            entropy=entropy,
            mask=mask,
            is_weights=tis.pop("is_weights", None),
            **self.kwargs,
        )
        if tis:  # the gen/train gap and ESS stay measured against the sampler's log-probs
            stats.update(tis, log_ratio=log_probs.detach() - batch["log_probs"])
        if values is not None:
            per_token = self.critic.add_loss(per_token, values, batch, stats, warmup=warmup)
        loss = algos.aggregate(
            per_token, mask, self.mode, num_tokens=num_tokens, num_seqs=num_seqs, max_len=self.max_len
        )
        return loss, stats

    def _tis(self, train_lp: torch.Tensor, sampler_lp: torch.Tensor, mask: torch.Tensor) -> dict:
        """TIS weights ``min(exp(train_lp - sampler_lp), C)`` and per-token statistics (the untruncated
        ratio, clamped as in :func:`pipeline.mismatch.truncated_is_weights`, and where it was capped)."""
        weights, _ = truncated_is_weights(train_lp, sampler_lp, mask, self.tis_cap)
        ratio = (train_lp.detach() - sampler_lp.to(train_lp.dtype)).clamp(max=MAX_LOG_RATIO).exp()
        return {"is_weights": weights, "tis_ratio": ratio, "tis_capped": ratio > self.tis_cap}
