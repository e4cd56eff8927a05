"""Compiled decoding (pipeline.decode, ``generate.compile=true``): the tokens and log-probs of the
``generate`` path, faster; what it cannot reproduce is refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from tensordict import TensorDict

from pipeline import TransformersWrapper
from pipeline.config import validate
from pipeline.logprobs import sequence_log_probs
from tests.helpers import SMALL_RUN, compose_train, read_metrics, run_recipe, run_without_cpp_compiler

PROMPTS = ["12+35=", "7+8=", "123+4=", "9="]  # different widths: left padding in every batch


def _pair(model, tok, **kwargs):
    """The generate path and the compiled path, configured alike."""
    args = {"tokenizer": tok, "return_log_probs": True, **kwargs}
    return TransformersWrapper(model, **args), TransformersWrapper(model, compile_decode=True, **args)


def _run(policy, prompts, seed=0, **kwargs):
    torch.manual_seed(seed)
    return policy(TensorDict(text=prompts, batch_size=[len(prompts)]), **kwargs)


def _assert_same(a, b, atol=1e-5):
    assert torch.equal(a["tokens_response_mask"], b["tokens_response_mask"])
    assert torch.equal(a["tokens_response"], b["tokens_response"])
    m = a["log_probs_mask"]
    assert (a["log_probs"][m] - b["log_probs"][m]).abs().max() < atol
    assert list(a["text_response"]) == list(b["text_response"])


def test_greedy_gives_generates_tokens_and_log_probs_that_scoring_reproduces(models, char_tok, arch):
    model = models(arch)
    hf, compiled = _pair(
        model, char_tok, num_samples=2, generate_kwargs={"max_new_tokens": 10, "do_sample": False}
    )
    unshared = TransformersWrapper(model, tokenizer=char_tok, return_log_probs=True, num_samples=2, compile_decode=True,
                                   share_prompt_cache=False, generate_kwargs={"max_new_tokens": 10, "do_sample": False})  # fmt: skip
    for prompts in (PROMPTS, PROMPTS[:3]):  # a second batch size and width: recompiled, same results
        a, b = _run(hf, prompts), _run(compiled, prompts)
        _assert_same(a, b)
        _assert_same(a, _run(unshared, prompts))  # every row prefilled on its own
    # the log-prob invariant against a float64 forward of the same weights
    flat = b.reshape(-1)
    mask = flat["tokens_response_mask"]
    prompts = [t[m.bool()] for t, m in zip(flat["tokens"], flat["attention_mask"])]
    responses = [r[k] for r, k in zip(flat["tokens_response"], mask)]
    ref, ref_mask, _ = sequence_log_probs(copy.deepcopy(model).double(), prompts, responses, pad_token_id=0)
    assert torch.equal(ref_mask, mask)
    assert (ref[mask] - flat["log_probs"][mask].double()).abs().max() < 1e-4


@pytest.mark.parametrize(
    "kwargs", [{"temperature": 0.7, "top_k": 5}, {"top_p": 0.8}, {"min_p": 0.05, "min_new_tokens": 3}]
)
def test_a_seed_samples_the_tokens_of_the_generate_path(models, char_tok, kwargs):
    # many EOS ids: rows end at different steps, the rest get the pad id, and the loop stops early
    eos = list(range(0, 101, 3))
    gen = {"max_new_tokens": 12, "do_sample": True, "eos_token_id": eos, **kwargs}
    temperature = kwargs.get("temperature", 1.0)
    hf, compiled = _pair(models("gpt2"), char_tok, num_samples=4, generate_kwargs=gen,
                         log_probs_temperature=temperature)  # fmt: skip
    for seed in (0, 1):  # the second call reuses the static cache
        a, b = _run(hf, PROMPTS, seed), _run(compiled, PROMPTS, seed)
        _assert_same(a, b)
    lengths = b["tokens_response_mask"].sum(-1)
    assert lengths.min() >= kwargs.get("min_new_tokens", 1) and lengths.min() < 12
    last = b["tokens_response"].gather(-1, (lengths - 1).unsqueeze(-1)).squeeze(-1)
    assert torch.isin(last[lengths < 12], torch.tensor(eos)).all()  # a response ends at its first EOS


def test_the_loop_stops_when_every_row_has_ended(models, char_tok):
    every = list(range(101))  # every token is an EOS: each row ends at its first token
    policy = TransformersWrapper(models("gpt2"), tokenizer=char_tok, compile_decode=True, num_samples=2,
                                 generate_kwargs={"max_new_tokens": 9, "eos_token_id": every})  # fmt: skip
    prompts = [torch.tensor(char_tok(p)["input_ids"]) for p in PROMPTS]
    seqs, log_probs = policy.decoder.generate(
        prompts, policy.generation_config, 2, share_prompts=True, log_probs_temperature=1.0
    )
    assert seqs.shape == log_probs.shape == (8, 1)
    with pytest.raises(ValueError, match="NaN or \\+inf"):  # and none may end before min_new_tokens
        _run(policy, PROMPTS, min_new_tokens=1, do_sample=True)


def test_forward_kwargs_override_the_sampling(models, char_tok):
    hf, compiled = _pair(models("llama"), char_tok, num_samples=3,
                         generate_kwargs={"max_new_tokens": 6, "do_sample": False})  # fmt: skip
    a = _run(hf, PROMPTS, do_sample=True, temperature=1.5, max_new_tokens=4)
    b = _run(compiled, PROMPTS, do_sample=True, temperature=1.5, max_new_tokens=4)
    _assert_same(a, b)
    assert b["tokens_response"].shape[-1] == 4


def test_what_it_cannot_reproduce_is_refused_by_name(models, char_tok):
    model = models("gpt2")
    with pytest.raises(ValueError, match=r"repetition_penalty=1\.2"):
        TransformersWrapper(
            model, tokenizer=char_tok, compile_decode=True, generate_kwargs={"repetition_penalty": 1.2}
        )
    with pytest.raises(ValueError, match=r"logits_processor \(a generate\(\) argument\)"):
        TransformersWrapper(
            model, tokenizer=char_tok, compile_decode=True, generate_kwargs={"logits_processor": []}
        )
    with pytest.raises(ValueError, match="return_logits"):
        TransformersWrapper(model, tokenizer=char_tok, compile_decode=True, return_logits=True)
    with pytest.raises(ValueError, match="generate=True"):
        TransformersWrapper(model, tokenizer=char_tok, compile_decode=True, generate=False, from_text=False)
    policy = TransformersWrapper(
        model, tokenizer=char_tok, compile_decode=True, generate_kwargs={"max_new_tokens": 2}
    )
    with pytest.raises(ValueError, match=r"forward kwargs also sets \['no_repeat_ngram_size=2'\]"):
        _run(policy, PROMPTS, no_repeat_ngram_size=2)


def test_no_cpp_compiler_fails_at_construction():
    code = (
        "from pipeline import TransformersWrapper\n"
        "from pipeline.tiny import char_tokenizer, tiny_model\n"
        "tok = char_tokenizer()\n"
        "TransformersWrapper(tiny_model(tok), tokenizer=tok, compile_decode=True, generate_kwargs={'max_new_tokens': 4})\n"
    )
    proc = run_without_cpp_compiler(code)
    assert proc.returncode == 1
    assert "ValueError: compile_decode (generate.compile) needs a C++ compiler on CPU" in proc.stderr, (
        proc.stderr[-2000:]
    )
    assert "or set generate.compile=false" in proc.stderr


def test_config_errors_name_generate_compile():
    with pytest.raises(ValueError, match=r"generate\.compile.*repetition_penalty=1\.3"):
        validate(compose_train(["generate.compile=true", "generate.repetition_penalty=1.3"]))
    with pytest.raises(
        ValueError, match=r"generate\.compile=true is not supported with trainer\.strategy=fsdp"
    ):
        validate(compose_train(["generate.compile=true", "trainer.strategy=fsdp"]))
    with pytest.raises(ValueError, match=r"algo\.critic=shared needs generate\.compile=false"):
        validate(compose_train(["generate.compile=true", "algo=ppo", "algo.critic=shared"]))


def test_training_with_compiled_decoding_samples_what_generate_samples(tmp_path):
    variants = {
        "plain": ["generate.compile=false"],
        "compiled": ["generate.compile=true"],
        # and the compiled tanh-GELU of pipeline.activations, inside the decoding graph and in training
        "activation": ["generate.compile=true", "model.compile_activation=true"],
    }
    runs = {
        name: run_recipe([*SMALL_RUN, *sets, "logger=none"], tmp_path / name)[1]
        for name, sets in variants.items()
    }
    assert runs["compiled"] == runs["plain"] == runs["activation"]  # greedy evaluation: the same answers
    metrics = {name: [m for m in read_metrics(tmp_path / name) if "loss/total" in m] for name in variants}
    assert [len(m) for m in metrics.values()] == [2, 2, 2]
    for name in ("compiled", "activation"):
        for p, f in zip(metrics["plain"], metrics[name]):
            assert f["reward/total_mean"] == p["reward/total_mean"]  # the same samples
            assert f["loss/total"] == pytest.approx(p["loss/total"], abs=1e-5)
