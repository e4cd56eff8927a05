"""The GRPO recipe (GRPO, Dr. GRPO, RLOO): collect -> score -> update -> log -> save.

``GRPORecipe(cfg, run_dir)`` fails fast on bad options (data and rewards are checked before any
model is loaded); ``setup()`` loads everything or restores a checkpoint; ``train()`` runs the loop
and returns the final held-out accuracy (the sweep objective); ``cleanup()`` closes the loggers.

One dense rollout TensorDict ``[N = prompts x G]`` carries a step from collection to the loss:
the policy's outputs (``tokens`` and ``attention_mask`` left-padded; ``tokens_response``, behaviour
``log_probs`` and ``tokens_response_mask`` right-padded; ``text``, ``text_response``), then
``lengths``, ``ended``, ``reward``, ``valid``, ``advantage`` and ``ref_log_probs``. Micro-batches
are index slices of it. The math is in :mod:`pipeline.algos`, the
metrics in :mod:`pipeline.metrics`, run-level plumbing in :mod:`pipeline.runtime`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict, TensorDictBase
from torchrl.data.llm import History
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

from pipeline import algos, checkpoint
from pipeline.build import build_policy, load_model_and_tokenizer
from pipeline.config import TrainConfig, derived_sizes, instantiate_node
from pipeline.loggers import RunLogger
from pipeline.logprobs import entropy_from_logits, fit_width
from pipeline.distributed import Distributed, NullLogger
from pipeline.metrics import (
    UpdateStats,
    completion_rows,
    eval_metrics,
    perf_metrics,
    reward_metrics,
    rollout_metrics,
)
from pipeline.policy import TransformersWrapper
from pipeline.rewards import RewardResult, RewardSet
from pipeline.runtime import PhaseTimer, StopRequest, TrainingError, seed_everything, write_run_info
from pipeline.tasks import Example

__all__ = ["GRPORecipe", "TrainingError"]


class GRPORecipe:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, group: str | None = None) -> None:
        self.cfg = cfg
        self.dist = Distributed(cfg)  # torchrun ranks with trainer.strategy=ddp; identities otherwise
        self.run_dir = self.dist.shared_path(run_dir)  # rank 0's run folder on every rank
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.group = group
        self.sizes = self.dist.local_sizes(derived_sizes(cfg), cfg.trainer.micro_batch_size)  # per rank
        self.resume_from = self._resume_path()
        # Data and reward errors surface before any model is loaded.
        self.task = instantiate_node(cfg.task, "task")
        self.rewards = RewardSet.from_config(cfg.reward)
        if not cfg.chat_template.use_chat and any(e.messages for e in self.task.train_examples[:1]):
            raise ValueError(
                "the task gives conversations (task.messages_field): they need a chat template, "
                "e.g. chat_template=tokenizer."
            )
        self.step = 0
        self.nonfinite_in_row = 0
        self.last_accuracy = float("nan")
        self.logger: RunLogger | NullLogger = NullLogger()  # ranks > 0 keep this one

    def _resume_path(self) -> Path | None:
        resume = self.cfg.trainer.resume
        if resume is None:
            return None
        if resume == "auto":
            checkpoint.clean_partial(self.ckpt_dir)
            found = checkpoint.list_checkpoints(self.ckpt_dir)
            return found[-1] if found else None
        return checkpoint.check_checkpoint(Path(resume))

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
        self.policy = build_policy(cfg, "generate", model=self.model, **shared)
        self.greedy = build_policy(cfg, "greedy", model=self.model, **shared)
        self.scorer = build_policy(
            cfg, "score", model=self.dist.wrap(self.model), return_logits=cfg.algo.entropy_coef > 0, **shared
        )
        self.ref_scorer = None
        if cfg.algo.kl_coef > 0:  # a frozen copy of the initial weights
            ref, _ = load_model_and_tokenizer(cfg)
            self.ref_scorer = build_policy(cfg, "score", model=ref.requires_grad_(False), **shared)

    def _setup_optimizer(self) -> None:
        o, params = self.cfg.optim, [p for p in self.model.parameters() if p.requires_grad]
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
        self.optimizer.load_state_dict(optim_state)
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
        cfg, s = self.cfg, self.sizes
        if self.dist.enabled:
            print(f"[dist] rank {self.dist.rank}: {self.dist.describe()}; sizes below are per rank", flush=True)
        print(
            f"[sizes] {cfg.trainer.prompts_per_step} prompts x {cfg.generate.num_samples} samples = {s['rollout']} "
            f"sequences/step; {cfg.trainer.num_minibatches} minibatch(es) of {s['minibatch']} x {cfg.algo.ppo_epochs} "
            f"epoch(s) = {s['optimizer_steps_per_step']} optimizer step(s)/step; micro-batch {s['micro_batch']}, "
            f"grad accumulation {s['grad_accum']}; device {self.device}, dtype {self.dtype}"
            + (f"; resuming from {self.resume_from} at step {self.step}" if self.resume_from else "")
        )

    # ------------------------------------------------------------------ loop
    def train(self) -> float:
        """Run the remaining steps; returns the final held-out accuracy (the sweep objective)."""
        tr = self.cfg.trainer
        if self.step == 0 and tr.eval_every:
            self.logger.log(0, self.evaluate())
        with StopRequest() as stop:
            while self.step < tr.steps:
                timer = PhaseTimer()
                with timer("collect"):  # 1. G samples per prompt, with behaviour log-probs
                    examples = self.task.sample(tr.prompts_per_step)  # the global batch, on every rank
                    mine, rollout = self.dist.collect(self.collect, examples, self.step)  # this rank's groups
                with timer("reward"):  # 2. rewards -> group-relative advantages
                    rewards, zero_var = self.score(rollout, mine)
                with timer("ref"):  # 3. reference log-probs, once per rollout
                    self.reference_log_probs(rollout)
                with timer("update"):  # 4. ppo_epochs x minibatches, micro-batches accumulated
                    update = self.update(rollout)
                    self.scheduler.step()
                self.step += 1
                rewards, zero_var, rollout = self.dist.gather_for_metrics(rewards, zero_var, rollout)
                metrics = {  # 5. log, evaluate, save
                    **reward_metrics(rewards, self.cfg.reward.accuracy, zero_var),
                    **rollout_metrics(rollout, self.cfg.generate.max_new_tokens),
                    **update,
                    "loss/lr": self.scheduler.get_last_lr()[0],
                    **perf_metrics(
                        float(rollout["lengths"].sum()), timer.times, timer.elapsed(), self.device
                    ),
                }
                self._log_step(metrics, rollout, examples)
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

    def _log_step(self, metrics: dict[str, float], rollout: TensorDictBase, examples: list[Example]) -> None:
        tr, step = self.cfg.trainer, self.step
        if tr.eval_every and (step % tr.eval_every == 0 or step == tr.steps):
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
        with torch.inference_mode():
            rollout = self.policy(self._prompt_batch(examples)).reshape(-1)
        rollout = rollout.clone()  # a normal tensordict: inference tensors cannot take part in autograd
        mask = rollout["tokens_response_mask"]
        lengths = mask.sum(-1)
        last = rollout["tokens_response"].gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        eos = torch.as_tensor(self.policy.generation_config.eos_token_id).reshape(-1)
        rollout["lengths"], rollout["ended"] = lengths, (lengths > 0) & torch.isin(last, eos)
        return rollout

    def _prompt_batch(self, examples: list[Example]) -> TensorDict:
        """Plain-text prompts, or with a chat template a ``History`` per example: its conversation
        (``Example.messages``) or one user turn, after the configured system prompt."""
        chat = self.cfg.chat_template
        if not chat.use_chat:
            return TensorDict(text=[e.prompt for e in examples], batch_size=[len(examples)])
        chats = []
        for e in examples:
            turns = (
                [m._asdict() for m in e.messages] if e.messages else [{"role": "user", "content": e.prompt}]
            )
            if chat.system_prompt and turns[0]["role"] != "system":
                turns.insert(0, {"role": "system", "content": chat.system_prompt})
            chats.append(turns)
        return TensorDict(history=History.from_chats(chats), batch_size=[len(examples)])

    def score(self, rollout: TensorDict, examples: list[Example]) -> tuple[RewardResult, torch.Tensor]:
        """Rewards of the completions and their group-relative advantages, written into the rollout."""
        g, algo = self.cfg.generate.num_samples, self.cfg.algo
        answers = [e.answer for e in examples for _ in range(g)]
        rewards = self.rewards(list(rollout["text_response"]), answers, list(rollout["text"]))
        if algo.advantage.value == "rloo":
            advantages, zero_var = algos.rloo_advantages(rewards.total, g)
        else:
            advantages, zero_var = algos.group_advantages(
                rewards.total, g, std_normalize=algo.std_normalize, eps=algo.adv_eps
            )
        rollout["reward"], rollout["valid"] = rewards.total, rewards.valid
        rollout["advantage"] = advantages.to(rollout["log_probs"].dtype)
        return rewards, zero_var

    def reference_log_probs(self, rollout: TensorDict) -> None:
        """Log-probs of the frozen reference model (``ref_log_probs``), when the KL term is on."""
        if self.ref_scorer is None:
            return
        with torch.inference_mode():
            parts = [
                self._log_probs(self.ref_scorer, rollout[idx])[0]
                for idx in torch.arange(len(rollout)).split(self.sizes["micro_batch"])
            ]
            ref = torch.cat(parts).to(rollout["log_probs"].dtype)
        rollout["ref_log_probs"] = ref

    def _log_probs(
        self, scorer: TransformersWrapper, batch: TensorDictBase
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probs of the batch's responses, padded like ``batch["log_probs"]`` (and per-token entropy
        when the scorer returns logits)."""
        width = batch["log_probs"].shape[1]
        out = scorer(batch.select("tokens", "attention_mask", "tokens_response", "tokens_response_mask"))
        lp = fit_width(out["log_probs"], width)
        if not scorer.return_logits:
            return lp, None
        return lp, fit_width(entropy_from_logits(out["logits"] / scorer.log_probs_temperature), width)

    def update(self, rollout: TensorDict) -> dict[str, float]:
        """``ppo_epochs`` passes over shuffled minibatches; one optimizer step per minibatch."""
        algo, sizes = self.cfg.algo, self.sizes
        loss_mask = rollout["tokens_response_mask"] & rollout["valid"].unsqueeze(-1)
        stats = UpdateStats()
        for epoch in range(algo.ppo_epochs):
            for mb_index, mb in enumerate(self.dist.permutation(len(rollout)).split(sizes["minibatch"])):
                # normalisers of the whole minibatch, so the accumulated micro-batch losses add up to its loss
                n_tokens, n_seqs = self.dist.all_sum(loss_mask[mb].sum(), rollout["valid"][mb].sum())
                self.optimizer.zero_grad(set_to_none=True)
                mb_loss = 0.0
                for micro in self.dist.accumulate(mb.split(sizes["micro_batch"])):
                    batch, m = rollout[micro], loss_mask[micro]
                    lp, entropy = self._log_probs(self.scorer, batch)
                    per_token, token_stats = algos.policy_loss(
                        lp,
                        batch["log_probs"],
                        batch["advantage"],
                        clip_low=algo.clip_eps_low,
                        clip_high=algo.clip_eps_high,
                        ref_log_probs=batch.get("ref_log_probs", None),
                        kl_coef=algo.kl_coef,
                        entropy=entropy,
                        entropy_coef=algo.entropy_coef,
                    )
                    loss = algos.aggregate(
                        per_token,
                        m,
                        algo.loss_agg.value,
                        num_tokens=n_tokens,
                        num_seqs=n_seqs,
                        max_len=self.cfg.generate.max_new_tokens,
                    )
                    loss.backward()
                    mb_loss += float(loss.detach())
                    if epoch == 0 and mb_index == 0:
                        stats.add_gen_train_diff(token_stats["log_ratio"], m)
                    stats.add_tokens(token_stats, m)
                self._optimizer_step(self.dist.all_sum(mb_loss)[0], stats)
        return self.dist.gather_stats(stats).summary()

    def _optimizer_step(self, loss: float, stats: UpdateStats) -> None:
        """Clip and step; a non-finite loss or gradient norm skips the step (and aborts after too many)."""
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        finite = bool(np.isfinite(loss) and torch.isfinite(norm))
        stats.add_step(loss, float(norm), skipped=not finite)
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
    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy (the accuracy reward == 1) and mean length.

        A failing accuracy reward is handled as in training (``reward.on_error``): ``zero`` counts the
        sample as wrong, ``drop`` leaves it out of the accuracy, ``fail`` stops the run.
        """
        examples = self.dist.shard(self.task.eval_examples[: self.cfg.trainer.eval_size])
        name = self.cfg.reward.accuracy
        scores, lengths = [], []
        for start in range(0, len(examples), 256):
            chunk = examples[start : start + 256]
            out = self.greedy(self._prompt_batch(chunk))
            lengths += out["tokens_response_mask"].sum(-1).tolist()
            if name is not None:
                completions = list(out["text_response"])
                scores.append(
                    self.rewards.score_one(
                        name, completions, [e.answer for e in chunk], [e.prompt for e in chunk]
                    )
                )
        values, lengths = self.dist.gather_all(torch.cat(scores) if scores else torch.zeros(0), lengths)
        out = eval_metrics(values, lengths, drop_failed=self.rewards.on_error == "drop")
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
        )

    def save_final_model(self) -> Path:
        """The trained policy in Hugging Face format: ``from_pretrained(run_dir / 'final_model')``."""
        path = self.run_dir / "final_model"
        self.dist.on_main(self.model.save_pretrained, path, safe_serialization=True)
        self.dist.on_main(self.tokenizer.save_pretrained, path)
        return path

    def cleanup(self) -> None:
        try:
            self.logger.plot()
        finally:
            self.logger.close()
            self.dist.close()
