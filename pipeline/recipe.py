"""The GRPO recipe (GRPO, Dr. GRPO, DAPO, GSPO, RLOO; PPO with a critic): collect -> score -> update -> log.

``GRPORecipe(cfg, run_dir)`` fails fast on bad data, rewards or rollout engine, before any model loads;
``setup()`` loads or restores a checkpoint; ``train()`` runs the loop and returns the final held-out
accuracy (the sweep objective); ``cleanup()`` closes the loggers.

One dense rollout TensorDict ``[N = prompts x G]`` carries a step to the loss: the policy's outputs (HF or
vLLM, :mod:`pipeline.rollout`; ``tokens``, ``attention_mask`` left-padded; ``tokens_response``, ``log_probs``
right-padded with ``tokens_response_mask``; ``text``, ``text_response``), then ``lengths``, ``ended``,
``reward``, ``valid``, ``advantage``, ``ref_log_probs`` (PPO: ``values``, ``returns``)."""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict, TensorDictBase
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

from pipeline import checkpoint, dynamic_sampling, lora
from pipeline.algorithm import Algorithm
from pipeline.build import build_policy, load_model_and_tokenizer
from pipeline.chat import prompt_batch
from pipeline.config import TrainConfig, derived_sizes, describe_sizes, instantiate_node
from pipeline.critic import build_critic
from pipeline.distributed import Distributed, NullLogger
from pipeline.evaluation import greedy_eval
from pipeline.loggers import RunLogger
from pipeline.metrics import UpdateStats, completion_rows, perf_metrics, reward_metrics, rollout_metrics
from pipeline.rewards import RewardResult, RewardSet
from pipeline.rollout import (
    add_train_log_probs,
    check_rollout,
    detached_copy,
    scored_log_probs,
    setup_rollout,
    tensors_only,
)
from pipeline.runtime import PhaseTimer, StopRequest, TrainingError, seed_everything, write_run_info
from pipeline.tasks import Example

__all__ = ["GRPORecipe", "TrainingError"]


class GRPORecipe:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, group: str | None = None) -> None:
        self.cfg = cfg
        self.dist = Distributed(cfg)  # torchrun ranks with trainer.strategy=ddp|fsdp; identities otherwise
        self.run_dir = self.dist.shared_path(run_dir)  # rank 0's run folder on every rank
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.group = group
        self.sizes = self.dist.local_sizes(derived_sizes(cfg), cfg.trainer.micro_batch_size)  # per rank
        self.resume_from = checkpoint.resume_path(cfg.trainer.resume, self.ckpt_dir)
        # Data and reward errors surface before any model is loaded.
        self.task = instantiate_node(cfg.task, "task")
        self.rewards = RewardSet.from_config(cfg.reward)
        check_rollout(cfg)  # rollout.engine=vllm without vLLM installed (or with LoRA, DDP)
        if not cfg.chat_template.use_chat and any(e.messages for e in self.task.train_examples[:1]):
            raise ValueError(
                "the task gives conversations (task.messages_field): they need a chat template, "
                "e.g. chat_template=tokenizer."
            )
        self.step = 0
        self.nonfinite_in_row = 0
        self.last_accuracy = float("nan")
        self.logger: RunLogger | NullLogger = NullLogger()  # ranks > 0 keep this one

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        seed_everything(self.cfg.seed, self.cfg.trainer.deterministic, self.cfg.trainer.threads)
        self._setup_model()
        self._setup_policies()
        self._setup_optimizer()
        self._restore()
        self._setup_logger()
        self._print_sizes()

    def _setup_model(self) -> None:
        weights = str(self.resume_from / "model") if self.resume_from else None
        prompts = [e.prompt for e in self.task.train_examples + self.task.eval_examples]
        self.model, self.tokenizer = load_model_and_tokenizer(self.cfg, weights=weights, prompts=prompts)
        self.device, self.dtype = self.model.device, self.model.dtype
        if self.cfg.model.gradient_checkpointing:
            self.model.config.use_cache = False

    def _setup_policies(self) -> None:
        cfg, shared = self.cfg, {"tokenizer": self.tokenizer, "inplace": False}
        self.policy, self.weight_sync = setup_rollout(self)  # rollout.engine: HF generate, or vLLM (synced)
        self.greedy = build_policy(cfg, "greedy", model=self.model, **shared)
        self.scorer = build_policy(
            cfg, "score", model=self.dist.wrap(self.model), return_logits=cfg.algo.entropy_coef > 0, **shared
        )
        self.ref_scorer = None
        if cfg.algo.kl_coef > 0:  # the initial weights: LoRA's base (adapters disabled) or a frozen copy
            ref = lora.reference_model(self.model, lambda: load_model_and_tokenizer(cfg)[0])
            self.ref_scorer = build_policy(cfg, "score", model=self.dist.frozen(ref), **shared)
        self.critic = build_critic(cfg, self.model) if cfg.algo.advantage.value == "gae" else None  # PPO
        self.algorithm = Algorithm(cfg, self.critic)  # rewards shaping, advantages, the loss

    def _setup_optimizer(self) -> None:
        o, params = self.cfg.optim, [p for p in self.model.parameters() if p.requires_grad]
        if self.critic is not None:  # PPO: the critic's own group (and AdamW state in the checkpoint)
            params = [{"params": params}, self.critic.param_group(self.cfg.algo.value_lr or o.lr)]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=o.lr,
            betas=tuple(o.betas),
            eps=o.eps,
            weight_decay=o.weight_decay,
            fused=o.fused and self.device.type in ("cpu", "cuda"),
        )
        self.scheduler = get_scheduler(
            o.scheduler,
            self.optimizer,
            num_warmup_steps=o.warmup_steps,
            num_training_steps=self.cfg.trainer.steps,
        )

    def _restore(self) -> None:
        self.wandb_id = None
        if self.resume_from is None:
            return
        state, optim_state, sched_state, rng = checkpoint.load_training_state(self.resume_from)
        self.dist.load_optimizer_state(self.optimizer, optim_state)  # fsdp: this rank's shards
        if self.critic is not None:
            self.critic.load_state_dict(checkpoint.load_extra(self.resume_from, "critic"))
        self.scheduler.load_state_dict(sched_state)
        self.task.load_state_dict(state["task"])
        checkpoint.set_rng_state(rng, state["rng"])
        self.step = state["step"]
        self.nonfinite_in_row = state.get("nonfinite_in_row", 0)
        self.wandb_id = state.get("wandb_id")

    def _setup_logger(self) -> None:
        cfg = self.cfg
        if not self.dist.is_main:  # rank 0 alone writes the run folder, wandb, metrics and plots
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(self.run_dir, cfg)
        self.logger = RunLogger(
            cfg.logger,
            self.run_dir,
            config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            run_name=cfg.name or self.run_dir.name,
            group=self.group,
            total_steps=cfg.trainer.steps,
            start_step=self.step,
            wandb_id=self.wandb_id,
        )

    def _print_sizes(self) -> None:
        print(
            f"{describe_sizes(self.cfg, self.sizes)}; device {self.device}, dtype {self.dtype}; {self.dist.describe()}"
            + (f"; resuming from {self.resume_from} at step {self.step}" if self.resume_from else "")
        )

    # ------------------------------------------------------------------ loop
    def train(self) -> float:
        """Run the remaining steps; returns the final held-out accuracy (the sweep objective)."""
        tr = self.cfg.trainer
        if self.step == 0 and tr.eval_every:
            self.logger.log(0, self.evaluate())
        start, out_of_time = time.monotonic(), False
        with StopRequest() as stop:
            while self.step < tr.steps and not out_of_time:
                timer = PhaseTimer()
                with timer("collect"):  # 1. G samples per prompt, with behaviour log-probs
                    examples = self.task.sample(tr.prompts_per_step)  # the global batch, on every rank
                    mine, rollout = self.dist.collect(self.collect, examples, self.step)  # this rank's groups
                with timer("reward"):  # 2. rewards -> advantages; DAPO: zero-variance groups refilled
                    rewards, zero_var = self.score(rollout, mine)
                    rollout, examples, rewards, zero_var, dyn = self.refill(
                        rollout, examples, rewards, zero_var
                    )
                with timer("ref"):  # 3. reference log-probs, once per rollout
                    self.reference_log_probs(rollout)
                with timer("update"):  # 4. ppo_epochs x minibatches, micro-batches accumulated
                    update = self.update(rollout)
                    self.scheduler.step()
                    update.update(self.weight_sync.sync(self.step + 1))  # vLLM: rollout/sync_time, staleness
                self.step += 1
                rewards, zero_var, rollout = self.dist.gather_for_metrics(rewards, zero_var, rollout)
                metrics = {  # 5. log, evaluate, save
                    **reward_metrics(rewards, self.cfg.reward.accuracy, zero_var),
                    **rollout_metrics(rollout, self.cfg.generate.max_new_tokens),
                    **update,
                    **dyn,
                    "loss/lr": self.scheduler.get_last_lr()[0],
                    **perf_metrics(
                        float(rollout["lengths"].sum()), timer.times, timer.elapsed(), self.device
                    ),
                    "perf/train_minutes": (minutes := (time.monotonic() - start) / 60),
                }
                out_of_time = tr.max_minutes is not None and self.dist.any(minutes >= tr.max_minutes)
                self._log_step(metrics, rollout, examples, last=out_of_time)
                if self.dist.any(stop.requested):  # on any rank
                    self.save_checkpoint()
                    raise KeyboardInterrupt(
                        f"stopped by {stop.requested} after step {self.step}; checkpoint saved"
                    )
                if tr.save_every and self.step % tr.save_every == 0 and self.step < tr.steps:
                    self.save_checkpoint()
        self.save_checkpoint()
        self.save_final_model()
        if not tr.eval_every:
            self.logger.log(self.step, self.evaluate())
        return self.last_accuracy

    def _log_step(
        self, metrics: dict[str, float], rollout: TensorDictBase, examples: list[Example], last: bool
    ) -> None:
        tr, step = self.cfg.trainer, self.step
        if tr.eval_every and (step % tr.eval_every == 0 or step == tr.steps or last):
            metrics.update(self.evaluate())
        if step % tr.log_every == 0 or step == tr.steps or "eval/accuracy" in metrics:
            self.logger.log(
                step, metrics, {"logprobs/hist": rollout["log_probs"][rollout["tokens_response_mask"]]}
            )
        if tr.completions_every and step % tr.completions_every == 0:
            answers = [e.answer for e in examples for _ in range(self.cfg.generate.num_samples)]
            rows = completion_rows(
                list(rollout["text"]), list(rollout["text_response"]), answers, rollout["reward"]
            )
            self.logger.log_completions(step, rows)

    def collect(self, examples: list[Example]) -> TensorDict:
        """Sample G responses per prompt: the dense rollout ``[N]`` with behaviour log-probs and masks.

        The policy returns prompts left-padded (``tokens``, ``attention_mask``) and responses and
        their log-probs right-padded (``tokens_response``, ``log_probs``) with ``tokens_response_mask``.
        """
        recording = self.critic.recording() if self.critic is not None else nullcontext([])
        with self.dist.inference(), recording as steps:  # steps: a shared value head's values, per token
            rollout = self.policy(self._prompt_batch(examples)).reshape(-1)
        # a normal tensordict (inference tensors cannot take part in autograd) on the trainer's device: vLLM
        # returns CPU tensors, and rewards, advantages, ... written later follow the tensordict's device
        rollout = detached_copy(rollout, self.device)
        mask = rollout["tokens_response_mask"]
        lengths = mask.sum(-1)
        last = rollout["tokens_response"].gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        eos = torch.as_tensor(self.policy.generation_config.eos_token_id, device=last.device).reshape(-1)
        rollout["lengths"], rollout["ended"] = lengths, (lengths > 0) & torch.isin(last, eos)
        if self.critic is not None:  # PPO: V(state before each response token)
            rollout["values"] = self.critic.rollout_values(rollout, steps, self.sizes["micro_batch"])
        return rollout

    def _prompt_batch(self, examples: list[Example]) -> TensorDict:
        return prompt_batch(examples, self.cfg.chat_template)

    def score(self, rollout: TensorDict, examples: list[Example]) -> tuple[RewardResult, torch.Tensor]:
        """Rewards of the completions and their group-relative advantages, written into the rollout
        (PPO's token-level advantages come from the critic in ``update``, after the reference pass)."""
        g = self.cfg.generate.num_samples
        answers = [e.answer for e in examples for _ in range(g)]
        rewards = self.rewards(list(rollout["text_response"]), answers, list(rollout["text"]))
        rewards = self.algorithm.rewards(rewards, rollout["lengths"])  # DAPO's overlong term, if on
        advantages, zero_var = self.algorithm.advantages(rewards.total)
        rollout["reward"], rollout["advantage"] = rewards.total, advantages.to(rollout["log_probs"].dtype)
        rollout["valid"] = self.algorithm.valid(rewards.valid, rollout["ended"])  # algo.mask_truncated
        return rewards, zero_var

    def refill(
        self, rollout: TensorDict, examples: list[Example], rewards: RewardResult, zero_var: torch.Tensor
    ) -> tuple[TensorDict, list[Example], RewardResult, torch.Tensor, dict[str, float]]:
        """DAPO's dynamic sampling (``algo.dynamic_sampling``, :func:`pipeline.dynamic_sampling.refill`)."""
        if not self.cfg.algo.dynamic_sampling:
            return rollout, examples, rewards, zero_var, {}
        out, metrics = dynamic_sampling.refill(
            dynamic_sampling.Groups(examples, rollout, rewards, zero_var),
            partial(dynamic_sampling.draw, self.task.sample, self.collect, self.score),
            target=self.cfg.trainer.prompts_per_step,
            group_size=self.cfg.generate.num_samples,
            max_rounds=self.cfg.algo.max_resample_rounds,
            pad_token_id=self.policy.pad_token_id,
        )
        return out.rollout, out.examples, out.rewards, out.zero_var, metrics

    def reference_log_probs(self, rollout: TensorDict) -> None:
        """Log-probs of the frozen reference model (``ref_log_probs``), when the KL term is on."""
        if self.ref_scorer is None:
            return
        tensors = tensors_only(rollout)
        with self.dist.inference(), lora.adapters_disabled(self.ref_scorer.model):
            parts = [
                scored_log_probs(self.ref_scorer, tensors[idx])[0]
                for idx in torch.arange(len(rollout)).split(self.sizes["micro_batch"])
            ]
            ref = torch.cat(parts).to(rollout["log_probs"].dtype)
        rollout["ref_log_probs"] = ref

    def _forward(self, batch: TensorDictBase, *, detach: bool) -> tuple[torch.Tensor, ...]:
        """Log-probs, entropy and (PPO) values of a micro-batch: a shared value head reads the same pass."""
        with self.critic.capture() if self.critic is not None else nullcontext() as hidden:
            lp, entropy = scored_log_probs(self.scorer, batch)
        values = self.critic.values(batch, hidden, detach=detach) if self.critic is not None else None
        return lp, entropy, values

    def update(self, rollout: TensorDict) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled minibatches; one optimizer step per minibatch."""
        algo, sizes = self.cfg.algo, self.sizes
        loss_mask = rollout["tokens_response_mask"] & rollout["valid"].unsqueeze(-1)
        critic = self.critic.advantages(rollout, loss_mask) if self.critic is not None else {}  # PPO: GAE
        warmup = self.critic is not None and self.step < algo.value_warmup_steps  # the critic alone learns
        add_train_log_probs(self, rollout)  # TIS, several optimizer steps: the sampling weights' log-probs
        stats, tensors = UpdateStats(), tensors_only(rollout)
        for epoch in range(algo.ppo_epochs):
            for mb_index, mb in enumerate(self.dist.permutation(len(rollout)).split(sizes["minibatch"])):
                # normalisers of the whole minibatch, so the accumulated micro-batch losses add up to its loss
                n_tokens, n_seqs = self.dist.all_sum(loss_mask[mb].sum(), rollout["valid"][mb].sum())
                self.optimizer.zero_grad(set_to_none=True)
                mb_loss = 0.0
                for micro in self.dist.accumulate(mb.split(sizes["micro_batch"])):
                    batch, m = tensors[micro], loss_mask[micro]
                    lp, entropy, values = self._forward(batch, detach=warmup)
                    loss, token_stats = self.algorithm(
                        batch, lp, entropy, values, m, num_tokens=n_tokens, num_seqs=n_seqs, warmup=warmup
                    )
                    loss.backward()
                    mb_loss += float(loss.detach())
                    if epoch == 0 and mb_index == 0:
                        stats.add_gen_train_diff(token_stats["log_ratio"], m)
                    stats.add_tokens(token_stats, m)
                self._optimizer_step(self.dist.all_sum(mb_loss)[0], stats)
        return {**self.dist.gather_stats(stats).summary(), **critic}

    def _optimizer_step(self, loss: float, stats: UpdateStats) -> None:
        """Clip and step; a non-finite loss or gradient norm skips the step (and aborts after too many)."""
        clip = self.cfg.optim.max_grad_norm
        norm = self.dist.clip_grad_norm_(self.model.parameters(), clip)  # fsdp: over every rank's shards
        vnorm = self.critic.clip_grad_norm(clip) if self.critic is not None else None
        finite = bool(np.isfinite(loss) and torch.isfinite(norm) and np.isfinite(vnorm or 0.0))
        stats.add_step(loss, float(norm), skipped=not finite, value_grad_norm=vnorm)
        if finite:
            self.nonfinite_in_row = 0
            self.optimizer.step()
            return
        self.nonfinite_in_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        limit = self.cfg.trainer.max_nonfinite
        if self.nonfinite_in_row >= limit:
            raise TrainingError(
                f"{self.nonfinite_in_row} non-finite losses/gradient norms in a row (loss {loss}, grad norm "
                f"{float(norm)}) at step {self.step + 1}; lower optim.lr or check the rewards "
                f"(limit: trainer.max_nonfinite={limit})."
            )

    # ------------------------------------------------------------------ eval / save
    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy and mean length (:func:`pipeline.evaluation.greedy_eval`), ranks sharing the work."""
        examples, real = self.dist.eval_shard(self.task.eval_examples[: self.cfg.trainer.eval_size])
        args = (self.greedy, self._prompt_batch, self.rewards, self.cfg.reward.accuracy, examples)
        with self.dist.inference():  # fsdp: shares padded to one length (padding ignored), ranks in step
            out = greedy_eval(*args, self.dist.gather_all, real=real)
        self.last_accuracy = out["eval/accuracy"]
        return out

    def save_checkpoint(self) -> Path:
        state = {
            "task": self.task.state_dict(),
            "nonfinite_in_row": self.nonfinite_in_row,
            "wandb_id": self.logger.wandb_id if self.logger else None,
            "seed": self.cfg.seed,
        }
        return self.dist.on_main(  # after a barrier, from rank 0
            checkpoint.save_checkpoint,
            self.ckpt_dir,
            self.step,
            model=self.model,
            tokenizer=self.tokenizer,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            state=state,
            config_yaml=OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
            keep_last=self.cfg.trainer.keep_last,
            extra=None if self.critic is None else {"critic": self.critic.state_dict()},
            **self.dist.full_state(self.model, self.optimizer),  # fsdp: whole states, gathered by every rank
        )

    def save_final_model(self) -> Path:
        """The trained policy in Hugging Face format: ``from_pretrained(run_dir / 'final_model')``."""
        path, full = self.run_dir / "final_model", self.dist.full_state(self.model)  # fsdp: a collective
        self.dist.on_main(lora.save_pretrained, self.model, path, **full)  # LoRA: + final_model_adapter/
        self.dist.on_main(self.tokenizer.save_pretrained, path)
        return path

    def cleanup(self) -> None:
        try:
            self.logger.plot()
        finally:
            self.logger.close()
            self.dist.close()
