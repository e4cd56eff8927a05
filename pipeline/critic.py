"""PPO's critic: a value head on the policy (``algo.critic=shared``) or a separate model, its loss, its state.

``shared``: a linear head reads the policy's last hidden state, i.e. the input of its LM head, captured by a
forward pre-hook. The values of a training micro-batch therefore come from the same forward pass as its
log-probs, and the rollout's values from the generation passes that sampled it: PPO costs no extra pass.
``separate``: a second copy of the model (its backbone, without the LM head) and its own head; it runs on
the rollout once (old values, no grad) and on every micro-batch (with grad).

Values are ``[B, T]`` like the response tokens: ``values[b, t]`` estimates the return from the state
before response token ``t``; after a response's last token the episode ends (value 0), truncated or not.
The head starts at zero, so the first advantages are the terminal rewards discounted by gamma x lambda. The recipe saves :meth:`Critic.state_dict` in every checkpoint (the head,
and the backbone when separate); its parameters are one group of the recipe's optimizer, so their AdamW
state is saved and restored with the optimizer's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from tensordict import TensorDictBase

from pipeline import algos
from pipeline.config import AlgoConfig, TrainConfig
from pipeline.logprobs import compute_dtype, fit_width, position_ids_from_mask, supports_logits_to_keep
from pipeline.metrics import gae_metrics
from pipeline.rollout import tensors_only


class Critic(torch.nn.Module):
    def __init__(
        self, policy: torch.nn.Module, cfg: AlgoConfig, backbone: torch.nn.Module | None = None
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.shared = backbone is None
        self.backbone = backbone
        lm_head = policy.get_output_embeddings()
        if self.shared and lm_head is None:
            raise ValueError(
                f"algo.critic=shared reads the input of the model's LM head, but {type(policy).__name__} has "
                "none (get_output_embeddings() is None); use algo.critic=separate."
            )
        self._policy_fns = (policy.get_output_embeddings, lambda: supports_logits_to_keep(policy))
        config = (backbone if backbone is not None else policy).config
        ref = next(policy.parameters())
        self.head = torch.nn.Linear(config.hidden_size, 1, device=ref.device, dtype=ref.dtype)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def param_group(self, lr: float) -> dict:
        """The optimizer group of the critic's parameters (the head; the backbone too when separate)."""
        return {"params": list(self.parameters()), "lr": lr}

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the critic's gradients on their own (the policy's are clipped apart); their norm before."""
        return float(torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm))

    def _values(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden).squeeze(-1).to(compute_dtype(hidden.dtype))

    @contextmanager
    def _lm_head_inputs(self, on_input: Callable[[torch.Tensor], None]) -> Iterator[None]:
        """Calls ``on_input(hidden)`` with every input of the policy's LM head while the block runs."""

        def hook(_module, args, kwargs):
            on_input(args[0] if args else kwargs["input"])

        handle = self._policy_fns[0]().register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    # ------------------------------------------------------------------ rollout (old) values
    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Around the policy's generation: with the shared head, the value of each generation step's last
        position (the state before the token it samples), ``[N]`` per step. A no-op when separate."""
        steps: list[torch.Tensor] = []
        if not self.shared:
            yield steps
            return
        with self._lm_head_inputs(lambda h: steps.append(self._values(h[:, -1]))):
            yield steps

    def rollout_values(
        self, rollout: TensorDictBase, steps: list[torch.Tensor], micro_batch: int
    ) -> torch.Tensor:
        """``[N, T]`` values of the rollout's response tokens (0 on padding), without gradients."""
        mask = rollout["tokens_response_mask"]
        if self.shared:
            if not steps:
                raise RuntimeError(
                    "algo.critic=shared: no values were recorded while the policy generated (the rollout "
                    "did not come from the model's own generate); use algo.critic=separate."
                )
            values = fit_width(torch.stack(steps, 1), mask.shape[1])
        else:
            tensors = tensors_only(rollout)
            with torch.inference_mode():
                parts = [
                    self._backbone_values(tensors[i]) for i in torch.arange(len(rollout)).split(micro_batch)
                ]
            values = torch.cat(parts)
        return (values * mask).to(rollout["log_probs"].dtype).clone()  # clone: a normal tensor again

    # ------------------------------------------------------------------ training values
    @contextmanager
    def capture(self) -> Iterator[list[torch.Tensor]]:
        """Around the training forward pass of the policy: keeps its LM head's input (shared head)."""
        hidden: list[torch.Tensor] = []
        if not self.shared:
            yield hidden
            return
        with self._lm_head_inputs(hidden.append):
            yield hidden

    def values(
        self, batch: TensorDictBase, hidden: list[torch.Tensor], *, detach: bool = False
    ) -> torch.Tensor:
        """``[B, T]`` values of a micro-batch, with gradients. Shared: from the hidden states captured by
        :meth:`capture` (``detach``: the policy backbone gets no value gradient); separate: a critic pass."""
        width = batch["tokens_response_mask"].shape[1]
        if not self.shared:
            return fit_width(self._backbone_values(batch), width)
        if len(hidden) != 1:
            raise RuntimeError(f"expected one LM-head call in the training forward pass, got {len(hidden)}.")
        h = hidden[0].detach() if detach else hidden[0]
        # the scorer keeps just the R positions that predict the response tokens when it can; the last of
        # its inputs is the one before the last response token
        r = h.shape[1] if self._policy_fns[1]() else int(batch["tokens_response_mask"].sum(-1).max())
        return fit_width(self._values(h[:, h.shape[1] - r :]), width)

    def _backbone_values(self, batch: TensorDictBase) -> torch.Tensor:
        """The separate critic on a dense slice of the rollout: prompt (left-padded) + response (right-padded)."""
        prompt, response = batch["tokens"], batch["tokens_response"]
        mask = torch.cat([batch["attention_mask"].bool(), batch["tokens_response_mask"]], 1)
        out = self.backbone(
            input_ids=torch.cat([prompt, response], 1),
            attention_mask=mask.long(),
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
        )
        p = prompt.shape[1]
        return self._values(out.last_hidden_state[:, p - 1 : p - 1 + response.shape[1]])

    # ------------------------------------------------------------------ GAE and the value loss
    def advantages(self, rollout: TensorDictBase, loss_mask: torch.Tensor) -> dict[str, float]:
        """Token-level GAE from the rollout's values and terminal rewards (minus the per-token KL when
        ``kl_in_reward``), whitened over ``loss_mask`` when ``whiten_advantages``. Writes ``advantage``
        and ``returns`` into the rollout; returns the metrics of :func:`pipeline.metrics.gae_metrics`."""
        cfg, mask = self.cfg, rollout["tokens_response_mask"]
        values = rollout["values"].double()
        rewards = algos.terminal_rewards(rollout["reward"].double(), mask)
        if cfg.kl_in_reward and "ref_log_probs" in rollout.keys():
            kl = (rollout["log_probs"] - rollout["ref_log_probs"]).double()  # k1 estimate under the sampler
            rewards = rewards - cfg.kl_coef * kl * mask
        adv, returns = algos.gae(rewards, values, mask, cfg.gamma, cfg.lam)
        out = adv if not cfg.whiten_advantages else algos.whiten(adv, loss_mask)
        dtype = rollout["log_probs"].dtype
        rollout["advantage"], rollout["returns"] = out.to(dtype), returns.to(dtype)
        return gae_metrics(adv, returns, values, loss_mask)

    def add_loss(
        self,
        per_token: torch.Tensor,
        values: torch.Tensor,
        batch: TensorDictBase,
        stats: dict,
        *,
        warmup: bool,
    ) -> torch.Tensor:
        """``per_token + value_coef x`` the (clipped) value loss; during warm-up the value loss alone."""
        loss, clipped = algos.value_loss(values, batch["values"], batch["returns"], self.cfg.value_clip)
        stats["value_loss"], stats["value_clipped"] = loss.detach(), clipped
        loss = self.cfg.value_coef * loss
        return loss if warmup else per_token + loss


def build_critic(cfg: TrainConfig, policy: torch.nn.Module) -> Critic:
    """The configured critic (``algo.critic``): the shared head, or a fresh copy of the model's backbone."""
    if cfg.algo.critic.value == "shared":
        return Critic(policy, cfg.algo)
    from pipeline.build import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(cfg)
    return Critic(policy, cfg.algo, backbone=model.base_model)
