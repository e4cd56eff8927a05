"""VLLMWrapper: vLLM as the rollout engine, behind the generate-mode contract of ``TransformersWrapper``.

Input ``text`` / ``history`` / ``tokens``; output ``tokens``, ``attention_mask``, ``tokens_response``,
``text_response`` and the behaviour ``log_probs``, ``[*batch, G]`` with ``num_samples=G``, in the layout of
the container, as the Hugging Face wrapper does (:mod:`pipeline.policy_layout`): a lazy stack gets one
row of per-sample entries per sample; a dense ``TensorDict`` gets padded tensors (``tokens``
left-padded with ``attention_mask``; ``tokens_response`` and ``log_probs`` right-padded with
``tokens_response_mask`` and ``log_probs_mask``). Scoring and training stay on the Hugging Face model; the engine holds its own copy of
the weights, refreshed by ``sync_weights(model)`` (full state each time) after optimizer steps.

Which distribution ``log_probs`` describe, as in the Hugging Face wrapper: ``log_softmax(logits / T)``
of the model's logits, ``T = log_probs_temperature``, before any top-k/top-p truncation or penalty,
whatever the sampling arguments. vLLM's ``logprobs_mode="raw_logprobs"`` (its default) returns the
sampled token's ``log_softmax(logits)``, i.e. ``T = 1``; its ``processed_logprobs`` mode includes the
sampling temperature but also the truncation and penalties, and drops the temperature when greedy. So for
``T != 1`` the engine multiplies the scale of vLLM's ``LogitsProcessor`` layer by ``1/T`` (raw log-probs
are then ``log_softmax(logits / T)``) and samples at ``temperature / T``: the sampled distribution, top-k,
top-p, min-p, repetition penalty and greedy choices are unchanged by that rescaling.

In-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) with its own torch RNG stream: the engine neither
re-seeds nor advances the trainer's RNG. vLLM is an optional extra (``make install-vllm``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from tensordict import LazyStackedTensorDict, TensorDict, TensorDictBase, lazy_stack, set_list_to_stack
from tensordict.nn import TensorDictModuleBase
from transformers import AutoConfig, GenerationConfig, PreTrainedTokenizerBase

from pipeline import chat
from pipeline.logprobs import response_lengths, sequence_log_probs
from pipeline.policy_args import (
    as_str_list,
    as_tensor_list,
    check_num_samples,
    check_tokenizer_kwargs,
    checked_token_ids,
    with_pad_token,
)
from pipeline.policy_layout import assemble_rows, dense_outputs, place_dense
from pipeline.vllm_args import (
    base_generation_config,
    check_engine_args,
    sampling_params,
    scale_logits,
    start_engine,
    updated_config,
)


class VLLMWrapper(TensorDictModuleBase):
    """A vLLM engine for generation, with the ``TransformersWrapper`` generate-mode contract.

    Args:
        model_path: a Hugging Face model folder (``save_pretrained`` output); the engine loads it.

    Keyword Args:
        tokenizer: tokenizes text/history prompts and decodes ``text_response`` (vLLM never tokenizes).
        from_text, generate_kwargs, tokenizer_kwargs, inplace, chat_template_name, chat_template,
        num_samples, log_probs_temperature, skip_special_tokens: as for ``TransformersWrapper`` in generate
            mode. ``generate_kwargs`` (and ``forward`` kwargs) are ``GenerationConfig`` fields over the
            folder's ``generation_config.json``, unset ones at transformers' defaults (``top_k=50``);
            the engine honours ``max_new_tokens``, ``min_new_tokens``, ``do_sample``, ``temperature``,
            ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty`` and every ``eos_token_id``.
        return_log_probs: return the behaviour ``log_probs`` (default ``True``).
        dtype: the engine's weights and compute dtype (``torch.float32`` matches an fp32 trainer).
        enforce_eager: no torch.compile (start-up about 5 s on CPU; compiled about 80 s).
        seed: seed of the engine's own RNG stream.
        kv_cache_gib: KV cache size on CPU, in GiB.
        gpu_memory_utilization: fraction of the GPU memory the engine takes (CUDA; weights + KV cache).
        max_model_len: context length (default: the model's).
        engine_kwargs: any other ``vllm.LLM`` arguments.
        llm: the ``llm`` of another ``VLLMWrapper`` of the same folder to share (e.g. sampling and greedy
            evaluation on one engine); the engine arguments above are then unused. Its
            ``log_probs_temperature`` is engine-wide and must be the same.
    """

    text_key, history_key, token_key = "text", "history", "tokens"
    token_response_key, text_response_key = "tokens_response", "text_response"
    attention_mask_key, log_prob_key = "attention_mask", "log_probs"
    token_response_mask_key, log_prob_mask_key = "tokens_response_mask", "log_probs_mask"
    mask_keys: ClassVar[dict[str, str]] = {
        token_response_key: token_response_mask_key,
        log_prob_key: log_prob_mask_key,
    }
    generate = True

    def __init__(
        self,
        model_path: str | Path,
        *,
        tokenizer: PreTrainedTokenizerBase,
        from_text: bool = True,
        generate_kwargs: dict[str, Any] | None = None,
        tokenizer_kwargs: dict[str, Any] | None = None,
        inplace: Literal[True, False, "empty"] = True,
        chat_template_name: str | None = None,
        chat_template: str | None = None,
        num_samples: int | None = None,
        return_log_probs: bool = True,
        log_probs_temperature: float = 1.0,
        skip_special_tokens: bool = False,
        dtype: torch.dtype | str = torch.float32,
        enforce_eager: bool = True,
        seed: int = 0,
        kv_cache_gib: float = 2.0,
        gpu_memory_utilization: float | None = None,
        max_model_len: int | None = None,
        engine_kwargs: dict[str, Any] | None = None,
        llm: Any = None,
    ) -> None:
        super().__init__()
        path = Path(model_path)
        flags = {
            "from_text": from_text,
            "return_log_probs": return_log_probs,
            "skip_special_tokens": skip_special_tokens,
            "enforce_eager": enforce_eager,
        }
        check_engine_args(path, tokenizer, flags, inplace, log_probs_temperature)
        chat.check_template_args(chat_template_name, chat_template)
        self.num_samples = check_num_samples(num_samples, True)
        self.model_path, self.from_text, self.inplace, self.dtype = path, from_text, inplace, dtype
        self.chat_template_name, self.chat_template = chat_template_name, chat_template
        self.return_log_probs, self.skip_special_tokens = return_log_probs, skip_special_tokens
        self.log_probs_temperature = float(log_probs_temperature)
        self.tokenizer = with_pad_token(tokenizer)
        self.tokenizer_kwargs = check_tokenizer_kwargs(tokenizer_kwargs)
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.model_config = AutoConfig.from_pretrained(path)
        self.generation_config = base_generation_config(
            path, self.model_config, self.tokenizer, generate_kwargs, return_log_probs
        )
        self.in_keys = [self.text_key] if from_text else [self.token_key, self.attention_mask_key]
        out = [self.token_key, self.attention_mask_key, self.token_response_key]
        out += [self.text_key, self.text_response_key] if from_text else []
        self.out_keys = [*out, self.log_prob_key] if return_log_probs else out

        if llm is None:
            llm = self._start(
                dtype=dtype,
                enforce_eager=enforce_eager,
                seed=seed,
                kv_cache_gib=kv_cache_gib,
                gpu_memory_utilization=gpu_memory_utilization,
                max_model_len=max_model_len,
                engine_kwargs=engine_kwargs or {},
            )
        self.llm = llm
        shared_t = getattr(self.llm, "log_probs_temperature", 1.0)  # a plain vllm.LLM: T = 1
        if shared_t != self.log_probs_temperature:
            raise ValueError(
                f"log_probs_temperature={self.log_probs_temperature} but the shared engine scores at {shared_t}."
            )
        self._rng_state = torch.Generator().manual_seed(seed).get_state()
        self.syncs, self.last_sync_s = 0, 0.0

    def _start(self, *, max_model_len: int | None, engine_kwargs: dict[str, Any], **kwargs: Any) -> Any:
        """Start the engine; for ``T != 1`` its logits layer is scaled by ``1/T`` (module docstring)."""
        if max_model_len is not None:
            engine_kwargs = {"max_model_len": max_model_len, **engine_kwargs}
        llm = start_engine(self.model_path, **{**kwargs, **engine_kwargs})
        scale = 1.0 / self.log_probs_temperature
        if scale != 1.0 and not all(llm.collective_rpc(scale_logits, args=(scale,))):
            raise ValueError(
                "log_probs_temperature != 1 needs vLLM's LogitsProcessor layer; the model has none."
            )
        llm.log_probs_temperature = self.log_probs_temperature
        return llm

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        tensordict: TensorDictBase,
        tensordict_out: TensorDictBase | None = None,
        *,
        num_samples: int | None = None,
        **kwargs: Any,
    ) -> TensorDictBase:
        """Generate for every element of ``tensordict`` (any batch shape); ``kwargs`` override for this call."""
        if not isinstance(tensordict, TensorDictBase):
            raise TypeError(f"VLLMWrapper expects a TensorDict, got {type(tensordict).__name__}.")
        cfg = self.generation_config
        if kwargs:
            cfg = updated_config(cfg, kwargs, "forward kwargs", self.return_log_probs)
        n_samples = check_num_samples(num_samples, True) if num_samples is not None else self.num_samples
        group = n_samples or 1
        batch_shape = tensordict.batch_size
        if len(batch_shape) == 0:
            flat = lazy_stack([tensordict])
        else:
            flat = tensordict if len(batch_shape) == 1 else tensordict.reshape(-1)
        if flat.shape[0] == 0:
            raise ValueError("VLLMWrapper got an empty batch (batch_size has a 0 dimension).")
        out_shape = (*batch_shape, n_samples) if n_samples is not None else tuple(batch_shape)
        dense = not isinstance(
            tensordict if tensordict_out is None else tensordict_out, LazyStackedTensorDict
        )
        if dense and tensordict_out is not None and tensordict_out.numel() != flat.shape[0] * group:
            raise ValueError(
                f"tensordict_out must have one element per output ({flat.shape[0] * group}), got "
                f"{type(tensordict_out).__name__} of batch size {tuple(tensordict_out.shape)}."
            )
        with set_list_to_stack(True):
            prompts, texts = self._prompt_ids(flat)
            outputs = self.generate_ids(prompts, cfg, group)
            if texts is not None:
                outputs[self.text_key] = [t for t in texts for _ in range(group)]
            if dense:  # padded tensors, placed as the Hugging Face wrapper places them
                out = dense_outputs(outputs, self, tensordict.device)
                args = (self.inplace, out_shape, n_samples)
                return place_dense(out, tensordict, tensordict, tensordict_out, *args)
            rows = [
                TensorDict({k: v[j] for k, v in outputs.items()}, batch_size=[], device=tensordict.device)
                for j in range(flat.shape[0] * group)
            ]
            result = self._assemble(flat, rows, group, tensordict_out)
        if len(out_shape) == 0:
            return result if result.ndim == 0 else result[0]
        return result if len(out_shape) == 1 else result.reshape(out_shape)

    def generate_ids(
        self, prompts: Sequence[torch.Tensor], cfg: GenerationConfig | None = None, group: int = 1
    ) -> dict[str, list]:
        """Sample ``group`` responses for each prompt (1-D id tensors): per-sample lists, prompt-major."""
        cfg = cfg or self.generation_config
        if not cfg.do_sample and group > 1:  # vLLM takes n > 1 only when sampling: repeat the prompts
            prompts, group = [p for p in prompts for _ in range(group)], 1
        params = [
            sampling_params(
                cfg,
                len(p),
                group,
                log_probs=self.return_log_probs,
                log_probs_temperature=self.log_probs_temperature,
            )
            for p in prompts
        ]
        with self._own_rng():
            requests = [{"prompt_token_ids": p.tolist()} for p in prompts]
            results = self.llm.generate(requests, params, use_tqdm=False)
        responses, log_probs = [], []
        for result in results:
            for sample in sorted(result.outputs, key=lambda c: c.index):
                ids = torch.tensor(list(sample.token_ids), dtype=torch.long)
                n = int(response_lengths(ids[None], cfg.eos_token_id)[0])  # the first EOS is kept
                responses.append(ids[:n])
                if self.return_log_probs:
                    lp = [step[t].logprob for step, t in zip(sample.logprobs[:n], sample.token_ids[:n])]
                    log_probs.append(torch.tensor(lp, dtype=torch.float32))
        prompts = [p.cpu() for p in prompts for _ in range(group)]
        outputs: dict[str, list] = {
            self.token_key: prompts,
            self.token_response_key: responses,
            self.attention_mask_key: [torch.ones_like(p) for p in prompts],
        }
        if self.from_text:
            outputs[self.text_response_key] = self.tokenizer.batch_decode(
                responses, skip_special_tokens=self.skip_special_tokens
            )
        if self.return_log_probs:
            outputs[self.log_prob_key] = log_probs
        return outputs

    def _assemble(self, flat, rows, group, tensordict_out) -> TensorDictBase:
        """Lazy-stack layout (:func:`pipeline.policy_layout.assemble_rows`): one row per sample."""
        if tensordict_out is not None:
            target = tensordict_out.reshape(-1) if tensordict_out.ndim > 1 else tensordict_out
            if target.shape[0] != len(rows):
                raise ValueError(
                    f"tensordict_out must be a lazy stack with one element per output ({len(rows)}), "
                    f"got {type(tensordict_out).__name__} of shape {tuple(tensordict_out.shape)}."
                )
            return assemble_rows(flat, rows, group, self.inplace, target)
        return assemble_rows(flat, rows, group, self.inplace, None)

    # ------------------------------------------------------------------ inputs
    def _prompt_ids(self, flat: TensorDictBase) -> tuple[list[torch.Tensor], list[str] | None]:
        if not self.from_text:
            if self.token_key not in flat.keys():
                raise ValueError(f"input is missing {self.token_key!r} (from_text=False).")
            seqs = as_tensor_list(flat.get(self.token_key, as_list=True), self.token_key)
            masks = None
            if self.attention_mask_key in flat.keys():
                masks = as_tensor_list(
                    flat.get(self.attention_mask_key, as_list=True), self.attention_mask_key
                )
            vocab = int(self.model_config.vocab_size)
            ids = checked_token_ids(seqs, masks, self.token_key, self.attention_mask_key, vocab)
            return [self._with_bos(x.cpu().long(), self.token_key, i) for i, x in enumerate(ids)], None
        if flat.get(self.text_key, None) is not None:
            texts = as_str_list(flat.get(self.text_key), self.text_key, flat.shape[0])
        elif flat.get(self.history_key, None) is not None:
            history = flat.get(self.history_key)
            texts = chat.render_prompts(history, self.tokenizer, self.chat_template_name, self.chat_template)
        else:
            raise ValueError(
                f"input has neither {self.text_key!r} nor {self.history_key!r} (from_text=True)."
            )
        return self._tokenize(texts, self.text_key), texts

    def _tokenize(self, texts: list[str], key: str) -> list[torch.Tensor]:
        kwargs = {"add_special_tokens": True, **self.tokenizer_kwargs}
        ids = self.tokenizer(texts, **kwargs)["input_ids"]
        return [self._with_bos(torch.tensor(x, dtype=torch.long), key, i) for i, x in enumerate(ids)]

    def _with_bos(self, ids: torch.Tensor, key: str, index: int) -> torch.Tensor:
        """An empty prompt gets the BOS token, as in ``TransformersWrapper``."""
        if ids.numel():
            return ids
        bos = self.tokenizer.bos_token_id
        bos = bos if bos is not None else getattr(self.model_config, "bos_token_id", None)
        if not isinstance(bos, int):
            raise ValueError(f"{key}[{index}] is empty and no BOS token is defined to start from.")
        return torch.tensor([bos], dtype=torch.long)

    # ------------------------------------------------------------------ weights
    def sync_weights(self, model: torch.nn.Module | Mapping[str, torch.Tensor]) -> float:
        """Load the full state of ``model`` (the trainer's Hugging Face model) into the engine; seconds taken.

        Always the whole state dict, in Hugging Face (checkpoint) names: vLLM fuses q/k/v and gate/up
        projections, and a partial push returns no error but corrupts them. The prefix cache (KV of
        the old weights) is reset.
        """
        state = model.state_dict() if isinstance(model, torch.nn.Module) else model
        if not isinstance(state, Mapping) or not state:
            raise TypeError(
                f"sync_weights needs a torch module or a non-empty state dict, got {type(model).__name__}."
            )
        start = time.perf_counter()
        weights = [(name, t.detach()) for name, t in state.items()]
        self.llm.collective_rpc(
            "reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True}
        )
        self.llm.reset_prefix_cache()
        self.syncs, self.last_sync_s = self.syncs + 1, time.perf_counter() - start
        return self.last_sync_s

    def verify_sync(
        self,
        model: torch.nn.Module,
        prompts: Sequence[str] | None = None,
        *,
        max_new_tokens: int = 16,
        atol: float | None = 1e-4,
    ) -> dict[str, float]:
        """Sample from the engine, score the same tokens with ``model``: max and mean |Δ log-prob|.

        Raises ``RuntimeError`` when the max exceeds ``atol`` (``None``: report only). An fp32 engine
        and fp32 model agree to about 1e-5; a bf16 engine differs by 0.1 or more.
        """
        ids = self._tokenize(list(prompts or ["Hello", "The answer is", "1 + 2 ="]), "prompts")
        cfg = updated_config(self.generation_config, {"max_new_tokens": max_new_tokens}, "verify_sync", True)
        out = self.generate_ids(ids, cfg, 1)
        device = next(model.parameters()).device
        with torch.no_grad():
            lp, mask, _ = sequence_log_probs(
                model,
                [p.to(device) for p in ids],
                [r.to(device) for r in out[self.token_response_key]],
                pad_token_id=self.pad_token_id,
                temperature=self.log_probs_temperature,
            )
        engine = torch.nn.utils.rnn.pad_sequence(out[self.log_prob_key], batch_first=True).to(lp)
        diff = (lp - engine).abs()[mask]
        stats = {
            "max_abs_diff": float(diff.max()),
            "mean_abs_diff": float(diff.mean()),
            "tokens": int(mask.sum()),
        }
        if atol is not None and stats["max_abs_diff"] > atol:
            raise RuntimeError(f"engine and trainer log-probs differ: {stats} (atol {atol}).")
        return stats

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        """vLLM samples from torch's global CPU RNG: give it the engine's stream, keep the caller's."""
        saved = torch.get_rng_state()
        torch.set_rng_state(self._rng_state)
        try:
            yield
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(saved)
