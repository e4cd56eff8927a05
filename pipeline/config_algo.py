"""Schema of the ``algo`` group: advantage estimator, policy loss, KL, PPO critic, dynamic sampling."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config_types import Advantage, CriticKind, ImportanceRatio, LossAgg, _require


@dataclass
class AlgoConfig:
    name: str = "grpo"  # a label for runs and tables; behaviour comes from the fields below
    recipe: str = "pipeline.recipe.GRPORecipe"  # the recipe class train.py runs
    advantage: Advantage = Advantage.grpo
    std_normalize: bool = True
    adv_eps: float = 1e-4
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.02
    entropy_coef: float = 0.0
    loss_agg: LossAgg = LossAgg.token_mean
    ppo_epochs: int = 1
    dual_clip_c: float | None = None  # dual-clip: loss of A < 0 tokens at most c * |A| (c > 1)
    importance_ratio: ImportanceRatio = ImportanceRatio.token
    dynamic_sampling: bool = False  # DAPO: drop zero-variance groups, sample more prompts to refill
    max_resample_rounds: int = 3  # extra generation rounds per step at most (then refill with dropped groups)
    overlong_buffer: int = 0  # DAPO soft overlong penalty over the last N of max_new_tokens (0: off)
    overlong_penalty: float = 1.0  # the penalty reached at max_new_tokens
    mask_truncated: bool = False  # completions without EOS are left out of the loss
    # PPO (advantage=gae)
    critic: CriticKind = CriticKind.shared
    gamma: float = 1.0
    lam: float = 0.95
    value_coef: float = 0.5
    value_clip: float | None = 0.2  # value-loss clipping around the rollout's values (null: off)
    value_lr: float | None = None  # null: optim.lr
    value_warmup_steps: int = 0  # first N steps train the critic only
    whiten_advantages: bool = True
    kl_in_reward: bool = False  # KL to the reference as a per-token reward penalty instead of a loss term

    def __post_init__(self) -> None:
        _require(0 <= self.clip_eps_low < 1, "algo.clip_eps_low", "in [0, 1)", self.clip_eps_low)
        _require(self.clip_eps_high >= 0, "algo.clip_eps_high", ">= 0", self.clip_eps_high)
        _require(self.kl_coef >= 0, "algo.kl_coef", ">= 0", self.kl_coef)
        _require(self.entropy_coef >= 0, "algo.entropy_coef", ">= 0", self.entropy_coef)
        _require(self.adv_eps > 0, "algo.adv_eps", "> 0", self.adv_eps)
        _require(self.ppo_epochs >= 1, "algo.ppo_epochs", "an int >= 1", self.ppo_epochs)
        c = self.dual_clip_c
        _require(c is None or c > 1, "algo.dual_clip_c", "null or > 1", c)
        for key in ("max_resample_rounds", "overlong_buffer", "overlong_penalty", "value_warmup_steps"):
            _require(getattr(self, key) >= 0, f"algo.{key}", ">= 0", getattr(self, key))
        for key in ("gamma", "lam"):
            _require(0 <= getattr(self, key) <= 1, f"algo.{key}", "in [0, 1]", getattr(self, key))
        _require(self.value_coef > 0, "algo.value_coef", "> 0", self.value_coef)
        for key in ("value_clip", "value_lr"):
            value = getattr(self, key)
            _require(value is None or value > 0, f"algo.{key}", "null or > 0", value)
        gae = self.advantage == Advantage.gae
        if self.dynamic_sampling and gae:
            raise ValueError("algo.dynamic_sampling drops zero-variance groups: use advantage=grpo|rloo.")
        if self.kl_in_reward and not gae:
            raise ValueError("algo.kl_in_reward is a PPO token-reward penalty: use algo.advantage=gae.")
