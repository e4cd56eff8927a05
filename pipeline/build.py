"""Build the configured model, tokenizer and TransformersWrapper from the Hydra config groups.

One way to turn ``model``, ``tokenizer``, ``chat_template`` and ``generate`` into a ready policy,
used by the training recipe and by user code alike::

    from hydra import compose, initialize_config_dir
    from pipeline.build import build_policy
    with initialize_config_dir(config_dir="/path/to/conf", version_base="1.3"):
        cfg = compose("train", overrides=["generate.temperature=0.7"])
    policy = build_policy(cfg, mode="generate")
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline import lora
from pipeline.config import TrainConfig, validate
from pipeline.models import (
    check_model_source,
    check_prompts_fit,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
)
from pipeline.policy import TransformersWrapper

MODES = ("generate", "greedy", "score")


def as_train_config(cfg: TrainConfig | DictConfig | dict) -> TrainConfig:
    """A validated, typed config from a composed ``DictConfig`` (or a plain dict); typed configs pass through."""
    return cfg if isinstance(cfg, TrainConfig) else validate(cfg)


def load_model_and_tokenizer(
    cfg: TrainConfig | DictConfig, *, weights: str | None = None, prompts: list[str] | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The configured model (in eval mode, on the configured device and dtype) and its tokenizer.

    Everything that can be checked without the weights is checked first: the model source, the
    tokenizer, the chat template, and that ``prompts`` plus ``generate.max_new_tokens`` fit the
    context. ``weights`` loads the weights from another folder (a checkpoint's ``model/``; LoRA
    adapters there go on the base model of ``model.name_or_path``).
    """
    cfg = as_train_config(cfg)
    device = resolve_device(cfg.model.device)
    path, config = check_model_source(cfg.model)
    tokenizer = load_tokenizer(cfg.tokenizer, path)
    if prompts:
        check_prompts_fit(prompts, tokenizer, config, cfg.generate.max_new_tokens)
    check_chat_template(cfg, tokenizer)
    adapter = weights if lora.is_adapter_folder(weights) else None  # a LoRA checkpoint: base + adapters
    dtype = resolve_dtype(cfg.model.dtype, device)
    model = load_model(cfg.model, (None if adapter else weights) or path, device, dtype, config)
    model = lora.attach(model, cfg.model.lora, adapter)  # model.lora.enabled: only the adapters train
    return model.eval(), tokenizer  # eval: no dropout noise in rollouts or updates


def check_chat_template(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """``chat_template=tokenizer`` needs a tokenizer that has one (checked before loading weights)."""
    chat = cfg.chat_template
    if chat.use_chat and chat.name is None and chat.template is None and not tokenizer.chat_template:
        raise ValueError(
            "chat_template=tokenizer but the tokenizer has no chat template: choose chat_template=chatml, "
            "qwen or custom, or chat_template=none for plain-text prompts."
        )


def build_policy(
    cfg: TrainConfig | DictConfig,
    mode: str = "generate",
    *,
    model: torch.nn.Module | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **overrides: Any,
) -> TransformersWrapper:
    """A ``TransformersWrapper`` configured from ``cfg``'s model, tokenizer, chat_template and generate groups.

    Modes:
      - ``generate``: ``generate.num_samples`` samples per prompt with the ``generate`` sampling
        arguments; behaviour log-probs at ``generate.temperature``; ``text_response`` without special
        tokens (the completion text that rewards read).
      - ``greedy``: one greedy response per prompt, up to ``generate.max_new_tokens`` (evaluation).
      - ``score``: log-probs at ``generate.temperature`` of given ``tokens_response`` after ``tokens``.

    ``model``/``tokenizer`` reuse objects already loaded (wrappers of one recipe share one model);
    otherwise they are loaded from ``cfg``. ``overrides`` are passed to the wrapper as is.
    """
    if mode not in MODES:
        raise ValueError(f"build_policy mode must be one of {MODES}, got {mode!r}.")
    cfg = as_train_config(cfg)
    if model is None or tokenizer is None:
        loaded, loaded_tok = load_model_and_tokenizer(cfg)
        model, tokenizer = model or loaded, tokenizer or loaded_tok
    gen, chat = cfg.generate, cfg.chat_template
    chat_args = {"chat_template_name": chat.name, "chat_template": chat.template}
    if mode == "generate":
        kwargs = {
            "return_log_probs": True,
            "num_samples": gen.num_samples,
            "generate_kwargs": gen.generation_kwargs(),
            "log_probs_temperature": gen.temperature,
            "skip_special_tokens": True,
            "sampler": gen.sampler,
            "compile_decode": gen.compile,
            **chat_args,
        }
    elif mode == "greedy":
        kwargs = {
            "generate_kwargs": {"max_new_tokens": gen.max_new_tokens, "do_sample": False},
            "skip_special_tokens": True,
            "compile_decode": gen.compile,
            **chat_args,
        }
    else:
        kwargs = {"from_text": False, "generate": False, "log_probs_temperature": gen.temperature}
    if mode != "score" and cfg.trainer.strategy.value == "fsdp" and torch.distributed.is_initialized():
        # sharded weights: each forward is a collective, so ranks done early keep stepping with the rest
        kwargs["generate_kwargs"] = {**kwargs["generate_kwargs"], "synced_gpus": True}
    if cfg.model.autocast:
        kwargs["autocast_dtype"] = getattr(torch, cfg.model.autocast)
    kwargs["share_prompt_cache"] = cfg.model.share_prompt_cache
    return TransformersWrapper(model, tokenizer=tokenizer, **{**kwargs, **overrides})
