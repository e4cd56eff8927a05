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

import copy
from collections.abc import Sequence
from typing import Any, Literal

import torch
from tensordict import LazyStackedTensorDict, TensorDict, TensorDictBase, lazy_stack, set_list_to_stack
from tensordict.nn import TensorDictModuleBase
from transformers import GenerationConfig, PreTrainedTokenizerBase

from pipeline import chat
from pipeline.logprobs import (
    compute_dtype,
    pad_left,
    response_lengths,
    sequence_log_probs,
)

_GENERATE_EXTRAS = {"logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "streamer"}
_MANAGED = {
    "return_dict_in_generate": "the wrapper always reads generate()'s dict output",
    "output_logits": "pass return_logits=True to the wrapper",
    "output_scores": "log-probs are returned as 'log_probs'",
    "num_return_sequences": "pass num_samples=G to the wrapper (or to forward)",
    "stop_strings": "responses end at EOS ids only; add the stop token to eos_token_id",
    "tokenizer": "the wrapper's tokenizer is used",
}
# tokenizer_kwargs the wrapper controls itself, with the only values compatible with it.
_TOKENIZER_FIXED = {"padding": (True, "longest"), "padding_side": ("left",), "return_tensors": ("pt",),
                    "return_attention_mask": (True,)}  # fmt: skip
_TOKENIZER_FREE = {"add_special_tokens", "truncation", "max_length"}


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
        pad_output: must be ``True`` (inputs are run as padded batches); outputs are per-sample
            variable-length entries of a lazy stack.
        inplace: ``True`` writes the outputs into the input (a lazy stack or 0-dim tensordict; a
            dense batch is returned as a new lazy stack sharing its entries), ``False`` returns
            only the outputs, ``"empty"`` the outputs in ``input.empty()`` rows.
        chat_template_name: named torchrl template for history input (``"chatml_format"``, ``"qwen"``, ...).
        chat_template: custom Jinja chat template for history input.
        num_samples: generate G responses per prompt; the output batch shape is ``[*batch, G]``.
        log_probs_temperature: log-probs describe ``softmax(logits / T)``. The default 1.0 scores
            the raw model distribution; set it to the sampling temperature to score the
            distribution that sampled (top-k/top-p truncation is never part of it).
        return_logits: also return raw ``"logits"`` of the response positions (``[R, V]`` per sample).

    Keys: ``text``, ``history``, ``tokens``, ``attention_mask``, ``tokens_response``,
    ``text_response``, ``log_probs``, ``logits``. Read outputs with
    ``td.get(key, as_list=True)`` or ``td.get(key, as_padded_tensor=True, padding_side="right")``.
    """

    text_key = "text"
    history_key = "history"
    token_key = "tokens"
    token_response_key = "tokens_response"
    text_response_key = "text_response"
    attention_mask_key = "attention_mask"
    log_prob_key = "log_probs"
    logits_key = "logits"

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
    ) -> None:
        super().__init__()
        if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "generate", None)):
            raise TypeError(
                f"model must be a transformers causal LM (a torch.nn.Module with generate()), got {type(model).__name__}."
            )
        for name, value in {"from_text": from_text, "generate": generate, "pad_output": pad_output,
                            "return_logits": return_logits}.items():  # fmt: skip
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {value!r}.")
        if return_log_probs is not None and not isinstance(return_log_probs, bool):
            raise TypeError(f"return_log_probs must be a bool or None, got {return_log_probs!r}.")
        if not pad_output:
            raise ValueError(
                "pad_output=False is not supported: transformers models run on padded batches. Outputs are "
                "per-sample entries; read them padded with td.get(key, as_padded_tensor=True)."
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
        self.num_samples = _check_num_samples(num_samples, generate)
        if (
            isinstance(log_probs_temperature, bool)
            or not isinstance(log_probs_temperature, (int, float))
            or not log_probs_temperature > 0
        ):
            raise ValueError(
                f"log_probs_temperature must be a positive number, got {log_probs_temperature!r}."
            )

        self.model = model
        self.from_text = from_text
        self.generate = generate
        self.inplace = inplace
        self.pad_output = pad_output
        self.chat_template_name = chat_template_name
        self.chat_template = chat_template
        self.return_log_probs = (not generate) if return_log_probs is None else return_log_probs
        self.return_logits = return_logits
        self.log_probs_temperature = float(log_probs_temperature)
        self._device = torch.device(device) if device is not None else None
        self.tokenizer = _with_pad_token(tokenizer)
        self.tokenizer_kwargs = _check_tokenizer_kwargs(tokenizer_kwargs)
        self.pad_token_id = _pad_token_id(self.tokenizer, model)
        self.generation_config, self.generate_extras = self._base_generation(generate_kwargs)

        if from_text:
            self.in_keys = [self.text_key] if generate else [self.text_key, self.text_response_key]
        else:
            self.in_keys = [self.token_key, self.attention_mask_key]
            if not generate:
                self.in_keys.append(self.token_response_key)
        if generate:
            out = [self.token_key, self.attention_mask_key, self.token_response_key]
            if from_text:
                out += [self.text_key, self.text_response_key]
        else:
            out = [self.token_key, self.token_response_key] if from_text else []
        if self.return_log_probs:
            out.append(self.log_prob_key)
        if return_logits:
            out.append(self.logits_key)
        self.out_keys = out

    # ------------------------------------------------------------------ configuration
    @property
    def device(self) -> torch.device:
        return self._device if self._device is not None else next(self.model.parameters()).device

    def _base_generation(self, generate_kwargs: dict[str, Any] | None) -> tuple[GenerationConfig, dict]:
        if generate_kwargs is not None and not isinstance(generate_kwargs, dict):
            raise TypeError(f"generate_kwargs must be a dict, got {type(generate_kwargs).__name__}.")
        base = getattr(self.model, "generation_config", None)
        cfg = copy.deepcopy(base) if base is not None else GenerationConfig()
        cfg.pad_token_id = self.pad_token_id
        if cfg.eos_token_id is None and self.tokenizer is not None:
            cfg.eos_token_id = self.tokenizer.eos_token_id
        kwargs = dict(generate_kwargs or {})
        extras = {k: kwargs.pop(k) for k in list(kwargs) if k in _GENERATE_EXTRAS}
        if extras and not self.generate:
            raise ValueError(f"generate_kwargs {sorted(extras)} only apply when generate=True.")
        cfg = self._updated(cfg, kwargs, "generate_kwargs")
        cfg.return_dict_in_generate = True
        cfg.output_logits = self.return_logits
        return cfg, extras

    def _updated(self, cfg: GenerationConfig, kwargs: dict[str, Any], where: str) -> GenerationConfig:
        """A copy of ``cfg`` with ``kwargs`` applied, validated (errors name ``where``)."""
        for key, why in _MANAGED.items():
            if key in kwargs:
                raise ValueError(f"{where}[{key!r}] is managed by the wrapper: {why}.")
        cfg = copy.deepcopy(cfg)
        unknown = cfg.update(**kwargs)
        if unknown:
            raise ValueError(
                f"{where} has keys that are not transformers.GenerationConfig fields: {sorted(unknown)}."
            )
        _check_generation_config(cfg, where)
        if self.return_log_probs and (cfg.num_beams or 1) > 1:
            raise ValueError(f"{where}: num_beams > 1 is not supported with log-probs (sampled tokens only).")
        return cfg

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
        if not isinstance(tensordict, TensorDictBase):
            raise TypeError(f"TransformersWrapper expects a TensorDict, got {type(tensordict).__name__}.")
        if not self.generate and kwargs:
            raise ValueError(f"sampling arguments {sorted(kwargs)} only apply when generate=True.")
        cfg = (
            self._updated(self.generation_config, kwargs, "forward kwargs")
            if kwargs
            else self.generation_config
        )
        n_samples = (
            _check_num_samples(num_samples, self.generate) if num_samples is not None else self.num_samples
        )
        group = n_samples or 1

        batch_shape = tensordict.batch_size
        if len(batch_shape) == 0:
            flat = lazy_stack([tensordict])
        elif len(batch_shape) == 1:
            flat = tensordict
        else:
            flat = tensordict.reshape(-1)
        if flat.shape[0] == 0:
            raise ValueError("TransformersWrapper got an empty batch (batch_size has a 0 dimension).")

        with set_list_to_stack(True):
            if self.generate:
                prompts, texts = self._prompt_ids(flat)
                outputs = self._generate(prompts, cfg, group)
                if texts is not None:
                    outputs[self.text_key] = [t for t in texts for _ in range(group)]
            else:
                outputs = self._score(flat)
            out_device = tensordict.device
            rows = [TensorDict({k: v[j] for k, v in outputs.items()}, batch_size=[], device=out_device)
                    for j in range(flat.shape[0] * group)]  # fmt: skip
            result = self._assemble(tensordict, flat, rows, group, tensordict_out)
        out_shape = (*batch_shape, n_samples) if n_samples is not None else tuple(batch_shape)
        if len(out_shape) == 0:
            return result if isinstance(result, TensorDictBase) and result.ndim == 0 else result[0]
        if len(out_shape) == 1:
            return result
        return result.reshape(out_shape)

    def _assemble(self, tensordict, flat, rows, group, tensordict_out) -> TensorDictBase:
        if tensordict_out is not None:
            target = tensordict_out.reshape(-1) if tensordict_out.ndim > 1 else tensordict_out
            if target.ndim == 0:
                return target.update(rows[0])
            if not isinstance(target, LazyStackedTensorDict) or target.shape[0] != len(rows):
                raise ValueError(
                    "tensordict_out must be a lazy stack with one element per output "
                    f"({len(rows)}), got {type(tensordict_out).__name__} of shape {tuple(tensordict_out.shape)}."
                )
            for dst, row in zip(target.tensordicts, rows):
                dst.update(row)
            return target
        if self.inplace is False:
            return lazy_stack(rows)
        if self.inplace == "empty":
            return lazy_stack([flat[j // group].empty().update(row) for j, row in enumerate(rows)])
        if group == 1 and tensordict.ndim == 0:
            return tensordict.update(rows[0])
        if group == 1 and isinstance(flat, LazyStackedTensorDict) and flat.stack_dim == 0:
            for dst, row in zip(flat.tensordicts, rows):
                dst.update(row)
            return flat
        # A dense batch cannot hold per-sample variable-length entries: new rows share its entries.
        return lazy_stack([flat[j // group].copy().update(row) for j, row in enumerate(rows)])

    # ------------------------------------------------------------------ inputs
    def _prompt_ids(self, flat: TensorDictBase) -> tuple[list[torch.Tensor], list[str] | None]:
        if self.from_text:
            texts = self._prompt_texts(flat)
            return self._tokenize(texts, self.text_key, special=True), texts
        return self._token_lists(flat, self.token_key, mask_key=self.attention_mask_key), None

    def _prompt_texts(self, flat: TensorDictBase) -> list[str]:
        text = flat.get(self.text_key, None)
        if text is not None:
            return _as_str_list(text, self.text_key, flat.shape[0])
        history = flat.get(self.history_key, None)
        if history is None:
            raise ValueError(
                f"input has neither {self.text_key!r} nor {self.history_key!r} (from_text=True)."
            )
        return chat.render_prompts(history, self.tokenizer, self.chat_template_name, self.chat_template)

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
        bos = _bos_token_id(self.tokenizer, self.model)
        if bos is None:
            raise ValueError(
                f"{key}[{index}] is empty and neither the tokenizer nor the model defines a BOS token "
                "to start from; give a non-empty prompt."
            )
        return torch.tensor([bos], dtype=torch.long, device=self.device)

    def _token_lists(self, flat: TensorDictBase, key: str, *, mask_key: str | None) -> list[torch.Tensor]:
        if key not in flat.keys():
            raise ValueError(f"input is missing {key!r} (from_text=False).")
        seqs = _as_tensor_list(flat.get(key, as_list=True), key)
        masks = None
        if mask_key is not None and mask_key in flat.keys():
            masks = _as_tensor_list(flat.get(mask_key, as_list=True), mask_key)
        vocab = _vocab_size(self.model, self.tokenizer)
        out = []
        for i, ids in enumerate(seqs):
            if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
                raise TypeError(f"{key} must hold integer token ids, got dtype {ids.dtype}.")
            if ids.ndim != 1:
                raise ValueError(f"{key}[{i}] must be 1-D per sample, got shape {tuple(ids.shape)}.")
            if masks is not None:
                if masks[i].shape != ids.shape:
                    raise ValueError(
                        f"{mask_key}[{i}] has shape {tuple(masks[i].shape)}, {key}[{i}] {tuple(ids.shape)}."
                    )
                ids = ids[masks[i].bool()]
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
                raise ValueError(
                    f"{key}[{i}] has token ids outside the vocabulary [0, {vocab}): min {int(ids.min())}, max {int(ids.max())}."
                )
            ids = ids.to(device=self.device, dtype=torch.long)
            out.append(self._with_bos(ids, key, i) if key == self.token_key else ids)
        return out

    # ------------------------------------------------------------------ generate
    def _generate(self, prompts: list[torch.Tensor], cfg: GenerationConfig, group: int) -> dict[str, list]:
        if group > 1:
            prompts = [p for p in prompts for _ in range(group)]
        input_ids, mask = pad_left(prompts, self.pad_token_id)
        recorder = _StepLogProbs(self.log_probs_temperature) if self.return_log_probs else None
        handle = self.model.register_forward_hook(recorder, with_kwargs=True) if recorder else None
        try:
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=input_ids,
                    attention_mask=mask.long(),
                    generation_config=cfg,
                    **self.generate_extras,
                )
        finally:
            if handle is not None:
                handle.remove()
        seqs = out.sequences[:, input_ids.shape[1] :]
        lengths = response_lengths(seqs, cfg.eos_token_id).tolist()
        responses = [seqs[i, :n] for i, n in enumerate(lengths)]
        outputs: dict[str, list] = {
            self.token_key: prompts,
            self.attention_mask_key: [torch.ones_like(p) for p in prompts],
            self.token_response_key: responses,
        }
        if self.from_text:
            outputs[self.text_response_key] = self.tokenizer.batch_decode(
                responses, skip_special_tokens=False
            )
        if recorder is not None:
            log_probs = recorder.finish(seqs)
            outputs[self.log_prob_key] = [log_probs[i, :n] for i, n in enumerate(lengths)]
        if self.return_logits:
            logits = torch.stack(out.logits, 1)
            outputs[self.logits_key] = [logits[i, :n] for i, n in enumerate(lengths)]
        return outputs

    # ------------------------------------------------------------------ score
    def _score(self, flat: TensorDictBase) -> dict[str, list]:
        outputs: dict[str, list] = {}
        if self.from_text:
            prompt_txt, response_txt = self._score_texts(flat)
            prompts = self._tokenize(prompt_txt, self.text_key, special=True)
            responses = self._tokenize(response_txt, self.text_response_key, special=False)
            outputs[self.token_key] = prompts
            outputs[self.token_response_key] = responses
        else:
            missing = [k for k in (self.token_key, self.token_response_key) if k not in flat.keys()]
            if missing:
                raise ValueError(
                    f"score mode (generate=False, from_text=False) needs keys {missing} in the input."
                )
            prompts = self._token_lists(flat, self.token_key, mask_key=self.attention_mask_key)
            responses = self._token_lists(flat, self.token_response_key, mask_key=None)
        log_probs, resp_mask, logits = sequence_log_probs(
            self.model, prompts, responses, pad_token_id=self.pad_token_id,
            temperature=self.log_probs_temperature, return_logits=self.return_logits,
        )  # fmt: skip
        lengths = resp_mask.sum(-1).tolist()
        outputs[self.log_prob_key] = [log_probs[i, :n] for i, n in enumerate(lengths)]
        if self.return_logits:
            outputs[self.logits_key] = [
                logits[i, :n] if logits is not None else log_probs.new_zeros(0, 0)
                for i, n in enumerate(lengths)
            ]
        return outputs

    def _score_texts(self, flat: TensorDictBase) -> tuple[list[str], list[str]]:
        n = flat.shape[0]
        text, response = flat.get(self.text_key, None), flat.get(self.text_response_key, None)
        history = flat.get(self.history_key, None)
        if response is not None and text is None and history is None:
            raise ValueError(
                f"score mode got {self.text_response_key!r} without a prompt: give {self.text_key!r} or {self.history_key!r}."
            )
        if text is not None and response is None:
            raise ValueError(
                f"score mode got {self.text_key!r} without {self.text_response_key!r}: both are needed."
            )
        if text is not None:
            return _as_str_list(text, self.text_key, n), _as_str_list(response, self.text_response_key, n)
        if history is None:
            raise ValueError(
                f"score mode needs {self.text_key!r} + {self.text_response_key!r}, or {self.history_key!r}."
            )
        if response is not None:
            prompts = chat.render_prompts(
                history, self.tokenizer, self.chat_template_name, self.chat_template
            )
            return prompts, _as_str_list(response, self.text_response_key, n)
        return chat.render_prompt_response(
            history, self.tokenizer, self.chat_template_name, self.chat_template
        )


class _StepLogProbs:
    """Forward hook that keeps, per generation step, only the log-prob of the sampled token.

    Each model call during ``generate`` yields next-token logits; their log-softmax is held until
    the next call, whose input is the token sampled from them, and then reduced to one number
    per row. Memory is one ``[B, V]`` tensor instead of ``B x T x V``. The logits are the model's
    raw output (before any logits processor), divided by ``temperature``, the same distribution
    that score mode computes.
    """

    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, module, args, kwargs, output) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.pending is not None:
            if ids is None:
                raise ValueError(
                    "log-probs during generation need input_ids in each model call (got embeddings)."
                )
            self.steps.append(self.pending.gather(-1, ids[:, -1:]).squeeze(-1))
        logits = output.logits[:, -1]
        x = logits.to(compute_dtype(logits.dtype))
        if self.temperature != 1.0:
            x = x / self.temperature
        self.pending = torch.log_softmax(x, -1)

    def finish(self, sequences: torch.Tensor) -> torch.Tensor:
        """``[B, N]`` log-probs of the generated ``sequences`` (steps past ``N`` are dropped)."""
        n = sequences.shape[1]
        steps = self.steps[:n]
        if len(steps) < n and self.pending is not None:
            steps.append(self.pending.gather(-1, sequences[:, len(steps) : len(steps) + 1]).squeeze(-1))
        self.pending = None
        if not steps:
            return sequences.new_zeros(sequences.shape, dtype=torch.float32)
        return torch.stack(steps, 1)


# ---------------------------------------------------------------------- helpers
def _check_num_samples(num_samples: Any, generate: bool) -> int | None:
    if num_samples is None:
        return None
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}.")
    if not generate:
        raise ValueError("num_samples only applies when generate=True.")
    return num_samples


def _check_generation_config(cfg: GenerationConfig, where: str) -> None:
    checks = {
        "max_new_tokens": (cfg.max_new_tokens, lambda v: isinstance(v, int) and v > 0, "a positive int"),
        "min_new_tokens": (cfg.min_new_tokens, lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
        "temperature": (
            cfg.temperature,
            lambda v: isinstance(v, (int, float)) and v > 0,
            "a positive number",
        ),
        "top_p": (cfg.top_p, lambda v: isinstance(v, (int, float)) and 0 < v <= 1, "a number in (0, 1]"),
        "top_k": (cfg.top_k, lambda v: isinstance(v, int) and v >= 0, "an int >= 0"),
        "num_beams": (cfg.num_beams, lambda v: isinstance(v, int) and v >= 1, "an int >= 1"),
    }
    for key, (value, ok, expected) in checks.items():
        if value is not None and (isinstance(value, bool) or not ok(value)):
            raise ValueError(f"{where}[{key!r}] must be {expected}, got {value!r}.")
    try:
        cfg.validate(strict=True)
    except TypeError:  # older transformers: no `strict`
        cfg.validate()
    except ValueError as err:
        raise ValueError(f"{where}: invalid generation arguments: {err}") from err


def _check_tokenizer_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise TypeError(f"tokenizer_kwargs must be a dict, got {type(kwargs).__name__}.")
    out = {}
    for key, value in kwargs.items():
        if key in _TOKENIZER_FIXED:
            if value not in _TOKENIZER_FIXED[key]:
                raise ValueError(
                    f"tokenizer_kwargs[{key!r}] must be {_TOKENIZER_FIXED[key][0]!r} (the wrapper pads itself), got {value!r}."
                )
        elif key in _TOKENIZER_FREE:
            out[key] = value
        else:
            raise ValueError(
                f"tokenizer_kwargs[{key!r}] is not supported; allowed keys: {sorted(_TOKENIZER_FREE)}."
            )
    return out


def _with_pad_token(tokenizer: PreTrainedTokenizerBase | None) -> PreTrainedTokenizerBase | None:
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


def _pad_token_id(tokenizer: PreTrainedTokenizerBase | None, model: torch.nn.Module) -> int:
    if tokenizer is not None:
        return int(tokenizer.pad_token_id)
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)):
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0  # any id works: padding is always masked out


def _bos_token_id(tokenizer: PreTrainedTokenizerBase | None, model: torch.nn.Module) -> int | None:
    if tokenizer is not None and tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    bos = getattr(getattr(model, "config", None), "bos_token_id", None)
    return int(bos) if isinstance(bos, int) else None


def _vocab_size(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase | None) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "num_embeddings"):
        return int(emb.num_embeddings)
    return len(tokenizer) if tokenizer is not None else int(model.config.vocab_size)


def _as_str_list(value: Any, key: str, n: int) -> list[str]:
    if isinstance(value, str):
        value = [value]
    elif hasattr(value, "tolist"):
        value = value.tolist()
    value = list(value)
    if len(value) != n or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{key} must hold one string per batch element ({n}), got {value!r:.200}.")
    return value


def _as_tensor_list(value: Any, key: str) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0))
    if isinstance(value, Sequence) and all(isinstance(v, torch.Tensor) for v in value):
        return list(value)
    raise TypeError(f"{key} must hold token id tensors, got {type(value).__name__}.")
