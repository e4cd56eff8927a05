"""The log-prob invariants of DESIGN.md §2, on GPT-2 (absolute positions) and Llama (rotary)."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict, lazy_stack
from transformers import LogitsProcessor, LogitsProcessorList

from pipeline import TransformersWrapper

PROMPTS = ["12+35=", "7*8=", "a much longer prompt: 123+456=", "x"]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}


class ForceTokenAt(LogitsProcessor):
    """Makes ``row`` sample ``token`` at generated step ``step`` (raw logits stay untouched)."""

    def __init__(self, prompt_len: int, row: int, step: int, token: int):
        self.prompt_len, self.row, self.step, self.token = prompt_len, row, step, token

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] - self.prompt_len == self.step:
            scores[self.row] = -float("inf")
            scores[self.row, self.token] = 0.0
        return scores


def reference_log_probs(model, prompt: torch.Tensor, response: torch.Tensor, temperature: float = 1.0):
    """Plain PyTorch: one unpadded sequence, log_softmax over its logits, gathered."""
    seq = torch.cat([prompt, response])[None]
    with torch.no_grad():
        logits = model(seq).logits[0]
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1].double() / temperature, -1)
    return logp.gather(-1, response[:, None]).squeeze(-1)


def generate(model, tok, *, dtype, temperature=1.0, num_samples=None, **gen):
    wrapper = TransformersWrapper(
        model,
        tokenizer=tok,
        return_log_probs=True,
        log_probs_temperature=temperature,
        num_samples=num_samples,
        generate_kwargs={"max_new_tokens": 12, "do_sample": True, "temperature": temperature, **gen},
    )
    torch.manual_seed(1)
    return wrapper(TensorDict(text=PROMPTS, batch_size=[len(PROMPTS)]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generation_log_probs_equal_scoring_and_reference(models, char_tok, arch, dtype):
    model = models(arch, dtype)
    prompt_len = max(len(char_tok(p)["input_ids"]) for p in PROMPTS)
    force_eos = LogitsProcessorList([ForceTokenAt(prompt_len, row=1, step=3, token=char_tok.eos_token_id)])
    out = generate(model, char_tok, dtype=dtype, logits_processor=force_eos)

    responses = out.get("tokens_response", as_list=True)
    gen_lp = out.get("log_probs", as_list=True)
    assert len(responses[1]) == 4 and responses[1][-1] == char_tok.eos_token_id  # pad == eos kept
    assert [len(r) for r in responses] == [len(lp) for lp in gen_lp]
    assert gen_lp[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    scorer = TransformersWrapper(model, tokenizer=char_tok, from_text=False, generate=False)
    scored = scorer(out.select("tokens", "tokens_response")).get("log_probs", as_list=True)
    for i, prompt in enumerate(out.get("tokens", as_list=True)):
        ref = reference_log_probs(model, prompt, responses[i])
        assert (gen_lp[i] - scored[i]).abs().max() <= TOL[dtype]
        assert (gen_lp[i].double() - ref).abs().max() <= TOL[dtype]
        assert (scored[i].double() - ref).abs().max() <= TOL[dtype]
        assert gen_lp[i].isfinite().all() and (gen_lp[i] <= 0).all()


def test_log_probs_at_sampling_temperature(models, char_tok, arch):
    model = models(arch, torch.float64)
    out = generate(model, char_tok, dtype=torch.float64, temperature=0.7)
    scorer = TransformersWrapper(
        model, tokenizer=char_tok, from_text=False, generate=False, log_probs_temperature=0.7
    )
    scored = scorer(out.select("tokens", "tokens_response")).get("log_probs", as_list=True)
    for i, (prompt, resp) in enumerate(
        zip(out.get("tokens", as_list=True), out.get("tokens_response", as_list=True))
    ):
        ref = reference_log_probs(model, prompt, resp, temperature=0.7)
        assert (out.get("log_probs", as_list=True)[i] - ref).abs().max() <= 1e-10
        assert (scored[i] - ref).abs().max() <= 1e-10
        # and it is a different distribution from T=1: the option is not a no-op
        assert (reference_log_probs(model, prompt, resp) - ref).abs().max() > 1e-3


def test_batched_scoring_equals_one_by_one(models, char_tok, arch):
    model = models(arch, torch.float64)
    scorer = TransformersWrapper(model, tokenizer=char_tok, generate=False)
    responses = ["47<|endoftext|>", "56", "579 and more", "y"]
    batch = scorer(TensorDict(text=PROMPTS, text_response=responses, batch_size=[4]))
    batched = batch.get("log_probs", as_list=True)
    for i in range(4):
        single = scorer(TensorDict(text=PROMPTS[i], text_response=responses[i])).get("log_probs")
        assert single.shape == batched[i].shape == (len(char_tok(responses[i])["input_ids"]),)
        assert (single - batched[i]).abs().max() <= 1e-10


def test_greedy_matches_model_generate_token_for_token(models, char_tok, arch):
    model = models(arch, torch.float64)
    wrapper = TransformersWrapper(
        model, tokenizer=char_tok, generate_kwargs={"max_new_tokens": 10, "do_sample": False}
    )
    out = wrapper(TensorDict(text=PROMPTS, batch_size=[4]))
    for prompt, resp in zip(PROMPTS, out.get("tokens_response", as_list=True)):
        ids = torch.tensor([char_tok(prompt)["input_ids"]])
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0
        )[0, ids.shape[1] :]
        eos = (ref == char_tok.eos_token_id).nonzero()
        ref = ref[: int(eos[0]) + 1] if len(eos) else ref
        assert torch.equal(resp, ref)


def test_num_samples_groups_and_log_probs(models, char_tok):
    model = models("gpt2", torch.float64)
    out = generate(model, char_tok, dtype=torch.float64, num_samples=3)
    assert out.batch_size == (4, 3)
    flat = out.reshape(-1)
    assert flat.get("text").tolist() == [p for p in PROMPTS for _ in range(3)]
    responses = flat.get("tokens_response", as_list=True)
    assert len({tuple(r.tolist()) for r in responses[:3]}) > 1  # samples differ within a group
    for prompt, resp, lp in zip(
        flat.get("tokens", as_list=True), responses, flat.get("log_probs", as_list=True)
    ):
        assert (lp - reference_log_probs(model, prompt, resp)).abs().max() <= 1e-10


def test_padded_reads_of_outputs(models, char_tok):
    model = models("gpt2")
    out = generate(model, char_tok, dtype=torch.float32)
    lengths = [len(r) for r in out.get("tokens_response", as_list=True)]
    padded = out.get("log_probs", as_padded_tensor=True, padding_side="right", padding_value=0.0)
    assert padded.shape == (4, max(lengths))
    for i, n in enumerate(lengths):
        assert torch.equal(padded[i, :n], out[i]["log_probs"])
        assert (padded[i, n:] == 0).all()


def test_lazy_stacked_input_is_written_in_place(models, char_tok):
    model = models("gpt2")
    wrapper = TransformersWrapper(model, tokenizer=char_tok, generate_kwargs={"max_new_tokens": 3})
    td = lazy_stack([TensorDict(text=p) for p in PROMPTS[:2]])
    out = wrapper(td)
    assert out is td and "tokens_response" in td[0].keys()
