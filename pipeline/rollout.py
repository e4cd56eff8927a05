"""The rollout engine (``rollout=hf|vllm``): the generation policy of the recipe and its weight sync.

``rollout.engine=hf`` samples with Hugging Face ``generate`` on the training model (a
``TransformersWrapper``); ``vllm`` with a :class:`pipeline.vllm_engine.VLLMWrapper` that holds its own
copy of the weights, pushed from the training model every ``rollout.sync_every`` steps by
:class:`WeightSync` (full state each time; verified once at start-up). Both return the same dense
rollout, so the recipe does not care which engine sampled; scoring, training and evaluation stay on
the Hugging Face model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from pipeline.build import build_policy
from pipeline.config import Advantage, CriticKind, RolloutEngine, TrainConfig
from pipeline.logprobs import entropy_from_logits, fit_width
from pipeline.models import resolve_path
from pipeline.vllm_args import INSTALL_HINT, vllm_available

ENGINE_FOLDER = "rollout_engine_model"  # in the run folder, when the model has no local folder


def check_rollout(cfg: TrainConfig) -> None:
    """Fail before any model is loaded: ``rollout.engine=vllm`` without vLLM, or with what it lacks."""
    if cfg.rollout.engine != RolloutEngine.vllm:
        return
    if not vllm_available():
        raise ImportError(f"rollout.engine=vllm needs the `vllm` package: install it with {INSTALL_HINT}.")
    if cfg.model.lora.enabled:
        raise ValueError("rollout.engine=vllm does not support model.lora.enabled=true yet; use rollout=hf.")
    if cfg.trainer.strategy.value != "single":
        raise ValueError("rollout.engine=vllm needs trainer.strategy=single (one engine per process).")
    if cfg.algo.advantage == Advantage.gae and cfg.algo.critic == CriticKind.shared:
        raise ValueError(
            "algo.critic=shared records values while the HF model generates: with rollout.engine=vllm "
            "use algo.critic=separate."
        )


def engine_folder(cfg: TrainConfig, model: torch.nn.Module, resume_from: Path | None, run_dir: Path) -> Path:
    """The folder the engine starts from: the checkpoint's model on resume, else the resolved
    ``model.name_or_path`` when it is a local folder, else a copy of the loaded model in the run folder
    (the weights are pushed again after start-up anyway)."""
    if resume_from is not None and (resume_from / "model" / "config.json").is_file():
        return resume_from / "model"
    path = Path(resolve_path(cfg.model.name_or_path))
    if (path / "config.json").is_file():
        return path
    out = run_dir / ENGINE_FOLDER
    model.save_pretrained(out)
    return out


def build_rollout_policy(
    cfg: TrainConfig, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, path: Path | None
) -> Any:
    """The generate-mode policy of ``cfg.rollout.engine``: ``generate.num_samples`` samples per prompt,
    behaviour log-probs at ``generate.temperature``, the outputs in a new tensordict."""
    if cfg.rollout.engine != RolloutEngine.vllm:
        return build_policy(cfg, "generate", model=model, tokenizer=tokenizer, inplace=False)
    from pipeline.vllm_engine import VLLMWrapper

    gen, chat, r = cfg.generate, cfg.chat_template, cfg.rollout
    return VLLMWrapper(
        path,
        tokenizer=tokenizer,
        generate_kwargs=gen.generation_kwargs(),
        num_samples=gen.num_samples,
        log_probs_temperature=gen.temperature,
        skip_special_tokens=True,
        chat_template_name=chat.name,
        chat_template=chat.template,
        inplace=False,
        dtype=r.dtype.value,
        enforce_eager=r.enforce_eager,
        seed=cfg.seed,
        kv_cache_gib=r.kv_cache_gib,
        gpu_memory_utilization=r.gpu_memory_utilization,
    )


class WeightSync:
    """Pushes the training model's weights into the engine every ``every`` steps; ``sync(step)`` returns
    ``rollout/sync_time`` (seconds, 0 when no push) and ``rollout/staleness`` (how many optimizer-step
    rounds the weights that sampled this step lagged the trainer's). The HF engine: nothing to do, ``{}``."""

    def __init__(self, engine: Any, model: torch.nn.Module, every: int = 1) -> None:
        self.engine, self.model, self.every = engine, model, every
        self.lag = 0

    def start(self, atol: float | None) -> dict[str, float]:
        """Push the weights once; compare the engine's log-probs with the model's (raises over ``atol``)."""
        if self.engine is None:
            return {}
        seconds = self.engine.sync_weights(self.model)
        stats = self.engine.verify_sync(self.model, atol=atol)
        print(
            f"[rollout] vLLM engine ({self.engine.dtype}) synced in {seconds:.2f} s; engine vs trainer "
            f"log-probs: max |diff| {stats['max_abs_diff']:.2e}, mean {stats['mean_abs_diff']:.2e} "
            f"over {stats['tokens']} tokens"
        )
        return stats

    def sync(self, step: int) -> dict[str, float]:
        """After the optimizer steps of training step ``step`` (1-based)."""
        if self.engine is None:
            return {}
        staleness, seconds = self.lag, 0.0
        self.lag += 1
        if step % self.every == 0:
            seconds, self.lag = self.engine.sync_weights(self.model), 0
        return {"rollout/sync_time": seconds, "rollout/staleness": float(staleness)}


def setup_rollout(recipe: Any) -> tuple[Any, WeightSync]:
    """The recipe's generation policy and its :class:`WeightSync` (started: synced and verified), from the
    recipe's ``cfg``, ``model``, ``tokenizer``, ``resume_from`` and ``run_dir``."""
    cfg, model, tokenizer = recipe.cfg, recipe.model, recipe.tokenizer
    if cfg.rollout.engine != RolloutEngine.vllm:
        return build_rollout_policy(cfg, model, tokenizer, None), WeightSync(None, model)
    path = engine_folder(cfg, model, recipe.resume_from, recipe.run_dir)
    policy = build_rollout_policy(cfg, model, tokenizer, path)
    weight_sync = WeightSync(policy, model, cfg.rollout.sync_every)
    weight_sync.start(cfg.rollout.verify_sync_atol)
    return policy, weight_sync


def tensors_only(td: Any) -> Any:
    """``td`` without its text entries (``text``, ``text_response``, ...), sharing its tensors. Indexing a
    rollout of 64 texts costs 1.5 ms against 0.03 ms for its tensors, and only rewards and logging read
    the texts; scoring and the update index micro-batches of this instead."""
    texts = [k for k in td.keys() if not isinstance(td.get(k), torch.Tensor)]
    return td.exclude(*texts) if texts else td


def detached_copy(td: Any, device: torch.device | str) -> Any:
    """A copy of the rollout that autograd can use, on ``device``: its tensors cloned (tensors made under
    ``inference_mode`` cannot take part in autograd), its texts shared as they are: not copied, nor
    moved to ``device`` string by string (2 ms for 128 texts), since a text has no device."""
    out = tensors_only(td).clone().to(device)
    for key in td.keys():
        if key not in out.keys():  # tensordict's own setter without its per-element device check
            out._set_str(key, td.get(key), inplace=False, validated=True)
    return out


def add_train_log_probs(recipe: Any, rollout: Any) -> None:
    """``rollout["train_log_probs"]``: the trainer's log-probs of the rollout's tokens under the current
    weights, no gradient. TIS's ``train_lp`` when an update makes more than one optimizer step (later
    passes see other weights); with one step the first pass gives them (nothing done here)."""
    if not recipe.algorithm.tis_pass:
        return
    micro, tensors = recipe.sizes["micro_batch"], tensors_only(rollout)
    with torch.no_grad():
        parts = [
            scored_log_probs(recipe.scorer, tensors[i])[0] for i in torch.arange(len(rollout)).split(micro)
        ]
    rollout["train_log_probs"] = torch.cat(parts).to(rollout["log_probs"].dtype)


def scored_log_probs(scorer: Any, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scorer's log-probs of the batch's responses, padded like ``batch["log_probs"]`` (and the
    per-token entropy when the scorer returns logits)."""
    width = batch["log_probs"].shape[1]
    out = scorer(batch.select("tokens", "attention_mask", "tokens_response", "tokens_response_mask"))
    lp = fit_width(out["log_probs"], width)
    if not scorer.return_logits:
        return lp, None
    return lp, fit_width(entropy_from_logits(out["logits"] / scorer.log_probs_temperature), width)
