"""The chunked LM head (pipeline.lm_head): log-probs and gradients equal the plain full-logits path."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from pipeline import lm_head
from pipeline.logprobs import sequence_log_probs


def _reference(hidden, weight, bias, tokens, temperature):
    logits = torch.nn.functional.linear(hidden, weight, bias) / temperature
    return logits.log_softmax(-1).gather(-1, tokens[:, None]).squeeze(-1)


# the softmax kept from the forward pass for the backward pass, or rebuilt there (over the budget)
KEEP = pytest.mark.parametrize("keep", [2**26, 0], ids=["kept", "rebuilt"])


@KEEP
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_match_a_float64_log_softmax_across_chunks(monkeypatch, with_bias, keep):
    monkeypatch.setattr(lm_head, "_CHUNK_ELEMENTS", 3 * 11)  # 3 rows of an 11-token vocabulary per chunk
    monkeypatch.setattr(lm_head, "_KEEP_ELEMENTS", keep)
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 5, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True) if with_bias else None
    tokens = torch.randint(0, 11, (10,), generator=g)
    inputs = (hidden, weight, bias, tokens, 0.7)
    torch.testing.assert_close(lm_head.linear_log_probs(*inputs), _reference(*inputs), rtol=0, atol=1e-12)
    # gradcheck's backward passes reuse one graph: the kept softmax serves the first, the others rebuild it
    assert torch.autograd.gradcheck(
        lambda h, w, b: lm_head.linear_log_probs(h, w, b, tokens, 0.7), (hidden, weight, bias)
    )
    lp = lm_head.linear_log_probs(*inputs)
    first = torch.autograd.grad(lp.sum(), (hidden, weight), retain_graph=True)
    again = torch.autograd.grad(lp.sum(), (hidden, weight))
    for a, b in zip(first, again, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _llama(tie: bool):
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)  # fmt: skip
    return LlamaForCausalLM(cfg)


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64))


@KEEP
@pytest.mark.parametrize(
    "build", [lambda: _llama(True), lambda: _llama(False), _gpt2], ids=["llama-tied", "llama", "gpt2"]
)
def test_sequence_log_probs_and_gradients_equal_the_full_logits_path(monkeypatch, build, keep):
    monkeypatch.setattr(lm_head, "_KEEP_ELEMENTS", keep)
    torch.manual_seed(0)
    model = build().double().eval()  # no dropout: both passes see the same network
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    responses = [torch.tensor([9, 10, 11, 12]), torch.tensor([13, 14])]
    assert lm_head.head_of(model) is None  # until prepare() showed logits == head(hidden)
    lm_head.prepare(model)
    assert lm_head.head_of(model) is not None

    def run(chunked: bool):
        model.zero_grad()
        lp, mask, _ = sequence_log_probs(
            model, prompts, responses, pad_token_id=0, temperature=0.9, return_logits=not chunked
        )
        (lp * mask).sum().backward()
        return lp.detach() * mask, {n: p.grad.clone() for n, p in model.named_parameters()}

    (lp_chunked, grads_chunked), (lp_full, grads_full) = run(True), run(False)
    torch.testing.assert_close(lp_chunked, lp_full, rtol=0, atol=1e-12)
    assert lp_chunked[1, :2].lt(0).all()
    for name, grad in grads_full.items():
        torch.testing.assert_close(grads_chunked[name], grad, rtol=0, atol=1e-10, msg=name)


def test_soft_capped_logits_keep_the_plain_path():
    cfg = Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0)  # fmt: skip
    capped = Gemma2ForCausalLM(cfg)
    lm_head.prepare(capped)
    assert lm_head.head_of(capped) is None
    cfg.final_logit_softcapping = None
    plain = Gemma2ForCausalLM(cfg)
    lm_head.prepare(plain)
    assert lm_head.head_of(plain) is not None
