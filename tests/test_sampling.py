"""The inverse-CDF sampler (pipeline.sampling) draws from the same distribution as HF's multinomial."""

from __future__ import annotations

import math

import pytest
import torch
from tensordict import TensorDict
from transformers import GenerationConfig

from pipeline import TransformersWrapper
from pipeline.config import GenerateConfig
from pipeline.sampling import InverseCDF, fast_generation, inverse_cdf_sample
from pipeline.tiny import char_tokenizer, tiny_model

TOK = char_tokenizer()


def test_inverse_cdf_frequencies_match_softmax_and_never_pick_minus_inf():
    torch.manual_seed(0)
    scores = torch.tensor([[float("-inf"), 2.0, 1.0, float("-inf"), 0.0, -1.0, float("-inf")]]).expand(
        200_000, -1
    )
    picks = inverse_cdf_sample(scores)
    freq = torch.bincount(picks, minlength=7).double() / len(picks)
    expected = torch.softmax(scores[0].double(), -1)
    assert freq[[0, 3, 6]].sum() == 0  # leading, inner and trailing -inf
    assert (freq - expected).abs().max() < 0.005  # 200k draws: standard error <= 0.0011
    one_hot = InverseCDF()(None, scores[:3])
    assert ((one_hot == 0).sum(-1) == 1).all() and torch.isinf(one_hot).sum() == 3 * 6
    with pytest.raises(ValueError, match="NaN"):
        inverse_cdf_sample(torch.tensor([[0.0, float("nan")]]))


@pytest.mark.parametrize("kwargs", [{"temperature": 0.7, "top_k": 5}, {"top_p": 0.8}, {"min_p": 0.05}])
def test_first_token_distribution_equals_the_warped_model_distribution(kwargs):
    model = tiny_model(TOK, arch="gpt2", seed=1).eval()
    ids = torch.tensor([TOK("12+35=")["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    cfg = GenerationConfig(do_sample=True, max_new_tokens=1, **kwargs)
    greedy, extras = fast_generation(cfg, {}, model)  # top_k None: HF's 50
    assert greedy.do_sample is False
    warped = logits[None]
    for proc in extras["logits_processor"][:-1]:  # the warpers, without the draw
        warped = proc(ids, warped)
    expected = torch.softmax(warped[0].double(), -1)
    n = 20_000
    freqs = {}
    for sampler in ("inverse_cdf", "multinomial"):
        torch.manual_seed(0)
        policy = TransformersWrapper(model, tokenizer=TOK, num_samples=n, sampler=sampler,
                                     generate_kwargs={"max_new_tokens": 1, "do_sample": True, **kwargs})  # fmt: skip
        first = policy(TensorDict(text=["12+35="], batch_size=[1]))["tokens_response"].reshape(n, -1)[:, 0]
        freqs[sampler] = torch.bincount(first, minlength=len(expected)).double() / n
    # the total variation that n exact draws show on average: 0.5 * sum_k E|freq_k - p_k|
    noise = 0.5 * (2 * expected * (1 - expected) / (math.pi * n)).sqrt().sum()
    for sampler, freq in sorted(freqs.items(), reverse=True):
        assert freq[expected == 0].sum() == 0, sampler  # nothing outside top-k / top-p / min-p
        assert 0.5 * (freq - expected).abs().sum() < 1.5 * noise, sampler


def test_configurations_it_does_not_reproduce_keep_hf_sampling():
    for cfg in (GenerationConfig(do_sample=False), GenerationConfig(do_sample=True, typical_p=0.9),
                GenerationConfig(do_sample=True, num_beams=2), GenerationConfig(do_sample=True, epsilon_cutoff=0.1)):  # fmt: skip
        out, extras = fast_generation(cfg, {})
        assert out is cfg and extras == {}


def test_the_users_processors_come_first():
    from transformers import LogitsProcessorList, MinLengthLogitsProcessor

    user = MinLengthLogitsProcessor(3, eos_token_id=0)
    _, extras = fast_generation(
        GenerationConfig(do_sample=True, temperature=0.5), {"logits_processor": [user]}
    )
    procs = extras["logits_processor"]
    assert isinstance(procs, LogitsProcessorList) and procs[0] is user and isinstance(procs[-1], InverseCDF)


def test_bad_sampler_names_the_option():
    with pytest.raises(ValueError, match=r"generate\.sampler"):
        GenerateConfig(sampler="gumbel")
    with pytest.raises(ValueError, match="sampler must be one of"):
        TransformersWrapper(tiny_model(TOK), tokenizer=TOK, sampler="gumbel")
