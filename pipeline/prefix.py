"""Shared prompt prefixes: the G samples of a prompt run its tokens through the model once, not G times.

GRPO scores and trains G responses per prompt, and every one of them starts with the same prompt. The
model's work on a prompt (its key/value cache) is the same for all G rows, so it is computed once per
distinct prompt and copied to the rows that share it; the rows then run only their own tokens on top.
Gradients flow through the copies back into the one prompt pass, so training sees exactly the gradient
of the unshared forward (up to float rounding: other matrix shapes, another summation order).

- Scoring (:func:`shared_forward`): the sequence ``prompt + response`` (without its last token, which
  predicts nothing scored) is split before the prompt's last token. The prompt minus that token runs
  through the model's decoder once per distinct prompt (no LM head: nothing there is scored); the last
  prompt token and the response run per row, over the copied cache, through the whole model: one call
  whose outputs are the ``R`` positions the unshared pass keeps with ``logits_to_keep = R`` (hooks on
  the LM head see one call, as before).
- Generation (:func:`prefill`): the distinct prompts minus their last token fill a cache once, repeated
  G times per prompt; ``generate`` then starts from that cache and runs only the last prompt token.

Taken where it pays and is safe: at least one prompt repeats, prompts are at least 2 tokens wide, and
the model is a Hugging Face decoder that takes a ``DynamicCache``, not sharded by FSDP (its root
parameters are gathered only inside its own forward) and without gradient checkpointing (which turns
the cache off in training).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import DynamicCache

from pipeline import logprobs  # module import: pipeline.logprobs imports this module too


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model under DDP (``module``) and peft (``get_base_model``) wrappers."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def cache_kwarg(model: torch.nn.Module) -> str | None:
    """The name under which the model's forward takes a cache: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (earlier); None when it takes neither (a stray keyword would be ignored)."""
    params = inspect.signature(unwrapped(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def decoder_of(model: torch.nn.Module) -> tuple[torch.nn.Module, str] | None:
    """The decoder stack that fills the cache (no LM head) and the name under which the model and the
    decoder take a cache, or None when the model cannot share prefixes."""
    hf = unwrapped(model)
    if isinstance(model, FSDPModule) or isinstance(hf, FSDPModule):
        return None
    checkpointing = getattr(hf, "is_activation_checkpointing", None)  # transformers >= 5.x
    if checkpointing is None:
        checkpointing = getattr(hf, "is_gradient_checkpointing", False)
    if checkpointing or getattr(hf.config, "is_encoder_decoder", False):
        return None
    supports = getattr(hf, "_supports_default_dynamic_cache", None)
    if not callable(supports) or not supports():
        return None
    base = getattr(hf, "base_model", None)
    name = cache_kwarg(hf)
    if not isinstance(base, torch.nn.Module) or base is hf or name is None:
        return None
    return (base, name) if name in inspect.signature(base.forward).parameters else None


def fill(
    decoder: torch.nn.Module, name: str, config: Any, ids: torch.Tensor, mask: torch.Tensor
) -> DynamicCache:
    """The cache of ``ids`` (left-padded, boolean ``mask``) from one pass of ``decoder`` (a decoder stack
    or a whole model) that takes it as ``name``."""
    cache = DynamicCache(config=config)
    decoder(
        input_ids=ids,
        attention_mask=mask.long(),
        position_ids=logprobs.position_ids_from_mask(mask),
        use_cache=True,
        **{name: cache},
    )
    _check_length(cache, ids.shape[1])
    return cache


def _check_length(cache: DynamicCache, expected: int) -> None:
    if cache.get_seq_length() != expected:  # the model ignored the cache it was given
        raise RuntimeError(
            f"the shared prompt cache holds {cache.get_seq_length()} positions where {expected} were expected: "
            "this model does not fill a cache it is given; set model.share_prompt_cache=false "
            "(TransformersWrapper(share_prompt_cache=False))."
        )


def shared_forward(
    model: torch.nn.Module, inputs: dict[str, torch.Tensor], prompt_width: int, *, call: Any
) -> torch.Tensor | None:
    """``call(**inputs)`` (the model, or its hidden-state variant) for the scoring ``inputs`` (``input_ids``,
    ``attention_mask``, ``position_ids`` of left-padded prompts ``prompt_width`` wide followed by
    responses without their last token), with each distinct prompt run once: the output is that of the
    last prompt token and those response tokens, ``[B, R, ...]``, the positions that predict each
    response token.
    None when no prompt repeats or the model cannot share (the caller runs the plain pass)."""
    sharing = decoder_of(model) if prompt_width >= 2 else None
    if sharing is None:
        return None
    decoder, name = sharing
    ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
    split = prompt_width - 1
    # a prompt is its padded ids and its mask (the pad id may also be a real token, e.g. BOS)
    distinct, inverse = torch.unique(
        torch.cat([ids[:, :split], mask[:, :split]], 1), dim=0, return_inverse=True
    )
    if len(distinct) == len(ids):
        return None
    cache = fill(decoder, name, unwrapped(model).config, distinct[:, :split], distinct[:, split:].bool())
    cache.batch_select_indices(inverse)  # a differentiable gather: the prompt's gradient sums over its rows
    out = call(
        input_ids=ids[:, split:],
        attention_mask=mask,
        position_ids=positions[:, split:],
        use_cache=True,
        **{name: cache},
    )
    _check_length(cache, mask.shape[1])
    return out


def prefill(
    model: torch.nn.Module, prompts: Sequence[torch.Tensor], group: int, *, pad_token_id: int
) -> dict[str, DynamicCache]:
    """The ``generate`` keyword holding the cache of each prompt minus its last token, computed once and
    repeated ``group`` times, for ``generate`` over the prompts repeated ``group`` times each
    (left-padded alike). Empty when there is nothing to share (``group == 1``, prompts 1 token wide) or
    the model cannot share."""
    sharing = decoder_of(model) if group > 1 else None
    if sharing is None:
        return {}
    ids, mask = logprobs.pad_left(prompts, pad_token_id)
    if ids.shape[1] < 2:
        return {}
    decoder, name = sharing
    cache = fill(decoder, name, unwrapped(model).config, ids[:, :-1], mask[:, :-1])
    cache.batch_repeat_interleave(group)
    return {name: cache}
