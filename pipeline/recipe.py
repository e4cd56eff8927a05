"""The GRPO recipe: collect -> score -> update -> log -> save, around one TransformersWrapper.

``GRPORecipe(cfg, run_dir)`` fails fast on bad options; ``setup()`` loads everything (or restores
a checkpoint); ``train()`` runs the loop and returns the final held-out accuracy (the sweep
objective); ``cleanup()`` closes the loggers. The math lives in :mod:`pipeline.algos`.
"""

from __future__ import annotations

import inspect
import os
import random
import signal
import subprocess
import threading
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict, lazy_stack
from torchrl.data.llm import History
from transformers import get_scheduler
from transformers.utils import logging as hf_logging

from pipeline import algos, checkpoint
from pipeline.config import TrainConfig, derived_sizes, instantiate_node
from pipeline.loggers import RunLogger
from pipeline.logprobs import pad_right
from pipeline.models import (
    check_model_source,
    check_prompts_fit,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from pipeline.policy import TransformersWrapper
from pipeline.rewards import RewardSet


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. repeated non-finite losses); the message says why."""


class GRPORecipe:
    def __init__(self, cfg: TrainConfig, run_dir: Path, *, group: str | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.group = group
        self.sizes = derived_sizes(cfg)
        self.resume_from = self._resume_path()
        # Data and reward errors surface before any model is loaded.
        self.task = instantiate_node(cfg.task, "task")
        self.rewards = RewardSet(
            {name: self._reward_fn(name, node) for name, node in cfg.reward.functions.items()},
            on_error=cfg.reward.on_error.value,
        )
        self.step = 0
        self.nonfinite_in_row = 0
        self.last_accuracy = float("nan")
        self.logger: RunLogger | None = None

    # ------------------------------------------------------------------ setup
    def _resume_path(self) -> Path | None:
        resume = self.cfg.trainer.resume
        if resume is None:
            return None
        if resume == "auto":
            checkpoint.clean_partial(self.ckpt_dir)
            found = checkpoint.list_checkpoints(self.ckpt_dir)
            return found[-1] if found else None
        return checkpoint.check_checkpoint(Path(resume))

    @staticmethod
    def _reward_fn(name: str, node: dict[str, Any]) -> tuple[Any, float]:
        params = {k: v for k, v in node.items() if k != "weight"}
        try:
            fn = instantiate_node({**params, "_partial_": True}, f"reward.functions.{name}")
            inspect.signature(fn.func).bind(["completion"], ["answer"], ["prompt"], **fn.keywords)
        except Exception as err:
            raise ValueError(
                f"reward.functions.{name}: cannot use {node.get('_target_')!r} with parameters "
                f"{sorted(k for k in params if k != '_target_')} as fn(completions, answers, prompts, **params): {err}"
            ) from err
        return fn, float(node.get("weight", 1.0))

    def setup(self) -> None:
        cfg = self.cfg
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        seed_everything(cfg.seed, cfg.trainer.deterministic, cfg.trainer.threads)
        self.device = resolve_device(cfg.model.device)
        self.dtype = resolve_dtype(cfg.model.dtype, self.device)
        model_path, model_config = check_model_source(cfg.model)
        self.tokenizer = load_tokenizer(cfg.tokenizer, model_path)
        prompts = [e.prompt for e in self.task.train_examples + self.task.eval_examples]
        check_prompts_fit(prompts, self.tokenizer, model_config, cfg.generate.max_new_tokens)
        chat = cfg.chat_template
        if chat.use_chat and chat.name is None and chat.template is None and not self.tokenizer.chat_template:
            raise ValueError(
                "chat_template=tokenizer but the tokenizer has no chat template: choose chat_template=chatml, "
                "qwen or custom, or chat_template=none for plain-text prompts."
            )
        weights = str(self.resume_from / "model") if self.resume_from else model_path
        self.model = load_model(
            cfg.model, weights, self.device, self.dtype, model_config
        ).eval()  # eval: no dropout noise
        if cfg.model.gradient_checkpointing:
            self.model.config.use_cache = False
        t = cfg.generate.temperature
        chat = cfg.chat_template
        self.policy = TransformersWrapper(
            self.model, tokenizer=self.tokenizer, return_log_probs=True, num_samples=cfg.generate.num_samples,
            generate_kwargs=cfg.generate.generation_kwargs(), log_probs_temperature=t,
            chat_template_name=chat.name, chat_template=chat.template,
        )  # fmt: skip
        self.greedy = TransformersWrapper(
            self.model, tokenizer=self.tokenizer, chat_template_name=chat.name, chat_template=chat.template,
            generate_kwargs={"max_new_tokens": cfg.generate.max_new_tokens, "do_sample": False},
        )  # fmt: skip
        self.scorer = TransformersWrapper(
            self.model, tokenizer=self.tokenizer, from_text=False, generate=False, log_probs_temperature=t,
            return_logits=cfg.algo.entropy_coef > 0,
        )  # fmt: skip
        self.ref_scorer = None
        if cfg.algo.kl_coef > 0:
            ref = load_model(cfg.model, model_path, self.device, self.dtype, model_config)
            ref = ref.eval().requires_grad_(False)
            self.ref_scorer = TransformersWrapper(
                ref, tokenizer=self.tokenizer, from_text=False, generate=False, log_probs_temperature=t
            )
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(
            params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
            fused=o.fused and self.device.type in ("cpu", "cuda"),
        )  # fmt: skip
        self.scheduler = get_scheduler(o.scheduler, self.optimizer, num_warmup_steps=o.warmup_steps,
                                       num_training_steps=cfg.trainer.steps)  # fmt: skip
        wandb_id = None
        if self.resume_from is not None:
            state, optim_state, sched_state, rng = checkpoint.load_training_state(self.resume_from)
            self.optimizer.load_state_dict(optim_state)
            self.scheduler.load_state_dict(sched_state)
            self.task.load_state_dict(state["task"])
            checkpoint.set_rng_state(rng, state["rng"])
            self.step = state["step"]
            self.nonfinite_in_row = state.get("nonfinite_in_row", 0)
            wandb_id = state.get("wandb_id")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_run_info(self.run_dir, self.cfg)
        self.logger = RunLogger(
            cfg.logger, self.run_dir, config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True),
            run_name=cfg.name or self.run_dir.name, group=self.group, total_steps=cfg.trainer.steps,
            start_step=self.step, wandb_id=wandb_id,
        )  # fmt: skip
        s = self.sizes
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
        cfg, tr = self.cfg, self.cfg.trainer
        if self.step == 0 and tr.eval_every:
            self.logger.log(0, self.evaluate())
        with StopRequest() as stop:
            while self.step < tr.steps:
                step = self.step + 1
                t0 = time.perf_counter()
                # 1. collect: G samples per prompt, with behaviour log-probs
                examples = self.task.sample(tr.prompts_per_step)
                with torch.inference_mode():
                    rollout = self.policy(self._prompt_batch(examples)).reshape(-1)
                t_collect = time.perf_counter() - t0
                # 2. score: rewards -> group-relative advantages
                batch = self._to_tensors(rollout)
                answers = [e.answer for e in examples for _ in range(cfg.generate.num_samples)]
                rewards = self.rewards(batch["completions"], answers, rollout.get("text").tolist())
                advantages, zero_var = self._advantages(rewards.total)
                # 3. reference log-probs, once per batch
                ref_lp = self._reference_log_probs(rollout, batch) if self.ref_scorer else None
                # 4. update: ppo_epochs x minibatches, micro-batches accumulated
                t1 = time.perf_counter()
                update = self._update(rollout, batch, advantages, rewards.valid, ref_lp)
                self.scheduler.step()
                t_update = time.perf_counter() - t1
                self.step = step
                # 5. log, evaluate, save
                metrics = {
                    **reward_metrics(rewards, self.cfg.reward.accuracy, zero_var),
                    **rollout_metrics(batch, cfg.generate.max_new_tokens),
                    **update,
                    "loss/lr": self.scheduler.get_last_lr()[0],
                    **perf_metrics(batch, t_collect, t_update, time.perf_counter() - t0, self.device),
                }
                if tr.eval_every and (step % tr.eval_every == 0 or step == tr.steps):
                    metrics.update(self.evaluate())
                if step % tr.log_every == 0 or step == tr.steps or "eval/accuracy" in metrics:
                    self.logger.log(step, metrics, {"logprobs/hist": batch["old_lp"][batch["mask"]]})
                if tr.completions_every and step % tr.completions_every == 0:
                    self.logger.log_completions(step, completion_rows(rollout, batch, answers, rewards.total))
                if stop.requested:
                    self.save_checkpoint()
                    raise KeyboardInterrupt(
                        f"stopped by {stop.requested} after step {step}; checkpoint saved"
                    )
                if tr.save_every and step % tr.save_every == 0 and step < tr.steps:
                    self.save_checkpoint()
        self.save_checkpoint()
        self.save_final_model()
        final = self.evaluate() if not tr.eval_every else {}
        if final:
            self.logger.log(self.step, final)
        return self.last_accuracy

    def _prompt_batch(self, examples) -> TensorDict:
        prompts = [e.prompt for e in examples]
        chat = self.cfg.chat_template
        if not chat.use_chat:
            return TensorDict(text=prompts, batch_size=[len(prompts)])
        system = [{"role": "system", "content": chat.system_prompt}] if chat.system_prompt else []
        history = History.from_chats([[*system, {"role": "user", "content": p}] for p in prompts])
        return TensorDict(history=history, batch_size=[len(prompts)])

    def _to_tensors(self, rollout) -> dict[str, Any]:
        responses = rollout.get("tokens_response", as_list=True)
        eos = self.policy.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        ended = torch.tensor([len(r) > 0 and int(r[-1]) in eos for r in responses])
        bodies = [r[:-1] if e else r for r, e in zip(responses, ended.tolist())]
        old_lp, mask = pad_right(rollout.get("log_probs", as_list=True), 0.0)
        return {
            "completions": self.tokenizer.batch_decode(bodies, skip_special_tokens=True),
            "old_lp": old_lp,
            "mask": mask,
            "lengths": mask.sum(-1),
            "ended": ended,
        }

    def _advantages(self, rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, algo = self.cfg.generate.num_samples, self.cfg.algo
        if algo.advantage.value == "rloo":
            return algos.rloo_advantages(rewards, g)
        return algos.group_advantages(rewards, g, std_normalize=algo.std_normalize, eps=algo.adv_eps)

    def _score(self, scorer: TransformersWrapper, rollout, idx: torch.Tensor, width: int):
        out = scorer(lazy_stack([rollout[i].select("tokens", "tokens_response") for i in idx.tolist()]))
        lp, _ = pad_right(out.get("log_probs", as_list=True), 0.0)
        lp = _fit(lp, width)
        entropy = None
        if scorer.return_logits:
            t = scorer.log_probs_temperature
            ents = [_entropy(lg / t) for lg in out.get("logits", as_list=True)]
            entropy = _fit(pad_right(ents, 0.0)[0], width)
        return lp, entropy

    @torch.inference_mode()
    def _reference_log_probs(self, rollout, batch) -> torch.Tensor:
        width = batch["mask"].shape[1]
        parts = [self._score(self.ref_scorer, rollout, idx, width)[0]
                 for idx in torch.arange(len(rollout)).split(self.sizes["micro_batch"])]  # fmt: skip
        return torch.cat(parts).to(batch["old_lp"].dtype)

    def _update(self, rollout, batch, advantages, valid, ref_lp) -> dict[str, float]:
        algo, width = self.cfg.algo, batch["mask"].shape[1]
        mask = batch["mask"] & valid.unsqueeze(-1)
        adv = advantages.to(batch["old_lp"].dtype)
        stats: dict[str, list[torch.Tensor]] = {k: [] for k in ("pg", "kl", "ent", "clip", "ratio", "lr_")}
        diffs, grad_norms, losses, skipped = [], [], [], 0
        for epoch in range(algo.ppo_epochs):
            perm = torch.randperm(len(rollout))
            for mb_index, mb in enumerate(perm.split(self.sizes["minibatch"])):
                n_tokens = float(mask[mb].sum())
                n_seqs = float(valid[mb].sum())
                self.optimizer.zero_grad(set_to_none=True)
                mb_loss = 0.0
                for micro in mb.split(self.sizes["micro_batch"]):
                    lp, ent = self._score(self.scorer, rollout, micro, width)
                    m, old = mask[micro], batch["old_lp"][micro]
                    if epoch == 0 and mb_index == 0:
                        diffs.append((lp.detach() - old).abs()[m])
                    pg, ratio, clipped = algos.clipped_surrogate(
                        lp, old, adv[micro], algo.clip_eps_low, algo.clip_eps_high
                    )
                    per_token = pg
                    if ref_lp is not None:
                        kl = algos.k3_kl(lp, ref_lp[micro])
                        per_token = per_token + algo.kl_coef * kl
                        stats["kl"].append(kl.detach()[m])
                    if ent is not None:
                        per_token = per_token - algo.entropy_coef * ent
                        stats["ent"].append(ent.detach()[m])
                    loss = algos.aggregate(per_token, m, algo.loss_agg.value, num_tokens=n_tokens,
                                           num_seqs=n_seqs, max_len=self.cfg.generate.max_new_tokens)  # fmt: skip
                    loss.backward()
                    mb_loss += float(loss.detach())
                    stats["pg"].append(pg.detach()[m])
                    stats["clip"].append(clipped[m].float())
                    stats["ratio"].append(ratio.detach()[m])
                    stats["lr_"].append((lp.detach() - old)[m])
                norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
                losses.append(mb_loss)
                grad_norms.append(float(norm))
                if not (np.isfinite(mb_loss) and torch.isfinite(norm)):
                    skipped += 1
                    self.nonfinite_in_row += 1
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.nonfinite_in_row >= self.cfg.trainer.max_nonfinite:
                        raise TrainingError(
                            f"{self.nonfinite_in_row} non-finite losses/gradient norms in a row (loss {mb_loss}, "
                            f"grad norm {float(norm)}) at step {self.step + 1}; lower optim.lr or check the rewards "
                            f"(limit: trainer.max_nonfinite={self.cfg.trainer.max_nonfinite})."
                        )
                    continue
                self.nonfinite_in_row = 0
                self.optimizer.step()
        cat = {k: torch.cat(v) if v else torch.zeros(0) for k, v in stats.items()}
        diff = torch.cat(diffs) if diffs else torch.zeros(0)
        out = {
            "loss/total": float(np.mean(losses)),
            "loss/pg": _mean(cat["pg"]),
            "loss/clip_frac": _mean(cat["clip"]),
            "loss/grad_norm": float(np.mean(grad_norms)),
            "loss/nonfinite_skipped": skipped,
            "loss/entropy": _mean(cat["ent"])
            if cat["ent"].numel()
            else -_mean(batch["old_lp"][batch["mask"]]),
            "logprobs/gen_train_absdiff_mean": _mean(diff),
            "logprobs/gen_train_absdiff_max": float(diff.max()) if diff.numel() else 0.0,
            "logprobs/ratio_mean": _mean(cat["ratio"]),
            "logprobs/ratio_min": float(cat["ratio"].min()) if cat["ratio"].numel() else 1.0,
            "logprobs/ratio_max": float(cat["ratio"].max()) if cat["ratio"].numel() else 1.0,
            "logprobs/ess": float(
                algos.effective_sample_size(cat["lr_"], torch.ones_like(cat["lr_"], dtype=torch.bool))
            ),
        }
        if cat["kl"].numel():
            out["kl/ref_mean"] = _mean(cat["kl"])
            out["kl/ref_max"] = float(cat["kl"].max())
        return out

    # ------------------------------------------------------------------ eval / save
    @torch.inference_mode()
    def evaluate(self) -> dict[str, float]:
        """Greedy held-out accuracy (the accuracy reward == 1) and mean length."""
        examples = self.task.eval_examples[: self.cfg.trainer.eval_size]
        correct, lengths = [], []
        for start in range(0, len(examples), 256):
            chunk = examples[start : start + 256]
            out = self.greedy(self._prompt_batch(chunk))
            batch = self._to_tensors_greedy(out)
            lengths += batch["lengths"]
            name = self.cfg.reward.accuracy
            if name is not None:
                fn, _ = self.rewards.functions[name]
                correct += [
                    v == 1.0
                    for v in fn(batch["completions"], [e.answer for e in chunk], [e.prompt for e in chunk])
                ]
        self.last_accuracy = float(np.mean(correct)) if correct else float("nan")
        return {"eval/accuracy": self.last_accuracy, "eval/len_mean": float(np.mean(lengths))}

    def _to_tensors_greedy(self, out) -> dict[str, Any]:
        responses = out.get("tokens_response", as_list=True)
        eos = self.greedy.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        bodies = [r[:-1] if len(r) and int(r[-1]) in eos else r for r in responses]
        return {"completions": self.tokenizer.batch_decode(bodies, skip_special_tokens=True),
                "lengths": [len(r) for r in responses]}  # fmt: skip

    def save_checkpoint(self) -> Path:
        state = {
            "task": self.task.state_dict(),
            "nonfinite_in_row": self.nonfinite_in_row,
            "wandb_id": self.logger.wandb_id if self.logger else None,
            "seed": self.cfg.seed,
        }
        return checkpoint.save_checkpoint(
            self.ckpt_dir, self.step, model=self.model, tokenizer=self.tokenizer, optimizer=self.optimizer,
            scheduler=self.scheduler, state=state, config_yaml=OmegaConf.to_yaml(OmegaConf.structured(self.cfg)),
            keep_last=self.cfg.trainer.keep_last,
        )  # fmt: skip

    def save_final_model(self) -> Path:
        """The trained policy in Hugging Face format: ``from_pretrained(run_dir / 'final_model')``."""
        path = self.run_dir / "final_model"
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        return path

    def cleanup(self) -> None:
        if self.logger is not None:
            try:
                self.logger.plot()
            finally:
                self.logger.close()


# ---------------------------------------------------------------------- metrics (pure)
def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else 0.0


def _fit(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits.float(), -1)
    return -(logp.exp() * logp).sum(-1)


def reward_metrics(rewards, accuracy: str | None, zero_var: torch.Tensor) -> dict[str, float]:
    out = {
        "reward/total_mean": _mean(rewards.total),
        "reward/total_std": float(rewards.total.std()) if rewards.total.numel() > 1 else 0.0,
        "reward/total_max": float(rewards.total.max()),
        "reward/zero_var_groups": _mean(zero_var),
        "reward/dropped": int((~rewards.valid).sum()),
    }
    for name, values in rewards.per_function.items():
        ok = values[torch.isfinite(values)]
        out[f"reward/{name}_mean"] = _mean(ok)
        out[f"reward/{name}_std"] = float(ok.std()) if ok.numel() > 1 else 0.0
        out[f"reward/{name}_max"] = float(ok.max()) if ok.numel() else 0.0
        out[f"reward/{name}_failures"] = rewards.failures[name]
    if accuracy is not None:
        out["reward/accuracy"] = _mean(rewards.per_function[accuracy] == 1.0)
    return out


def rollout_metrics(batch: dict[str, Any], max_new_tokens: int) -> dict[str, float]:
    lp, mask, lengths = batch["old_lp"], batch["mask"], batch["lengths"].float()
    sampled = lp[mask]
    return {
        "logprobs/mean": _mean(sampled),
        "logprobs/std": float(sampled.std()) if sampled.numel() > 1 else 0.0,
        "logprobs/min": float(sampled.min()) if sampled.numel() else 0.0,
        "completions/len_mean": _mean(lengths),
        "completions/len_min": float(lengths.min()),
        "completions/len_max": float(lengths.max()),
        "completions/eos_rate": _mean(batch["ended"]),
        "completions/truncation_rate": _mean(~batch["ended"] & (batch["lengths"] >= max_new_tokens)),
    }


def perf_metrics(
    batch, t_collect: float, t_update: float, t_step: float, device: torch.device
) -> dict[str, float]:
    tokens = float(batch["lengths"].sum())
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "perf/step_time": t_step,
        "perf/collect_time": t_collect,
        "perf/update_time": t_update,
        "perf/gen_tokens_per_s": tokens / max(t_collect, 1e-9),
        "perf/tokens_per_s": tokens / max(t_step, 1e-9),
        "perf/peak_mem_mb": peak,
    }


def completion_rows(rollout, batch, answers, rewards, limit: int = 16) -> list[dict[str, Any]]:
    prompts = rollout.get("text").tolist()
    return [
        {
            "prompt": prompts[i],
            "completion": batch["completions"][i],
            "answer": answers[i],
            "reward": float(rewards[i]),
        }
        for i in range(min(limit, len(prompts)))
    ]


# ---------------------------------------------------------------------- run-level helpers
def seed_everything(seed: int, deterministic: bool = True, threads: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def write_run_info(run_dir: Path, cfg: TrainConfig) -> None:
    """The reproducibility bundle: resolved config, git commit, seed, library versions."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False,
                                cwd=Path(__file__).parent).stdout.strip() or None  # fmt: skip
    except OSError:
        commit = None
    versions = {}
    for pkg in ("torch", "transformers", "tensordict", "torchrl", "hydra-core", "omegaconf", "wandb"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info = {"git_commit": commit, "seed": cfg.seed, "versions": versions}
    (run_dir / "run_info.yaml").write_text(
        OmegaConf.to_yaml(
            OmegaConf.create({**info, "config": OmegaConf.to_container(OmegaConf.structured(cfg))})
        )
    )


class StopRequest:
    """Ctrl-C / SIGTERM during training: finish the current step, save a checkpoint, then stop.

    A step is the unit of consistent state (weights, optimizer, sampler, RNG), so the first signal
    only sets ``requested``; a second one interrupts immediately.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        self.requested = name
        print(
            f"\n[{name}] finishing the current step, then saving a checkpoint (send it again to stop now)",
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
