"""Argument checks, tokenizer/model look-ups and input parsing of the TransformersWrapper
(pipeline/policy.py). The output containers and layouts are in pipeline/policy_layout.py.

Pure functions and tables: each check raises a ``ValueError``/``TypeError`` that names the argument.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDictBase
from transformers import GenerationConfig, PreTrainedTokenizerBase

from pipeline import chat

# generate() arguments that are not GenerationConfig fields; passed through to generate().
GENERATE_EXTRAS = {
    "logits_processor",
    "stopping_criteria",
    "prefix_allowed_tokens_fn",
    "streamer",
    "synced_gpus",
}
# GenerationConfig fields the wrapper controls itself, with the reason given to the user.
MANAGED = {
    "return_dict_in_generate": "the wrapper always reads generate()'s dict output",
    "output_logits": "pass return_logits=True to the wrapper",
    "output_scores": "log-probs are returned as 'log_probs'",
    "num_return_sequences": "pass num_samples=G to the wrapper (or to forward)",
    "stop_strings": "responses end at EOS ids only; add the stop token to eos_token_id",
    "tokenizer": "the wrapper's tokenizer is used",
}
# tokenizer_kwargs the wrapper controls itself, with the only values compatible with it.
TOKENIZER_FIXED = {"padding": (True, "longest"), "padding_side": ("left",), "return_tensors": ("pt",),
                   "return_attention_mask": (True,)}  # fmt: skip
TOKENIZER_FREE = {"add_special_tokens", "truncation", "max_length"}


def check_wrapper_args(
    model: Any,
    *,
    return_log_probs: Any,
    tokenizer: Any,
    from_text: Any,
    generate: Any,
    pad_output: Any,
    inplace: Any,
    chat_template_name: Any,
    chat_template: Any,
    num_samples: Any,
    log_probs_temperature: Any,
    return_logits: Any,
    skip_special_tokens: Any,
) -> int | None:
    """Validates the TransformersWrapper constructor arguments; returns the checked ``num_samples``."""
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "generate", None)):
        raise TypeError(
            f"model must be a transformers causal LM (a torch.nn.Module with generate()), got {type(model).__name__}."
        )
    flags = {"from_text": from_text, "generate": generate, "pad_output": pad_output,
             "return_logits": return_logits, "skip_special_tokens": skip_special_tokens}  # fmt: skip
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}.")
    if return_log_probs is not None and not isinstance(return_log_probs, bool):
        raise TypeError(f"return_log_probs must be a bool or None, got {return_log_probs!r}.")
    if not pad_output:
        raise ValueError(
            "pad_output=False is not supported: transformers models run on padded batches. Outputs are "
            "padded tensors with masks in a dense input, per-sample entries in a lazy stack."
        )
    if inplace not in (True, False, "empty"):
        raise ValueError(f"inplace must be True, False or 'empty', got {inplace!r}.")
    if not generate and return_log_probs is False:
        raise ValueError("return_log_probs=False with generate=False: scoring only returns log-probs.")
    if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    if from_text and tokenizer is None:
        raise ValueError("tokenizer is required when from_text=True (text and history input).")
    chat.check_template_args(chat_template_name, chat_template)
    num_samples = check_num_samples(num_samples, generate)
    if (
        isinstance(log_probs_temperature, bool)
        or not isinstance(log_probs_temperature, (int, float))
        or not log_probs_temperature > 0
    ):
        raise ValueError(f"log_probs_temperature must be a positive number, got {log_probs_temperature!r}.")

    return num_samples


def check_num_samples(num_samples: Any, generate: bool) -> int | None:
    if num_samples is None:
        return None
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}.")
    if not generate:
        raise ValueError("num_samples only applies when generate=True.")
    return num_samples


def base_generation_config(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase | None,
    pad_token_id: int,
    generate_kwargs: dict[str, Any] | None,
    *,
    generate: bool,
    log_probs: bool,
    return_logits: bool,
) -> tuple[GenerationConfig, dict[str, Any]]:
    """The wrapper's ``GenerationConfig`` (model defaults + ``generate_kwargs``) and generate() extras."""
    if generate_kwargs is not None and not isinstance(generate_kwargs, dict):
        raise TypeError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}.")
    base = getattr(model, "generation_config", None)
    cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
    cfg.pad_token_id = pad_token_id
    if cfg.eos_token_id is None and tokenizer is not None:
        cfg.eos_token_id = tokenizer.eos_token_id
    kwargs = dict(generate_kwargs or {})
    extras = {k: kwargs.pop(k) for k in list(kwargs) if k in GENERATE_EXTRAS}
    if extras and not generate:
        raise ValueError(f"generate_kwargs {sorted(extras)} only apply when generate=True.")
    cfg = updated_generation_config(cfg, kwargs, "generate_kwargs", log_probs)
    cfg.return_dict_in_generate = True
    cfg.output_logits = return_logits
    return cfg, extras


def updated_generation_config(
    cfg: GenerationConfig, kwargs: dict[str, Any], where: str, log_probs: bool
) -> GenerationConfig:
    """A copy of ``cfg`` with ``kwargs`` applied, validated (errors name ``where``)."""
    for key, why in MANAGED.items():
        if key in kwargs:
            raise ValueError(f"{_field(where, key)} is managed by the wrapper: {why}.")
    _check_fields(kwargs, where)
    cfg = copy.deepcopy(cfg)
    unknown = cfg.update(**kwargs)
    if unknown:
        raise ValueError(
            f"{where.rstrip('.')} has keys that are not transformers.GenerationConfig fields: {sorted(unknown)}."
        )
    check_generation_config(cfg, where)
    if log_probs and (cfg.num_beams or 1) > 1:
        raise ValueError(f"{where}: num_beams > 1 is not supported with log-probs (sampled tokens only).")
    return cfg


def _field(where: str, key: str) -> str:
    """How an error names a field: ``generate_kwargs['top_p']`` for the wrapper's arguments,
    ``generate.top_p`` for a config group (``where`` ending with a dot)."""
    return f"{where}{key}" if where.endswith(".") else f"{where}[{key!r}]"


def _check_fields(values: dict[str, Any], where: str) -> None:
    checks = {
        "max_new_tokens": (lambda v: isinstance(v, int) and v > 0, "a positive int"),
        "min_new_tokens": (lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
        "temperature": (lambda v: isinstance(v, (int, float)) and v > 0, "a positive number"),
        "top_p": (lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
        "num_beams": (lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
        "repetition_penalty": (lambda v: isinstance(v, (int, float)) and v > 0, "a positive number"),
    }
    for key, (ok, expected) in checks.items():
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not ok(value)):
            raise ValueError(f"{_field(where, key)} must be {expected}, got {value!r}.")


def check_generation_config(cfg: GenerationConfig, where: str) -> None:
    """The one home of the sampling-argument checks: the wrapper's ``generate_kwargs``, its runtime
    overrides and the ``generate`` config group all go through here."""
    _check_fields({k: getattr(cfg, k, None) for k in cfg.to_dict()}, where)
    try:
        cfg.validate(strict=True)
    except TypeError:  # older transformers: no `strict`
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{where.rstrip('.')}: invalid generation arguments: {err}") from err


def check_tokenizer_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"tokenizer_kwargs must be a dict, got {type(kwargs).__name__}.")
    out = {}
    for key, value in kwargs.items():
        if key in TOKENIZER_FIXED:
            if value not in TOKENIZER_FIXED[key]:
                raise ValueError(
                    f"tokenizer_kwargs[{key!r}] must be {TOKENIZER_FIXED[key][0]!r} (the wrapper pads itself), got {value!r}."
                )
        elif key in TOKENIZER_FREE:
            out[key] = value
        else:
            raise ValueError(
                f"tokenizer_kwargs[{key!r}] is not supported; allowed keys: {sorted(TOKENIZER_FREE)}."
            )
    return out


def with_pad_token(tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase | None:
    """The tokenizer itself if it has a pad token, else a copy that pads with EOS."""
    if tokenizer is None or tokenizer.pad_token_id is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ValueError(
            "tokenizer has neither a pad_token nor an eos_token to pad with; set tokenizer.pad_token."
        )
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_token_id(tokenizer: PreTrainedTokenizerBase | None, model: torch.nn.Module) -> int:
    if tokenizer is not None:
        return int(tokenizer.pad_token_id)
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0  # any id works: padding is always masked out


def bos_token_id(tokenizer: PreTrainedTokenizerBase | None, model: torch.nn.Module) -> int | None:
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    return int(bos) if isinstance(bos, int) else None


def vocab_size(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return len(tokenizer) if tokenizer is not None else int(model.config.vocab_size)


def checked_token_ids(
    seqs: Any, masks: Any, key: str, mask_key: str | None, vocab: int
) -> list[torch.Tensor]:
    """1-D integer id tensors, each restricted to its mask, checked against ``[0, vocab)``.

    ``seqs`` and ``masks`` (or None) are what a tensordict holds under ``key`` and ``mask_key``: a dense
    ``[B, T]`` batch, whose rows are cut out in one masked gather instead of one per row, or rows. The
    vocabulary range is checked once for the whole batch (one device sync, not one per row); only
    when it fails are the rows searched for the first offending one.
    """
    if _dense(seqs) and (masks is None or _dense(masks)):
        out = _dense_rows(seqs, masks, key, mask_key)
    else:
        rows = as_tensor_list(seqs, key)
        out = _rows(rows, as_tensor_list(masks, mask_key) if masks is not None else None, key, mask_key)
    flat = torch.cat([ids.reshape(-1).long() for ids in out]) if out else torch.zeros(0, dtype=torch.long)
    if flat.numel():
        low, high = torch.stack(torch.aminmax(flat)).tolist()  # one device sync for the batch
        if low < 0 or high >= vocab:
            for i, ids in enumerate(out):
                if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                    raise ValueError(
                        f"{key}[{i}] has token ids outside the vocabulary [0, {vocab}): min {int(ids.min())}, max {int(ids.max())}."
                    )
    return out


def _check_integer(ids: torch.Tensor, key: str) -> None:
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{key} must hold integer token ids, got dtype {ids.dtype}.")


def _dense(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 2


def _rows(
    seqs: list[torch.Tensor], masks: list[torch.Tensor] | None, key: str, mask_key: str | None
) -> list[torch.Tensor]:
    out = []
    for i, ids in enumerate(seqs):
        _check_integer(ids, key)
        if ids.ndim != 1:
            raise ValueError(f"{key}[{i}] must be 1-D per sample, got shape {tuple(ids.shape)}.")
        if masks is not None:
            if masks[i].shape != ids.shape:
                raise ValueError(
                    f"{mask_key}[{i}] has shape {tuple(masks[i].shape)}, {key}[{i}] {tuple(ids.shape)}."
                )
            ids = ids[masks[i].bool()]
        out.append(ids)
    return out


def _dense_rows(
    ids: torch.Tensor, mask: torch.Tensor | None, key: str, mask_key: str | None
) -> list[torch.Tensor]:
    _check_integer(ids, key)
    if mask is None:
        return list(ids.unbind(0))
    if mask.shape != ids.shape:
        raise ValueError(f"{mask_key}[0] has shape {tuple(mask.shape[1:])}, {key}[0] {tuple(ids.shape[1:])}.")
    keep = mask.bool()
    return list(ids[keep].split(keep.sum(-1).tolist()))


def as_str_list(value: Any, key: str, n: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    elif hasattr(value, "tolist"):
        value = value.tolist()
    value = list(value)
    if len(value) != n or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{key} must hold one string per batch element ({n}), got {value!r:.200}.")
    return value


def as_tensor_list(value: Any, key: str) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    if isinstance(value, Sequence) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    raise TypeError(f"{key} must hold token id tensors, got {type(value).__name__}.")


# ---------------------------------------------------------------------- text inputs
def prompt_texts(
    flat: TensorDictBase, tokenizer, template_name, template, *, keys: tuple[str, str]
) -> list[str]:
    """Prompt strings of a flat batch: its text, else its chat history rendered for generation."""
    text_key, history_key = keys
    text = flat.get(text_key, None)
    if text is not None:
        return as_str_list(text, text_key, flat.shape[0])
    history = flat.get(history_key, None)
    if history is None:
        raise ValueError(f"input has neither {text_key!r} nor {history_key!r} (from_text=True).")
    return chat.render_prompts(history, tokenizer, template_name, template)


def score_texts(
    flat: TensorDictBase, tokenizer, template_name, template, *, keys: tuple[str, str, str]
) -> tuple[list[str], list[str]]:
    """(prompt, response) strings to score: text + response, history + response, or a history
    whose last message is the assistant's."""
    text_key, response_key, history_key = keys
    n = flat.shape[0]
    text, response = flat.get(text_key, None), flat.get(response_key, None)
    history = flat.get(history_key, None)
    if response is not None and text is None and history is None:
        raise ValueError(
            f"score mode got {response_key!r} without a prompt: give {text_key!r} or {history_key!r}."
        )
    if text is not None and response is None:
        raise ValueError(f"score mode got {text_key!r} without {response_key!r}: both are needed.")
    if text is not None:
        return as_str_list(text, text_key, n), as_str_list(response, response_key, n)
    if history is None:
        raise ValueError(f"score mode needs {text_key!r} + {response_key!r}, or {history_key!r}.")
    if response is not None:
        prompts = chat.render_prompts(history, tokenizer, template_name, template)
        return prompts, as_str_list(response, response_key, n)
    return chat.render_prompt_response(history, tokenizer, template_name, template)
