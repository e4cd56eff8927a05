"""Log-probs straight from the last hidden states: the LM head and log-softmax in row chunks, recomputed
in the backward pass, so no ``[tokens, V]`` logits tensor (nor its gradient) is ever held.

With a 49k-token vocabulary the logits of 16 sequences x 64 response tokens are 200 MB in float32, and
autograd keeps them, plus their gradient, through the backward pass. :func:`linear_log_probs` keeps the
hidden states (``[tokens, H]``, H << V) and the per-row logsumexp instead, and rebuilds each chunk of
logits in the backward pass: one extra LM-head matmul for ``2 x |logits|`` less memory. Up to
``_KEEP_ELEMENTS`` logits a training pass keeps their softmax instead (one ``[tokens, V]`` tensor,
turned into the gradient in place): no extra matmul, and still less than autograd's logits + gradient.

A model takes this path once :func:`prepare` has shown, on a 2-token input, that its logits are exactly
its output layer's output (no soft-capping or scaling after the head; a plain ``nn.Linear``, no adapter
on it, not sharded by FSDP); other models keep the plain path.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch.distributed.fsdp import FSDPModule

from pipeline import logprobs  # module import: pipeline.logprobs imports this module too

# Rows of logits rebuilt at once: about 2**24 elements (64 MB in float32) whatever the vocabulary.
_CHUNK_ELEMENTS = 2**24
# Up to this many [tokens, V] elements (256 MB in float32) a training pass keeps the softmax for the
# backward pass instead of rebuilding it with an LM-head matmul (SmolLM2, 16 x 64 response tokens:
# 50M elements; this head's forward and backward take 1.17 instead of 1.60 s); beyond it, memory wins.
_KEEP_ELEMENTS = 2**26
_CHECKED: weakref.WeakKeyDictionary[torch.nn.Module, bool] = weakref.WeakKeyDictionary()


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    x = torch.nn.functional.linear(h, weight, bias).to(logprobs.compute_dtype(weight.dtype))
    return x / temperature if temperature != 1.0 else x


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, tokens, temperature, training):
        rows = max(1, _CHUNK_ELEMENTS // weight.shape[0])
        dtype = logprobs.compute_dtype(weight.dtype)
        keep = training and hidden.shape[0] * weight.shape[0] <= _KEEP_ELEMENTS
        probs = hidden.new_empty(hidden.shape[0], weight.shape[0], dtype=dtype) if keep else None
        out, lse = [], []
        for start in range(0, hidden.shape[0], rows):
            x = _chunk_logits(hidden[start : start + rows], weight, bias, temperature)
            lse.append(x.logsumexp(-1))
            out.append(x.gather(-1, tokens[start : start + rows, None]).squeeze(-1) - lse[-1])
            if probs is not None:
                torch.exp(x.sub_(lse[-1][:, None]), out=probs[start : start + rows])
        lse_all = torch.cat(lse) if lse else hidden.new_zeros(0, dtype=dtype)
        ctx.save_for_backward(hidden, weight, bias, tokens, lse_all)
        ctx.temperature, ctx.rows, ctx.probs = temperature, rows, probs
        device = hidden.device.type
        ctx.autocast = (
            (device, torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        )
        return torch.cat(out) if out else lse_all

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, bias, tokens, lse = ctx.saved_tensors
        t, rows = ctx.temperature, ctx.rows
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = (
            torch.zeros_like(weight, dtype=logprobs.compute_dtype(weight.dtype))
            if ctx.needs_input_grad[1]
            else None
        )
        grad_b = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = torch.zeros_like(bias, dtype=logprobs.compute_dtype(bias.dtype))
        probs, ctx.probs = ctx.probs, None  # used up in place: a second backward rebuilds the logits
        with torch.autocast(*ctx.autocast) if ctx.autocast else nullcontext():  # the forward's logits
            _backward_chunks(
                hidden, weight, bias, tokens, lse, probs, grad_out, t, rows, grad_h, grad_w, grad_b
            )
        grad_w = grad_w.to(weight.dtype) if grad_w is not None else None
        grad_b = grad_b.to(bias.dtype) if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None, None


def _backward_chunks(
    hidden, weight, bias, tokens, lse, probs, grad_out, t, rows, grad_h, grad_w, grad_b
) -> None:
    for start in range(0, hidden.shape[0], rows):
        end = start + rows
        h = hidden[start:end]
        # d lp / d x = onehot(token) - softmax(x), x = logits / t
        if probs is not None:
            g = probs[start:end].neg_()
        else:
            g = torch.exp(_chunk_logits(h, weight, bias, t) - lse[start:end, None]).neg_()
        g.scatter_add_(-1, tokens[start:end, None], torch.ones_like(g[:, :1]))
        g.mul_(grad_out[start:end, None] / t)
        if grad_h is not None:
            grad_h[start:end] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
        if grad_w is not None:
            grad_w.addmm_(g.T, h.to(grad_w.dtype))
        if grad_b is not None:
            grad_b.add_(g.sum(0))


def linear_log_probs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    tokens: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``log_softmax((hidden @ weight.T + bias) / temperature)`` at ``tokens``, for ``hidden [N, H]`` and
    ``tokens [N]``: ``[N]`` in at least float32, differentiable in ``hidden``, ``weight`` and ``bias``."""
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    return _LinearLogProbs.apply(hidden, weight, bias, tokens.to(torch.long), float(temperature), training)


@contextmanager
def _identity(head: torch.nn.Module) -> Iterator[None]:
    head.forward = lambda x, *args, **kwargs: x  # the model returns its last hidden states as "logits"
    try:
        yield
    finally:
        del head.forward


class HiddenHead:
    """The model's output layer, switched off while :meth:`hidden` runs the model."""

    def __init__(self, model: torch.nn.Module, head: torch.nn.Linear) -> None:
        self.model, self.head = model, head

    def hidden(self, **inputs) -> torch.Tensor:
        """The model's forward with the head as the identity: ``[B, kept positions, H]``."""
        with _identity(self.head):
            return self.model(**inputs).logits

    def log_probs(self, hidden: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
        return linear_log_probs(hidden, self.head.weight, self.head.bias, tokens, temperature)


def _linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if type(head) is not torch.nn.Linear or type(head.weight) is not torch.nn.Parameter:
        return None  # no head, an adapter-wrapped head, or a sharded (DTensor) one
    return head


def prepare(model: torch.nn.Module) -> None:
    """Check once per model, on a 2-token input (eval mode, no gradient), that its logits are exactly its
    output layer's output; :func:`head_of` then takes the chunked path. Called where a policy is built,
    so every process, resumed or not, scores with the same arithmetic from the first pass on."""
    base = getattr(model, "module", model)  # DDP: the wrapped model
    head = _linear_head(base)
    if head is None or base in _CHECKED:
        return
    ids = torch.tensor([[0, 1]], device=head.weight.device)
    training = base.training
    base.eval()  # dropout would make the two passes differ
    try:
        with torch.no_grad():
            logits = base(input_ids=ids, use_cache=False).logits
            rebuilt = head(HiddenHead(base, head).hidden(input_ids=ids, use_cache=False)).to(logits.dtype)
        _CHECKED[base] = logits.shape == rebuilt.shape and torch.equal(logits, rebuilt)
    except Exception:  # a model whose forward does not take plain input ids keeps the plain path
        _CHECKED[base] = False
    finally:
        base.train(training)


def head_of(model: torch.nn.Module) -> HiddenHead | None:
    """The chunked path for ``model`` once :func:`prepare` showed its logits are exactly its head's
    output; None otherwise (not prepared, post-processed logits, a sharded or adapter-wrapped head)."""
    base = getattr(model, "module", model)
    if isinstance(base, FSDPModule):  # its weights are gathered only inside its own forward
        return None
    head = _linear_head(base)
    return HiddenHead(model, head) if head is not None and _CHECKED.get(base) else None
