"""Compiled decoding: the sampling loop of ``generate`` over a static key/value cache, each step compiled
by ``torch.compile`` (opt-in: ``generate.compile=true``, ``TransformersWrapper(compile_decode=True)``).

Why. On a small model most of a decoding step is Python around small matrix products: Hugging Face's
modeling code, its cache and its generation loop (``scripts/bench_decode.py`` splits a rollout). A step
over a cache of fixed shape compiles into one graph, and this loop does only what a rollout needs.

The loop, for ``B`` rows (prompts repeated ``group`` times each, left-padded to width ``P``):

- prefill: every prompt minus its last token runs once, eagerly, into a ``DynamicCache`` (each distinct
  prompt once when ``group > 1``, :mod:`pipeline.prefix`), copied into a ``StaticCache`` of
  ``P + max_new_tokens`` positions rounded up to a multiple of :data:`CACHE_ROUNDING` (fewer shapes,
  fewer compilations; but each step's attention reads every position, so not many more: a toy rollout
  of 6 + 32 tokens took 46.6 ms over 40 positions against 52.9 ms over 64). The cache of the previous
  call is reused when its shape matches.
- each step (:func:`next_token`, the compiled unit) feeds one token per row, the last prompt token
  first, through the model, then: EOS suppressed before ``min_new_tokens``; temperature, top-k,
  top-p, min-p (Hugging Face's warpers, in its order); the argmax, or the inverse-CDF draw of
  :mod:`pipeline.sampling` at a uniform drawn outside the graph from the same random stream, so a
  seed gives the tokens of the ``generate`` path (up to float rounding at a bin edge); the token's
  log-prob under ``softmax(logits / log_probs_temperature)`` of the raw logits, as
  :class:`pipeline.logprobs.StepLogProbs` records it from ``generate``; the pad id for rows past
  their first EOS, as in ``generate``.
- it stops when every row has emitted an EOS, or after ``max_new_tokens``.

Three things make the compiled step cheap on a CPU. Its attention there is Hugging Face's ``eager``
implementation (two matrix products and a softmax, which the compiler fuses; the model keeps its own
implementation everywhere else, and on other devices): at one query row the CPU flash kernel costs
more than the products around it. ``torch.compile``'s guards are evaluated in full only on the first
steps of a call and where an option changes; between them every guarded object, value and tensor
layout is the same by construction, so the guards are skipped (``skip_guard_eval_unsafe``, where they
would cost a quarter of a small model's step). And torch's deterministic mode (``trainer.deterministic``)
is lifted inside the loop, where it only swaps the cache write's generated kernel for a slower
fallback (:func:`_nondeterministic_lowering`).

Scope: the generation fields above (plus ids and output flags). Any other active field
(``repetition_penalty != 1``, ``no_repeat_ngram_size``, beams, ...), ``generate`` extras (logits
processors, stopping criteria), ``return_logits``, sharded (FSDP) models and models with other than
full-attention cache layers (sliding windows) are refused with an error that names them.

Cost. The first call per batch shape compiles (seconds on a CPU, which needs a C++ compiler); a new
batch size or cache length recompiles once with dynamic shapes (``torch.compile``'s default).
"""

from __future__ import annotations

import functools
import inspect
import math
import types
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from transformers import GenerationConfig, StaticCache

from pipeline import prefix, sampling
from pipeline.logprobs import compute_dtype, pad_left, position_ids_from_mask
from pipeline.runtime import check_cpp_compiler

CACHE_ROUNDING = 8
# GenerationConfig fields the loop reproduces or that do not change what generate computes.
_HANDLED = {
    "max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_k", "top_p", "min_p",
    "eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id", "max_length", "use_cache",
    "return_dict_in_generate", "transformers_version", "_from_model_config", "cache_implementation",
    "compile_config", "disable_compile",
}  # fmt: skip
# Fields that are off at these values (beside None and False).
_NEUTRAL = {
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "length_penalty": 1.0, "num_beams": 1,
    "num_beam_groups": 1, "min_length": 0, "num_return_sequences": 1, "typical_p": 1.0, "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "guidance_scale": 1.0,
}  # fmt: skip
_OPTION = "compile_decode (generate.compile)"


def unsupported_fields(cfg: GenerationConfig, extras: dict[str, Any]) -> list[str]:
    """``field=value`` for each active generation setting the compiled loop does not reproduce."""
    out = [f"{k}={v!r}" for k, v in sorted(cfg.to_diff_dict().items())
           if k not in _HANDLED and v is not None and v is not False and _NEUTRAL.get(k, ...) != v]  # fmt: skip
    out += [f"{k} (a generate() argument)" for k in sorted(extras)]
    return out


def check_generation(cfg: GenerationConfig, extras: dict[str, Any], where: str) -> None:
    """Raises a ``ValueError`` naming what the compiled loop cannot do with ``cfg``/``extras``."""
    bad = unsupported_fields(cfg, extras)
    if bad:
        raise ValueError(
            f"{_OPTION} reproduces max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p and "
            f"min_p only; {where} also sets {bad}: drop them or set generate.compile=false."
        )
    if cfg.max_new_tokens is None:
        raise ValueError(f"{_OPTION} needs max_new_tokens in {where}.")


def _hf_model(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, FSDPModule) or isinstance(prefix.unwrapped(model), FSDPModule):
        raise ValueError(f"{_OPTION} does not run FSDP-sharded models (trainer.strategy=fsdp); turn it off.")
    return prefix.unwrapped(model)


class CompiledDecoder:
    """Generates from a Hugging Face decoder with a compiled one-token step (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, cpu_attention: str | None = "eager") -> None:
        hf = _hf_model(model)
        self.cache_arg = prefix.cache_kwarg(hf)
        if not getattr(hf, "_can_compile_fullgraph", False) or self.cache_arg is None:
            raise ValueError(
                f"{_OPTION}: {type(hf).__name__} does not declare a fully compilable forward with a cache "
                "argument (transformers' _can_compile_fullgraph); set generate.compile=false."
            )
        layers = StaticCache(config=hf.config, max_cache_len=1).layers
        kinds = sorted({type(layer).__name__ for layer in layers})
        if kinds != ["StaticLayer"]:
            raise ValueError(
                f"{_OPTION} supports full-attention cache layers only; {type(hf).__name__} has {kinds}. "
                "Set generate.compile=false."
            )
        if next(hf.parameters()).device.type == "cpu":
            check_cpp_compiler(_OPTION, "generate.compile=false")
        self.model = hf
        self.takes_cache_position = "cache_position" in inspect.signature(hf.forward).parameters
        self.cpu_attention = cpu_attention
        self._cache: tuple[tuple[Any, ...], StaticCache] | None = None
        self.step = torch.compile(_own_copy(next_token), fullgraph=True)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[torch.Tensor],
        cfg: GenerationConfig,
        group: int,
        *,
        share_prompts: bool,
        log_probs_temperature: float | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``[B, N]`` generated tokens (pad after a row's first EOS) of the ``prompts`` repeated ``group``
        times each (``B = len(prompts) * group``), and their ``[B, N]`` log-probs under
        ``softmax(logits / log_probs_temperature)`` (None when it is None). ``N <= max_new_tokens``.
        ``cfg`` is one that :func:`check_generation` accepts."""
        rows = [p for p in prompts for _ in range(group)]
        pad = int(cfg.pad_token_id)
        ids, mask = pad_left(rows, pad)
        batch, width = ids.shape
        new = int(cfg.max_new_tokens)
        length = math.ceil((width + new) / CACHE_ROUNDING) * CACHE_ROUNDING
        cache = self._prefilled(prompts, ids, mask, group, share_prompts, length, pad)
        compiled = width >= 2  # an empty cache is allocated by its first update, outside the compiled graph

        full_mask = torch.zeros(batch, length, dtype=torch.long, device=ids.device)
        full_mask[:, :width] = mask
        state = {
            "positions": position_ids_from_mask(mask)[:, -1:].clone(),
            "done": torch.zeros(batch, dtype=torch.bool, device=ids.device),
            "bad": torch.zeros((), dtype=torch.bool, device=ids.device),
            "eos": torch.as_tensor(
                [] if cfg.eos_token_id is None else cfg.eos_token_id, dtype=torch.long, device=ids.device
            ).reshape(-1),
        }
        options = {
            "warpers": sampling.warpers(cfg, self.model),
            "pad": pad,
            "temperature": log_probs_temperature,
            "do_sample": bool(cfg.do_sample),
        }
        min_new = int(cfg.min_new_tokens or 0) if state["eos"].numel() else 0
        cpu = ids.device.type == "cpu"
        with (
            _attention(self.model.config, self.cpu_attention if cpu else None),
            _nondeterministic_lowering(cpu),
        ):
            tokens, log_probs = self._loop(ids[:, -1:].contiguous(), cache, full_mask, state, width, new,
                                           min_new, compiled, options)  # fmt: skip
        if bool(state["bad"]):
            raise ValueError(sampling.NOT_FINITE)
        return torch.cat(tokens, 1), (
            torch.stack(log_probs, 1) if log_probs_temperature is not None else None
        )

    def _loop(
        self,
        token: torch.Tensor,
        cache: StaticCache,
        mask: torch.Tensor,
        state: dict[str, torch.Tensor],
        width: int,
        new: int,
        min_new: int,
        compiled: bool,
        options: dict[str, Any],
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The decoding steps from the last prompt token ``token``: per step the new tokens ``[B, 1]`` and
        their log-probs ``[B]``."""
        tokens, log_probs = [], []
        positions, done, bad, eos = state["positions"], state["done"], state["bad"], state["eos"]
        sample = options["do_sample"]
        for t in range(new):
            inputs = {"input_ids": token, "attention_mask": mask, "position_ids": positions,
                      "use_cache": True, self.cache_arg: cache}  # fmt: skip
            if self.takes_cache_position:  # transformers < 5.2x
                inputs["cache_position"] = torch.tensor([width + t - 1], device=token.device)
            # the random numbers of sampling.inverse_cdf_sample, outside the graph (greedy draws none)
            u = sampling.uniforms(token.shape[0], token.device) if sample else token
            step = self.step if compiled or t > 0 else next_token
            # guards in full on the first compiled step and where min_new_tokens changes the options
            guarded = t <= 1 or t == min_new
            with nullcontext() if guarded else _skipped_guards():
                token, log_prob, done, bad = step(
                    self.model, inputs, u, done, bad, eos, suppress_eos=t < min_new, **options
                )
            tokens.append(token)
            log_probs.append(log_prob)
            if t + 1 == new or bool(done.all()):
                break
            mask[:, width + t] = 1
            positions += 1
        state["bad"] = bad
        return tokens, log_probs

    def _prefilled(
        self,
        prompts: Sequence[torch.Tensor],
        ids: torch.Tensor,
        mask: torch.Tensor,
        group: int,
        share_prompts: bool,
        length: int,
        pad: int,
    ) -> StaticCache:
        """A static cache of ``length`` positions holding every row's prompt minus its last token. The
        cache of the previous call is reset and reused when it has the same shape, dtype and device
        (its buffers are allocated once; the compiled step sees the same objects)."""
        if ids.shape[1] < 2:  # nothing to copy: the first step allocates the cache
            return StaticCache(config=self.model.config, max_cache_len=length)
        shared = prefix.prefill(self.model, prompts, group, pad_token_id=pad) if share_prompts else {}
        dynamic = shared.get(self.cache_arg)
        if dynamic is None:  # every row runs its prompt; through the decoder alone where it has one
            sharing = prefix.decoder_of(self.model)
            module = sharing[0] if sharing is not None else self.model
            dynamic = prefix.fill(module, self.cache_arg, self.model.config, ids[:, :-1], mask[:, :-1])
        first = dynamic.layers[0].keys
        key = (ids.shape[0], length, first.dtype, first.device)
        if self._cache is not None and self._cache[0] == key:
            cache = self._cache[1]
            cache.reset()
        else:
            self._cache = None  # the old buffers go before the new ones are allocated
            cache = StaticCache(config=self.model.config, max_cache_len=length)
            self._cache = (key, cache)
        positions = torch.arange(ids.shape[1] - 1, device=ids.device)
        for i, layer in enumerate(dynamic.layers):
            cache.update(layer.keys, layer.values, i, {"cache_position": positions})
        return cache


def next_token(
    model: torch.nn.Module,
    inputs: dict[str, Any],
    u: torch.Tensor,
    done: torch.Tensor,
    bad: torch.Tensor,
    eos: torch.Tensor,
    *,
    suppress_eos: bool,
    warpers: list[Any],
    pad: int,
    temperature: float | None,
    do_sample: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """One decoding step, the unit that is compiled: the model on one token per row, then the next
    token ``[B, 1]`` (inverse CDF at the uniforms ``u``, or the argmax; ``pad`` for rows already
    ``done``), its log-prob ``[B]`` at ``temperature`` (None when None), the rows done after it, and
    whether any row's sampling scores were not finite (``bad``, checked by the caller once)."""
    logits = model(**inputs).logits[:, -1]
    scores = logits.float()
    if suppress_eos:
        scores = scores.index_fill(-1, eos, float("-inf"))
    for warp in warpers:
        scores = warp(None, scores)
    if do_sample:
        token, finite = sampling.draw(scores, u)
        bad = bad | ~finite
    else:
        token = scores.argmax(-1, keepdim=True)
    token = token.masked_fill(done[:, None], pad)
    log_prob = None
    if temperature is not None:
        x = logits.to(compute_dtype(logits.dtype)) / temperature
        log_prob = x.gather(-1, token).squeeze(-1) - x.logsumexp(-1)
    return token, log_prob, done | torch.isin(token.squeeze(-1), eos), bad


@functools.cache
def _can_skip_guards() -> bool:
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance is not None and "skip_guard_eval_unsafe" in inspect.signature(set_stance).parameters


def _skipped_guards() -> AbstractContextManager:
    """``torch.compile``'s guards skipped where torch has the switch (2.7+); checked in full otherwise."""
    return torch.compiler.set_stance(skip_guard_eval_unsafe=True) if _can_skip_guards() else nullcontext()


def _own_copy(fn: Any) -> Any:
    """``fn`` with a code object of its own: ``torch.compile`` keeps compiled graphs, and counts them
    against its recompile limit, per code object, so each decoder counts only its own batch shapes
    and sampling settings."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


@contextmanager
def _nondeterministic_lowering(active: bool) -> Iterator[None]:
    """torch's deterministic mode lifted while ``active`` (the CPU decoding loop).

    On a CPU the mode changes two things in the compiled step, and neither makes its result depend on
    the run: the key/value cache write (``index_copy_`` at one position per row: no index repeats) falls
    back from a generated kernel to ``aten.index_put_`` (9 calls of 17 us per step on the toy model:
    a rollout of 64 x 32 tokens took 60.8 instead of 55.6 ms), and new buffers are filled with NaN.
    Every CPU kernel gives the same result run to run either way."""
    if not active or not torch.are_deterministic_algorithms_enabled():
        yield
        return
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(True, warn_only=warn_only)


@contextmanager
def _attention(config: Any, name: str | None) -> Iterator[None]:
    """The model's attention implementation set to ``name`` (None: unchanged) for the decoding steps."""
    old = config._attn_implementation
    if name is None or name == old:
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old
