"""TransformersWrapper: a Hugging Face causal LM and its tokenizer behind a TensorDict interface.

The wrapper generates responses (with the log-probability of every generated token) or scores
given responses (log-probs only), from text, chat history or token ids. Its contract follows the
older torchrl ``TransformersWrapper`` (arguments, defaults, keys, modes) with its defects fixed:
positions come from the attention mask, masks from lengths (never from token values), the first
EOS of each response is kept and scored, history prompts end with the assistant generation prompt,
runtime sampling arguments override the configured ones, text responses are tokenized on their
own, and no ``B x T x V`` logits are kept during generation unless asked for.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Literal

import torch
from tensordict import LazyStackedTensorDict, TensorDict, TensorDictBase, lazy_stack, set_list_to_stack
from tensordict.nn import TensorDictModuleBase
from transformers import GenerationConfig, PreTrainedTokenizerBase

from pipeline import decode, lm_head, prefix, sampling
from pipeline.logprobs import StepLogProbs, pad_left, response_lengths, sequence_log_probs
from pipeline.policy_args import (
    base_generation_config,
    bos_token_id,
    check_num_samples,
    check_tokenizer_kwargs,
    check_wrapper_args,
    checked_token_ids,
    pad_token_id,
    prompt_texts,
    score_texts,
    updated_generation_config,
    vocab_size,
    with_pad_token,
)
from pipeline.policy_layout import (
    assemble_rows,
    check_tensorclass_fields,
    dense_outputs,
    place_dense,
    reshaped,
    unwrap_container,
    wrapper_keys,
)


class TransformersWrapper(TensorDictModuleBase):
    """Wraps a Hugging Face causal LM for generation and log-prob scoring on TensorDicts.

    Args:
        model: a ``transformers`` causal LM (``PreTrainedModel`` with ``generate``).

    Keyword Args:
        return_log_probs: return ``"log_probs"`` of the generated tokens. ``None`` means ``False`` when
            generating and ``True`` when scoring (``False`` is invalid when scoring).
        tokenizer: tokenizer used for text/history input, decoding and the pad id. Required when
            ``from_text=True``. Never mutated: if it has no pad token a copy pads with EOS.
        from_text: read prompts from ``"text"`` (or ``"history"``) if ``True``; from ``"tokens"``
            (and optional ``"attention_mask"``) if ``False``.
        device: device of the model inputs; defaults to the model's device.
        generate: generate responses if ``True``; score given responses if ``False``.
        generate_kwargs: ``transformers.GenerationConfig`` fields (``max_new_tokens``,
            ``do_sample``, ``temperature``, ...) plus ``logits_processor``/``stopping_criteria``.
            ``forward(td, **kwargs)`` overrides them for one call.
        tokenizer_kwargs: ``add_special_tokens``, ``truncation``, ``max_length`` for the tokenizer.
        pad_output: must be ``True`` (transformers models run on padded batches).
        inplace: where the outputs go. ``True``: into the input, which is returned (with
            ``num_samples`` the ``[*batch, G]`` result cannot fit a ``[*batch]`` input: a new batch
            of the input's type comes back, the input entries repeated per sample, the input
            untouched). ``False``: a new batch holding only the outputs. ``"empty"``: the outputs
            in ``input.empty()`` (same type, device).
        chat_template_name: named torchrl template for history input (``"chatml_format"``, ``"qwen"``, ...).
        chat_template: custom Jinja chat template for history input.
        num_samples: generate G responses per prompt; the output batch shape is ``[*batch, G]``.
        log_probs_temperature: log-probs describe ``softmax(logits / T)``. The default 1.0 scores
            the raw model distribution; set it to the sampling temperature to score the
            distribution that sampled (top-k/top-p truncation is never part of it).
        return_logits: also return raw ``"logits"`` of the response positions (``[R, V]`` per sample).
        skip_special_tokens: decode ``"text_response"`` (generate mode, text input) without special
            tokens (EOS, pad, chat markers), i.e. the completion text a reward reads. The default
            ``False`` decodes every generated token, the first EOS included. ``"tokens_response"``
            and ``"log_probs"`` are the same either way.
        autocast_dtype: ``torch.bfloat16``/``torch.float16`` runs generation and scoring under
            ``torch.autocast`` (mixed precision over float32 weights); log-probs stay float32.
        share_prompt_cache: rows with the same prompt (the ``num_samples`` of a prompt) run it through the
            model once and share its key/value cache, in generation and scoring (:mod:`pipeline.prefix`).
        sampler: ``"inverse_cdf"`` draws sampled tokens by inverse CDF (:mod:`pipeline.sampling`: the same
            distribution as ``torch.multinomial``, faster); ``"multinomial"``: Hugging Face's own draw.
        compile_decode: generate with :class:`pipeline.decode.CompiledDecoder` (a static cache and a
            ``torch.compile``d one-token step) instead of ``model.generate``: faster decoding on small
            models, after a compilation on the first call per batch shape. Sampling by inverse CDF;
            max/min_new_tokens, temperature, top-k, top-p and min-p only (others are refused).

    Input containers: a ``TensorDict`` or a tensorclass (the wrapper runs on the tensordict
    underneath and returns the same class; the class must declare every key written), of any batch
    shape. The output layout follows the container that receives the outputs:

    - lazy stack: per-sample, variable-length entries; read them with ``td.get(key, as_list=True)``
      or ``td.get(key, as_padded_tensor=True, padding_side="right")``.
    - dense (``TensorDict``, tensorclass, 0-dim included): padded tensors. ``tokens`` left-padded
      with the pad id and ``attention_mask`` (0/1); ``tokens_response`` right-padded with the pad
      id, ``log_probs`` and ``logits`` with 0, each with a boolean mask that marks real positions
      (``tokens_response_mask``, ``log_probs_mask``, ``logits_mask``: with pad == EOS values cannot
      tell). In score mode a ``tokens_response_mask`` in the input unpads ``tokens_response``, and
      ``log_probs`` are written at the same positions.

    Keys: ``text``, ``history``, ``tokens``, ``attention_mask``, ``tokens_response``,
    ``text_response``, ``log_probs``, ``logits`` and the masks above.
    """

    text_key = "text"
    history_key = "history"
    token_key = "tokens"
    token_response_key = "tokens_response"
    text_response_key = "text_response"
    attention_mask_key = "attention_mask"
    log_prob_key = "log_probs"
    logits_key = "logits"
    # dense layout: one boolean mask per right-padded output (True = a real position)
    token_response_mask_key = "tokens_response_mask"
    log_prob_mask_key = "log_probs_mask"
    logits_mask_key = "logits_mask"

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        return_log_probs: bool | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        from_text: bool = True,
        device: torch.device | str | None = None,
        generate: bool = True,
        generate_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        pad_output: bool = True,
        inplace: Literal[True, False, "empty"] | None = True,
        chat_template_name: str | None = None,
        chat_template: str | None = None,
        num_samples: int | None = None,
        log_probs_temperature: float = 1.0,
        return_logits: bool = False,
        skip_special_tokens: bool = False,
        autocast_dtype: torch.dtype | None = None,
        share_prompt_cache: bool = True,
        sampler: Literal["inverse_cdf", "multinomial"] = "inverse_cdf",
        compile_decode: bool = False,
    ) -> None:
        super().__init__()
        self.num_samples = check_wrapper_args(
            model, return_log_probs=return_log_probs, tokenizer=tokenizer, from_text=from_text,
            generate=generate, pad_output=pad_output, inplace=inplace, chat_template_name=chat_template_name,
            chat_template=chat_template, num_samples=num_samples, log_probs_temperature=log_probs_temperature,
            return_logits=return_logits, skip_special_tokens=skip_special_tokens,
        )  # fmt: skip
        self.model = model
        self.from_text = from_text
        self.generate = generate
        self.inplace = inplace
        self.pad_output = pad_output
        self.chat_template_name = chat_template_name
        self.chat_template = chat_template
        self.return_log_probs = (not generate) if return_log_probs is None else return_log_probs
        self.return_logits = return_logits
        self.skip_special_tokens = skip_special_tokens
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(
                f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype!r}."
            )
        self.autocast_dtype = autocast_dtype
        self.share_prompt_cache = share_prompt_cache
        self.sampler = sampling.checked(sampler)
        if not generate:
            lm_head.prepare(model)  # score mode: the LM head in chunks where the model allows it
        self.log_probs_temperature = float(log_probs_temperature)
        self._device = torch.device(device) if device is not None else None
        self.tokenizer = with_pad_token(tokenizer)
        self.tokenizer_kwargs = check_tokenizer_kwargs(tokenizer_kwargs)
        self.pad_token_id = pad_token_id(self.tokenizer, model)
        self.generation_config, self.generate_extras = base_generation_config(
            model, self.tokenizer, self.pad_token_id, generate_kwargs,
            generate=generate, log_probs=self.return_log_probs, return_logits=return_logits,
        )  # fmt: skip

        self.decoder = self._compiled_decoder(compile_decode)

        self.in_keys, self.out_keys = wrapper_keys(self, from_text=from_text, generate=generate)
        self.mask_keys = {self.token_response_key: self.token_response_mask_key,
                          self.log_prob_key: self.log_prob_mask_key, self.logits_key: self.logits_mask_key}  # fmt: skip

    # ------------------------------------------------------------------ configuration
    def _compiled_decoder(self, compile_decode: bool) -> decode.CompiledDecoder | None:
        if not compile_decode:
            return None
        if not self.generate:
            raise ValueError("compile_decode=True applies to generation (generate=True), not to scoring.")
        if self.return_logits:
            raise ValueError("compile_decode=True does not return logits; set return_logits=False.")
        decode.check_generation(self.generation_config, self.generate_extras, "generate_kwargs")
        return decode.CompiledDecoder(self.model)

    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else next(self.model.parameters()).device

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tensordict: TensorDictBase,
        tensordict_out: TensorDictBase | None = None,
        *,
        num_samples: int | None = None,
        **kwargs: Any,
    ) -> TensorDictBase:
        """Generate or score for every element of ``tensordict`` (any batch shape).

        ``kwargs`` override the configured generation arguments for this call only;
        ``num_samples`` overrides the configured number of samples per prompt.
        """
        td, cls = unwrap_container(tensordict, "TransformersWrapper input")
        out_td, out_cls = (
            (None, None) if tensordict_out is None else unwrap_container(tensordict_out, "tensordict_out")
        )
        if not self.generate and kwargs:
            raise ValueError(f"sampling arguments {sorted(kwargs)} only apply when generate=True.")
        cfg = (
            updated_generation_config(self.generation_config, kwargs, "forward kwargs", self.return_log_probs)
            if kwargs
            else self.generation_config
        )
        n_samples = (
            check_num_samples(num_samples, self.generate) if num_samples is not None else self.num_samples
        )
        group = n_samples or 1
        # Layout follows the container that receives the outputs: per-sample in a lazy stack, padded otherwise.
        dense = not isinstance(td if out_td is None else out_td, LazyStackedTensorDict)
        for c in (cls, out_cls):
            check_tensorclass_fields(c, self._written_keys(dense))

        batch_shape = td.batch_size
        flat = lazy_stack([td]) if td.ndim == 0 else td if td.ndim == 1 else td.reshape(-1)
        if flat.shape[0] == 0:
            raise ValueError("TransformersWrapper got an empty batch (batch_size has a 0 dimension).")
        out_shape = (*batch_shape, n_samples) if n_samples is not None else tuple(batch_shape)
        if out_td is not None and out_td.numel() != flat.shape[0] * group:
            raise ValueError(
                f"tensordict_out must have one element per output ({flat.shape[0] * group}), got "
                f"{type(tensordict_out).__name__} of batch size {tuple(out_td.shape)}."
            )

        autocast = (
            torch.autocast(self.device.type, self.autocast_dtype) if self.autocast_dtype else nullcontext()
        )
        with set_list_to_stack(True):
            if self.generate:
                prompts, texts = self._prompt_ids(flat)
                with autocast:
                    outputs = self._generate(prompts, cfg, group)
                if texts is not None:
                    outputs[self.text_key] = [t for t in texts for _ in range(group)]
            else:
                with autocast:
                    outputs = self._score(flat)
            if dense:
                out = self._dense(outputs, td)
                result = place_dense(out, td, tensordict, tensordict_out, self.inplace, out_shape, n_samples)
            else:
                rows = [TensorDict({k: v[j] for k, v in outputs.items()}, batch_size=[], device=td.device)
                        for j in range(flat.shape[0] * group)]  # fmt: skip
                result = reshaped(assemble_rows(flat, rows, group, self.inplace, out_td), out_shape)
        if out_td is not None:
            return tensordict_out
        if result is td or result is tensordict:
            return tensordict
        return cls.from_tensordict(result) if cls is not None else result

    def _written_keys(self, dense: bool) -> list[str]:
        """Keys the wrapper writes: ``out_keys``, plus one boolean mask per padded output when dense."""
        masks = [self.mask_keys[k] for k in self.out_keys if k in self.mask_keys] if dense else []
        return [*self.out_keys, *masks]

    def _dense(self, outputs: dict[str, list], td: TensorDictBase) -> TensorDict:
        """Per-sample outputs as a flat dense batch: prompts left-padded with ``attention_mask``, responses,
        log-probs and logits right-padded with their masks (text as strings)."""
        return dense_outputs(outputs, self, td.device, self._response_positions(td))

    def _response_positions(self, td: TensorDictBase) -> torch.Tensor | None:
        """Score mode on dense token input: where the real response tokens are in ``tokens_response``
        (from its mask), so that log-probs are written at the same positions."""
        if self.generate or self.from_text or isinstance(td, LazyStackedTensorDict):
            return None
        if self.token_response_mask_key not in td.keys():
            return None
        mask = td.get(self.token_response_mask_key)
        return mask.reshape(-1, mask.shape[-1]) if td.ndim else mask.reshape(1, -1)

    # ------------------------------------------------------------------ inputs
    def _prompt_ids(self, flat: TensorDictBase) -> tuple[list[torch.Tensor], list[str] | None]:
        if self.from_text:
            keys = (self.text_key, self.history_key)
            texts = prompt_texts(flat, self.tokenizer, self.chat_template_name, self.chat_template, keys=keys)
            return self._tokenize(texts, self.text_key, special=True), texts
        return self._token_lists(flat, self.token_key, mask_key=self.attention_mask_key), None

    def _tokenize(self, texts: list[str], key: str, *, special: bool) -> list[torch.Tensor]:
        kwargs = dict(self.tokenizer_kwargs)
        kwargs["add_special_tokens"] = kwargs.get("add_special_tokens", True) and special
        ids = self.tokenizer(texts, **kwargs)["input_ids"]
        return [self._with_bos(torch.tensor(x, dtype=torch.long, device=self.device), key, i) if special
                else torch.tensor(x, dtype=torch.long, device=self.device) for i, x in enumerate(ids)]  # fmt: skip

    def _with_bos(self, ids: torch.Tensor, key: str, index: int) -> torch.Tensor:
        """An empty prompt gets the BOS token, so the first response token has a context."""
        if ids.numel():
            return ids
        bos = bos_token_id(self.tokenizer, self.model)
        if bos is None:
            raise ValueError(
                f"{key}[{index}] is empty and neither the tokenizer nor the model defines a BOS token "
                "to start from; give a non-empty prompt."
            )
        return torch.tensor([bos], dtype=torch.long, device=self.device)

    def _token_lists(self, flat: TensorDictBase, key: str, *, mask_key: str | None) -> list[torch.Tensor]:
        if key not in flat.keys():
            raise ValueError(f"input is missing {key!r} (from_text=False).")
        masks = None
        if mask_key is not None and mask_key in flat.keys():
            masks = flat.get(mask_key, as_list=True)
        seqs = checked_token_ids(
            flat.get(key, as_list=True), masks, key, mask_key, vocab_size(self.model, self.tokenizer)
        )
        device = self.device
        out = [ids.to(device=device, dtype=torch.long) for ids in seqs]
        return [self._with_bos(ids, key, i) for i, ids in enumerate(out)] if key == self.token_key else out

    # ------------------------------------------------------------------ generate
    def _generate(self, prompts: list[torch.Tensor], cfg: GenerationConfig, group: int) -> dict[str, list]:
        temperature = self.log_probs_temperature if self.return_log_probs else None
        logits = None
        if self.decoder is not None:
            if cfg is not self.generation_config:
                decode.check_generation(cfg, {}, "forward kwargs")
            seqs, log_probs = self.decoder.generate(
                prompts, cfg, group, share_prompts=self.share_prompt_cache, log_probs_temperature=temperature
            )
        else:
            seqs, log_probs, logits = self._hf_generate(prompts, cfg, group, temperature)
        if group > 1:
            prompts = [p for p in prompts for _ in range(group)]
        lengths = response_lengths(seqs, cfg.eos_token_id).tolist()
        responses = [seqs[i, :n] for i, n in enumerate(lengths)]
        outputs: dict[str, list] = {
            self.token_key: prompts,
            self.attention_mask_key: [torch.ones_like(p) for p in prompts],
            self.token_response_key: responses,
        }
        if self.from_text:
            outputs[self.text_response_key] = self.tokenizer.batch_decode(
                responses, skip_special_tokens=self.skip_special_tokens
            )
        if log_probs is not None:
            outputs[self.log_prob_key] = [log_probs[i, :n] for i, n in enumerate(lengths)]
        if logits is not None:
            outputs[self.logits_key] = [logits[i, :n] for i, n in enumerate(lengths)]
        return outputs

    def _hf_generate(
        self, prompts: list[torch.Tensor], cfg: GenerationConfig, group: int, temperature: float | None
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """``model.generate``: the ``[B, N]`` new tokens, their log-probs (when ``temperature`` is given)
        and raw logits ``[B, N, V]`` (when ``return_logits``)."""
        extras = dict(self.generate_extras)
        if self.share_prompt_cache and cfg.cache_implementation is None:
            with torch.no_grad():  # each prompt once, its cache repeated for its group
                extras.update(prefix.prefill(self.model, prompts, group, pad_token_id=self.pad_token_id))
        if self.sampler == "inverse_cdf":
            cfg, extras = sampling.fast_generation(cfg, extras, self.model)
        if group > 1:
            prompts = [p for p in prompts for _ in range(group)]
        input_ids, mask = pad_left(prompts, self.pad_token_id)
        recorder = StepLogProbs(temperature) if temperature is not None else None
        # on the model whose forward generate calls: peft's generate runs its base model's, not its own
        hooked = prefix.unwrapped(self.model)
        handle = hooked.register_forward_hook(recorder, with_kwargs=True) if recorder else None
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask.long(),
                    generation_config=cfg,
                    **extras,
                )
        finally:
            if handle is not None:
                handle.remove()
        seqs = out.sequences[:, input_ids.shape[1] :]
        log_probs = recorder.finish(seqs) if recorder is not None else None
        logits = torch.stack(out.logits, 1) if self.return_logits else None
        return seqs, log_probs, logits

    # ------------------------------------------------------------------ score
    def _score(self, flat: TensorDictBase) -> dict[str, list]:
        outputs: dict[str, list] = {}
        if self.from_text:
            prompt_txt, response_txt = score_texts(
                flat, self.tokenizer, self.chat_template_name, self.chat_template,
                keys=(self.text_key, self.text_response_key, self.history_key),
            )  # fmt: skip
            prompts = self._tokenize(prompt_txt, self.text_key, special=True)
            responses = self._tokenize(response_txt, self.text_response_key, special=False)
            outputs[self.token_key] = prompts
            outputs[self.attention_mask_key] = [torch.ones_like(p) for p in prompts]
            outputs[self.token_response_key] = responses
        else:
            missing = [k for k in (self.token_key, self.token_response_key) if k not in flat.keys()]
            if missing:
                raise ValueError(
                    f"score mode (generate=False, from_text=False) needs keys {missing} in the input."
                )
            prompts = self._token_lists(flat, self.token_key, mask_key=self.attention_mask_key)
            responses = self._token_lists(
                flat, self.token_response_key, mask_key=self.token_response_mask_key
            )
        log_probs, resp_mask, logits = sequence_log_probs(
            self.model, prompts, responses, pad_token_id=self.pad_token_id,
            temperature=self.log_probs_temperature, return_logits=self.return_logits,
            share_prompts=self.share_prompt_cache,
        )  # fmt: skip
        lengths = resp_mask.sum(-1).tolist()
        outputs[self.log_prob_key] = [log_probs[i, :n] for i, n in enumerate(lengths)]
        if self.return_logits:
            outputs[self.logits_key] = [
                logits[i, :n] if logits is not None else log_probs.new_zeros(0, 0)
                for i, n in enumerate(lengths)
            ]
        return outputs
