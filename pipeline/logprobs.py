"""Pure tensor functions for log-probabilities, positions and response masks.

These are the numerical core shared by the wrapper and the training loop. They take tensors and
return tensors; masks are always built from lengths and positions, never by comparing token values
(a pad token may equal the EOS token, as in GPT-2 and Qwen).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline import lm_head, prefix  # module imports: both import this module too

# Rows of the flattened [N, V] logits processed at once: bounds the temporaries of the
# log-softmax to about 2**25 elements whatever the batch and vocabulary.
_CHUNK_ELEMENTS = 2**25


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype for log-prob math: at least float32 (bf16/fp16 logits are upcast), float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only: ``cumsum(mask) - 1`` (0 on padding).

    Models with absolute positions (GPT-2) must see the same positions when scoring a padded
    batch as when generating from it, whatever the padding side.
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp_(min=0)


def lengths_to_mask(lengths: torch.Tensor, max_len: int, *, left: bool = False) -> torch.Tensor:
    """Boolean ``[B, max_len]`` mask with ``lengths[b]`` True entries, right- or left-aligned."""
    ar = torch.arange(max_len, device=lengths.device)
    if left:
        return ar.unsqueeze(0) >= (max_len - lengths).unsqueeze(1)
    return ar.unsqueeze(0) < lengths.unsqueeze(1)


def response_lengths(
    tokens: torch.Tensor, eos_token_ids: torch.Tensor | Sequence[int] | None
) -> torch.Tensor:
    """Length of each generated response, its first EOS included.

    ``tokens`` is ``[B, N]`` as returned by generation (anything after the first EOS is filler).
    A row without EOS was truncated and keeps all ``N`` tokens.
    """
    n = tokens.shape[-1]
    if eos_token_ids is None or n == 0:
        return torch.full(tokens.shape[:-1], n, dtype=torch.long, device=tokens.device)
    eos = torch.as_tensor(eos_token_ids, device=tokens.device).reshape(-1)
    is_eos = torch.isin(tokens, eos)
    first = is_eos.long().argmax(-1)
    return torch.where(is_eos.any(-1), first + 1, torch.full_like(first, n))


def pad_left(seqs: Sequence[torch.Tensor], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad 1-D sequences into ``[B, L]`` ids and a boolean attention mask."""
    lengths = torch.tensor([len(s) for s in seqs], device=seqs[0].device)
    ids = torch.nn.utils.rnn.pad_sequence(
        list(seqs), batch_first=True, padding_value=pad_value, padding_side="left"
    )
    return ids, lengths_to_mask(lengths, ids.shape[1], left=True)


def pad_right(seqs: Sequence[torch.Tensor], pad_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences (1-D or more) into a batch and a boolean ``[B, L]`` mask."""
    lengths = torch.tensor([len(s) for s in seqs], device=seqs[0].device)
    out = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True, padding_value=pad_value)
    return out, lengths_to_mask(lengths, out.shape[1])


def token_log_probs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``tokens``, without a full-vocab copy.

    ``logits`` is ``[..., V]`` and ``tokens`` its leading shape. The log-softmax is computed as
    ``x[token] - logsumexp(x)`` over row chunks, so no ``[..., V]`` log-prob tensor is ever
    materialised beyond one chunk. Differentiable. The result has the compute dtype
    (float32 for half-precision logits, float64 for float64 logits).
    """
    vocab = logits.shape[-1]
    flat = logits.reshape(-1, vocab)
    idx = tokens.reshape(-1, 1).to(device=logits.device, dtype=torch.long)
    dtype = compute_dtype(logits.dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    parts = []
    for start in range(0, flat.shape[0], rows):
        x = flat[start : start + rows].to(dtype)
        if temperature != 1.0:
            x = x / temperature
        parts.append(x.gather(-1, idx[start : start + rows]).squeeze(-1) - x.logsumexp(-1))
    if not parts:
        return torch.zeros(tokens.shape, dtype=dtype, device=logits.device)
    return torch.cat(parts).reshape(tokens.shape)


def sequence_log_probs(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    *,
    pad_token_id: int,
    temperature: float = 1.0,
    return_logits: bool = False,
    share_prompts: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Score ``responses`` given ``prompts`` with one forward pass of ``model``.

    Layout: prompts left-padded, responses right-padded behind them, ``position_ids`` from the
    mask. Only the logits that predict response tokens are computed (``logits_to_keep`` where the
    model supports it). ``share_prompts``: rows with the same prompt run it once
    (:mod:`pipeline.prefix`). Returns right-padded log-probs ``[B, R]``, the response mask ``[B, R]``,
    and the matching raw logits ``[B, R, V]`` when ``return_logits``.
    """
    device = prompts[0].device
    prompt_ids, prompt_mask = pad_left(prompts, pad_token_id)
    if any(len(r) for r in responses):
        resp_ids, resp_mask = pad_right([r.to(device) for r in responses], pad_token_id)
    else:
        resp_ids = torch.zeros(len(responses), 0, dtype=torch.long, device=device)
        resp_mask = resp_ids.bool()
    n_resp = resp_ids.shape[1]
    if n_resp == 0:
        empty = torch.zeros(len(prompts), 0, dtype=compute_dtype(_model_dtype(model)), device=device)
        return empty, resp_mask, None
    # the last response token predicts nothing scored: it is not fed, so the R positions kept (the last
    # prompt token and every response token but the last) are the ones that predict the R responses
    input_ids = torch.cat([prompt_ids, resp_ids[:, :-1]], 1)
    mask = torch.cat([prompt_mask, resp_mask[:, :-1]], 1)
    kwargs = {"use_cache": False}
    keep = n_resp
    if supports_logits_to_keep(model):
        kwargs["logits_to_keep"] = keep
    inputs = dict(input_ids=input_ids, attention_mask=mask.long(), position_ids=position_ids_from_mask(mask))
    head = None if return_logits else lm_head.head_of(model)
    call = head.hidden if head is not None else lambda **kw: model(**kw).logits
    out = None
    if share_prompts:
        out = prefix.shared_forward(model, inputs, prompt_ids.shape[1], call=call)
    if out is None:
        out = call(**inputs, **kwargs)
    if head is not None:  # the LM head in chunks at real response positions only (pipeline.lm_head)
        hidden = out[:, -keep:]
        lp = head.log_probs(hidden[resp_mask], resp_ids[resp_mask], temperature)
        return hidden.new_zeros(resp_ids.shape, dtype=lp.dtype).masked_scatter(resp_mask, lp), resp_mask, None
    logits = out[:, -keep:]
    log_probs = token_log_probs(logits, resp_ids, temperature)
    return log_probs, resp_mask, logits if return_logits else None


class StepLogProbs:
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


def supports_logits_to_keep(model: torch.nn.Module) -> bool:
    fn = getattr(model, "_supports_logits_to_keep", None)
    return bool(fn()) if callable(fn) else False


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def fit_width(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad ``[B, T]`` with zeros, or cut it, to ``[B, width]``."""
    if x.shape[1] >= width:
        return x[:, :width]
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` over the last dimension, in at least float32."""
    logp = torch.log_softmax(logits.to(compute_dtype(logits.dtype)), -1)
    return -(logp.exp() * logp).sum(-1)
