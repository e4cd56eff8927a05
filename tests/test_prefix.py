"""Shared prompt prefixes (pipeline.prefix): the G samples of a prompt run it once, in scoring and generation.

The reference is the plain pass (every row runs its whole prompt) and, in float64, one unpadded forward
per row. GPT-2 computes in float64 throughout; Llama's RMSNorm computes in float32 whatever the weights,
so there the shared and plain passes round differently and agree to float32 precision only.
"""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict

from pipeline import TransformersWrapper, lm_head, prefix
from pipeline.logprobs import pad_left, position_ids_from_mask, sequence_log_probs
from pipeline.tiny import char_tokenizer, tiny_model
from tests.helpers import SMALL_RUN, comparable, read_metrics, run_recipe

TOK = char_tokenizer()
PROMPTS = ["12+35=", "7+8=", "123+45="]  # different lengths: left padding


def _batch(order: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """3 prompts x 3 responses of varied lengths (one of 1 token), rows in ``order``."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.tensor(TOK(p)["input_ids"]) for p in PROMPTS for _ in range(3)]
    responses = [torch.randint(5, 60, (n,), generator=g) for n in (4, 1, 6, 3, 5, 2, 6, 6, 3)]
    return [prompts[i] for i in order], [responses[i] for i in order]


def _scored(model, prompts, responses, *, share: bool, return_logits: bool = False):
    model.zero_grad()
    lp, mask, logits = sequence_log_probs(
        model, prompts, responses, pad_token_id=0, share_prompts=share, return_logits=return_logits
    )
    (lp * mask).sum().backward()
    return lp.detach(), logits, {n: p.grad.clone() for n, p in model.named_parameters()}


def _unpadded_reference(model, prompts, responses):
    """Log-probs and gradients from one unpadded float64 forward per row."""
    model.zero_grad()
    rows = []
    for p, r in zip(prompts, responses):
        logits = model(input_ids=torch.cat([p, r])[None], use_cache=False).logits[0, len(p) - 1 : -1]
        rows.append(torch.log_softmax(logits, -1).gather(-1, r[:, None]).squeeze(-1))
    torch.cat(rows).sum().backward()
    return rows, {n: p.grad.clone() for n, p in model.named_parameters()}


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("chunked_head", [True, False])
@pytest.mark.parametrize("order", [list(range(9)), [4, 0, 8, 2, 5, 7, 1, 3, 6]], ids=["grouped", "shuffled"])
def test_shared_scoring_equals_unpadded_float64_reference(order, chunked_head):
    model = tiny_model(TOK, arch="gpt2").double().eval()
    if chunked_head:
        lm_head.prepare(model)
    prompts, responses = _batch(order)
    assert prefix.decoder_of(model) is not None
    ref_rows, ref_grads = _unpadded_reference(model, prompts, responses)
    lp, _, grads = _scored(model, prompts, responses, share=True)
    for i, row in enumerate(ref_rows):
        torch.testing.assert_close(lp[i, : len(row)], row.detach(), atol=1e-12, rtol=0)
    assert _max_diff(grads, ref_grads) < 1e-12


def test_shared_scoring_returns_the_same_logits_as_the_plain_pass():
    model = tiny_model(TOK, arch="gpt2").double().eval()
    prompts, responses = _batch(list(range(9)))
    lp, logits, _ = _scored(model, prompts, responses, share=True, return_logits=True)
    lp0, logits0, _ = _scored(model, prompts, responses, share=False, return_logits=True)
    torch.testing.assert_close(logits, logits0, atol=1e-12, rtol=0)
    torch.testing.assert_close(lp, lp0, atol=1e-12, rtol=0)


def test_llama_gqa_rope_shared_scoring_matches_plain_pass_to_float32_rounding():
    model = tiny_model(TOK, arch="llama").double().eval()  # 4 heads over 2 key/value heads, rotary positions
    lm_head.prepare(model)
    prompts, responses = _batch(list(range(9)))
    lp, _, grads = _scored(model, prompts, responses, share=True)
    lp0, _, grads0 = _scored(model, prompts, responses, share=False)
    torch.testing.assert_close(lp, lp0, atol=1e-6, rtol=0)
    scale = max(g.abs().max().item() for g in grads0.values())
    assert _max_diff(grads, grads0) < 1e-6 * scale  # RMSNorm's float32 arithmetic, summed in another order


def test_nothing_to_share_or_no_cache_takes_the_plain_pass():
    model = tiny_model(TOK, arch="gpt2").eval()
    distinct = [torch.tensor(TOK(p)["input_ids"]) for p in PROMPTS]
    responses = [torch.tensor([5, 6]), torch.tensor([7]), torch.tensor([8, 9, 10])]
    ids, mask = pad_left(distinct, 0)
    positions = position_ids_from_mask(mask)
    inputs = {"input_ids": ids, "attention_mask": mask.long(), "position_ids": positions}
    assert prefix.shared_forward(model, inputs, ids.shape[1], call=model) is None  # no prompt repeats
    assert prefix.prefill(model, distinct, 1, pad_token_id=0) == {}  # one sample per prompt
    one_token = [torch.tensor([3])] * 2
    assert prefix.prefill(model, one_token, 4, pad_token_id=0) == {}  # no prefix before the last token
    model.gradient_checkpointing_enable()
    assert prefix.decoder_of(model) is None  # checkpointed layers drop the cache in training
    lp, mask, _ = sequence_log_probs(model, distinct * 2, responses * 2, pad_token_id=0)
    assert torch.isfinite(lp).all() and mask.sum() == 12


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_shared_generation_samples_the_same_tokens_and_log_probs_match_scoring(arch):
    model = tiny_model(TOK, arch=arch).eval()
    outs = {}
    for share in (False, True):
        torch.manual_seed(0)
        policy = TransformersWrapper(
            model, tokenizer=TOK, return_log_probs=True, num_samples=4, share_prompt_cache=share,
            generate_kwargs={"max_new_tokens": 8, "do_sample": True},
        )  # fmt: skip
        outs[share] = policy(TensorDict(text=PROMPTS, batch_size=[3])).reshape(-1)
    plain, shared = outs[False], outs[True]
    assert torch.equal(plain["tokens_response"], shared["tokens_response"])
    assert torch.equal(plain["tokens_response_mask"], shared["tokens_response_mask"])
    mask = shared["log_probs_mask"]
    assert ((plain["log_probs"] - shared["log_probs"]) * mask).abs().max() < 1e-5
    scorer = TransformersWrapper(model, tokenizer=TOK, from_text=False, generate=False)
    keys = ("tokens", "attention_mask", "tokens_response", "tokens_response_mask")
    scored = scorer(shared.select(*keys))["log_probs"]
    assert ((scored - shared["log_probs"]) * mask).abs().max() <= 1e-4  # float32, left padding, EOS kept


def test_training_with_and_without_the_shared_prompt_cache_logs_the_same_run(saved_tiny, tmp_path):
    runs = {}
    for share in ("true", "false"):
        overrides = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "generate.num_samples=4",
                     "trainer.save_every=0", f"model.share_prompt_cache={share}"]  # fmt: skip
        run_recipe(overrides, tmp_path / share)
        runs[share] = comparable(read_metrics(tmp_path / share))
    assert len(runs["true"]) == len(runs["false"]) >= 2
    for a, b in zip(runs["true"], runs["false"]):
        assert a.keys() == b.keys()
        for key, value in a.items():
            if isinstance(value, float):
                assert value == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
            else:
                assert value == b[key], key


def test_a_model_that_ignores_the_cache_it_is_given_fails_loudly_and_names_the_option():
    model = tiny_model(TOK, arch="gpt2").eval()
    decoder = model.base_model
    forward = decoder.forward

    def dropping_cache(  # takes the cache under either name (transformers 5.24 / 5.19) and drops it
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        use_cache=None,
        **kw,
    ):
        return forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)

    decoder.forward = dropping_cache  # a decoder that takes a cache and does not fill it
    prompts, responses = _batch(list(range(9)))
    with pytest.raises(RuntimeError, match=r"model\.share_prompt_cache=false"):
        sequence_log_probs(model, prompts, responses, pad_token_id=0)
    lp, mask, _ = sequence_log_probs(model, prompts, responses, pad_token_id=0, share_prompts=False)
    assert torch.isfinite(lp[mask]).all()


def test_a_pad_id_that_is_also_a_real_token_does_not_merge_two_prompts():
    model = tiny_model(TOK, arch="gpt2").double().eval()  # pad id 0 is also the BOS token
    prompts = [torch.tensor([0, 5, 6, 7]), torch.tensor([5, 6, 7])] * 2  # left-padded, both read [0, 5, 6, 7]
    responses = [torch.tensor([8, 9]), torch.tensor([10]), torch.tensor([11, 12]), torch.tensor([13, 14])]
    lp, _, grads = _scored(model, prompts, responses, share=True)
    lp0, _, grads0 = _scored(model, prompts, responses, share=False)
    torch.testing.assert_close(lp, lp0, atol=1e-12, rtol=0)
    assert _max_diff(grads, grads0) < 1e-12
