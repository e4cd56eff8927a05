"""One test per defect of the reference wrapper (DESIGN.md §2): each fails on the reference behaviour."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict, lazy_stack
from torchrl.data.llm import History
from transformers import LogitsProcessorList

from pipeline import TransformersWrapper
from pipeline.logprobs import StepLogProbs
from tests.test_policy_invariants import ForceTokenAt, per_sample, reference_log_probs


def _scorer(model, tok, **kw):
    return TransformersWrapper(model, tokenizer=tok, from_text=False, generate=False, **kw)


def test_1_left_padded_scoring_uses_positions_from_the_mask(models, char_tok):
    model = models("gpt2", torch.float64)
    prompts = [torch.tensor(char_tok(p)["input_ids"]) for p in ["1+1=", "123+456="]]
    responses = [torch.tensor(char_tok(r)["input_ids"]) for r in ["2", "579"]]
    td = lazy_stack([TensorDict(tokens=p, tokens_response=r) for p, r in zip(prompts, responses)])
    ours = _scorer(model, char_tok)(td).get("log_probs", as_list=True)
    ref = reference_log_probs(model, prompts[0], responses[0])
    assert (ours[0] - ref).abs().max() < 1e-10

    # The reference ran the left-padded batch without position_ids: GPT-2 then scores other tokens.
    seq = torch.cat([torch.full((4,), 0), prompts[0], responses[0]])[None]
    mask = torch.cat([torch.zeros(4), torch.ones(5)])[None].long()
    with torch.no_grad():
        logits = model(seq, attention_mask=mask).logits[0, -2:-1]
    reference_way = torch.log_softmax(logits, -1)[0, responses[0][0]]
    assert (reference_way - ref[0]).abs() > 1e-3


def test_2_pad_equals_eos_keeps_response_eos_and_prompt_eos(models, char_tok):
    model = models("gpt2", torch.float64)
    assert char_tok.pad_token_id is None  # GPT-2 style: the wrapper pads with EOS
    eos = char_tok.eos_token_id
    # A prompt with an EOS inside (tokens mode, no attention mask: every token is real).
    prompt = torch.tensor([10, 11, eos, 12, 13])
    response = torch.tensor([20, 21, eos])
    td = TensorDict(tokens=prompt[None], tokens_response=response[None], batch_size=[1])
    lp = _scorer(model, char_tok)(td).get("log_probs", as_list=True)[0]
    assert lp.shape == (3,)  # the reference dropped the EOS from the response (mask = tokens != pad)
    assert (lp - reference_log_probs(model, prompt, response)).abs().max() < 1e-10

    gen = TransformersWrapper(model, tokenizer=char_tok, from_text=False, return_log_probs=True,
                              generate_kwargs={"max_new_tokens": 4, "do_sample": True})  # fmt: skip
    out = gen(TensorDict(tokens=prompt[None], batch_size=[1]))
    assert torch.equal(out.get("tokens", as_list=True)[0], prompt)  # prompt EOS not dropped


def test_2b_every_eos_id_of_the_generation_config_ends_a_response(models, char_tok):
    model = models("gpt2", torch.float64)
    stop = char_tok.convert_tokens_to_ids("7")
    wrapper = TransformersWrapper(model, tokenizer=char_tok, return_log_probs=True,
                                  generate_kwargs={"max_new_tokens": 30, "do_sample": True,
                                                   "eos_token_id": [char_tok.eos_token_id, stop]})  # fmt: skip
    torch.manual_seed(0)
    out = wrapper(TensorDict(text=["1+1="] * 16, batch_size=[16]))
    ended = 0
    for resp, lp in zip(per_sample(out, "tokens_response"), per_sample(out, "log_probs")):
        stops = torch.isin(resp, torch.tensor([char_tok.eos_token_id, stop]))
        assert stops[:-1].sum() == 0  # nothing after the first stop token
        ended += int(stops[-1])
        assert len(lp) == len(resp)
    assert ended > 0


def test_3_history_generation_renders_the_assistant_prompt(models, chat_tok):
    model = models("gpt2", tokenizer=chat_tok)
    history = History.from_chats([[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "hi"}]])
    wrapper = TransformersWrapper(model, tokenizer=chat_tok, generate_kwargs={"max_new_tokens": 3})
    out = wrapper(TensorDict(history=history, batch_size=[2]))
    texts = out.get("text").tolist()
    assert texts[0] == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert all(t.endswith("<|im_start|>assistant\n") for t in texts)


@pytest.mark.parametrize("name", ["chatml_format", "qwen"])
def test_3b_named_and_custom_templates(models, chat_tok, char_tok, name):
    model = models("gpt2", tokenizer=chat_tok)
    history = History.from_chats([[{"role": "user", "content": "hi"}]])
    out = TransformersWrapper(model, tokenizer=chat_tok, chat_template_name=name,
                              generate_kwargs={"max_new_tokens": 2})(TensorDict(history=history, batch_size=[1]))  # fmt: skip
    assert out.get("text").tolist()[0].rstrip().endswith("<|im_start|>assistant")
    custom = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}bot:{% endif %}"
    out = TransformersWrapper(models("gpt2"), tokenizer=char_tok, chat_template=custom,
                              generate_kwargs={"max_new_tokens": 2})(TensorDict(history=history, batch_size=[1]))  # fmt: skip
    assert out.get("text").tolist() == ["user: hi\nbot:"]


def test_3c_history_scoring_scores_the_last_assistant_message(models, chat_tok):
    model = models("gpt2", torch.float64, tokenizer=chat_tok)
    chats = [[{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]]
    scorer = TransformersWrapper(model, tokenizer=chat_tok, generate=False)
    out = scorer(TensorDict(history=History.from_chats(chats), batch_size=[1]))
    response = chat_tok.decode(out.get("tokens_response", as_list=True)[0])
    assert response == "4<|im_end|>\n"
    explicit = scorer(TensorDict(history=History.from_chats([chats[0][:1]]), text_response=["4<|im_end|>\n"],
                                 batch_size=[1]))  # fmt: skip
    assert torch.equal(explicit.get("log_probs", as_list=True)[0], out.get("log_probs", as_list=True)[0])


def test_4_runtime_kwargs_override_instead_of_replacing(models, char_tok):
    model = models("gpt2")
    wrapper = TransformersWrapper(model, tokenizer=char_tok, generate_kwargs={"max_new_tokens": 3})
    out = wrapper(TensorDict(text=["1+1="] * 8, batch_size=[8]), do_sample=True, temperature=2.0)
    # A fresh GenerationConfig(**kwargs) would fall back to max_length=20 (16 new tokens here).
    assert max(len(r) for r in out.get("tokens_response", as_list=True)) <= 3
    assert wrapper.generation_config.temperature in (None, 1.0)  # the call did not leak into the config


def test_5_score_mode_does_not_pass_generation_kwargs_to_forward(models, char_tok):
    model = models("gpt2", torch.float64)
    scorer = _scorer(model, char_tok, generate_kwargs={"max_new_tokens": 5, "do_sample": True, "top_k": 3})
    td = TensorDict(tokens=torch.tensor([[5, 6, 7]]), tokens_response=torch.tensor([[8, 9]]), batch_size=[1])
    lp = scorer(td).get("log_probs", as_list=True)[0]
    assert (
        lp - reference_log_probs(model, torch.tensor([5, 6, 7]), torch.tensor([8, 9]))
    ).abs().max() < 1e-10
    with pytest.raises(ValueError, match="only apply when generate=True"):
        scorer(td, temperature=0.5)


def test_6_text_scoring_tokenizes_the_response_on_its_own(bpe_tok):
    from pipeline.tiny import tiny_model

    model = tiny_model(bpe_tok, dtype=torch.float64)
    prompt, response = "hello hel", "lo world"
    joint = bpe_tok(prompt + response)["input_ids"]
    split = bpe_tok(prompt)["input_ids"] + bpe_tok(response, add_special_tokens=False)["input_ids"]
    assert joint != split  # BPE merges across the boundary: the reference's prefix assumption breaks
    out = TransformersWrapper(model, tokenizer=bpe_tok, generate=False)(
        TensorDict(text=[prompt], text_response=[response], batch_size=[1])
    )
    resp_ids = out.get("tokens_response", as_list=True)[0]
    assert resp_ids.tolist() == bpe_tok(response, add_special_tokens=False)["input_ids"]
    assert bpe_tok.decode(resp_ids) == response
    ref = reference_log_probs(model, torch.tensor(bpe_tok(prompt)["input_ids"]), resp_ids)
    assert (out.get("log_probs", as_list=True)[0] - ref).abs().max() < 1e-10


def test_7_empty_prompt_scores_from_bos_with_shifted_logits(models, char_tok):
    from pipeline.tiny import char_tokenizer, tiny_model

    tok = char_tokenizer(bos=True)
    model = tiny_model(tok, dtype=torch.float64)
    out = TransformersWrapper(model, tokenizer=tok, generate=False)(
        TensorDict(text=[""], text_response=["abc"], batch_size=[1])
    )
    lp = out.get("log_probs", as_list=True)[0]
    assert out.get("tokens", as_list=True)[0].tolist() == [tok.bos_token_id]
    ref = reference_log_probs(model, torch.tensor([tok.bos_token_id]), torch.tensor(tok("abc")["input_ids"]))
    assert lp.shape == (3,) and (lp - ref).abs().max() < 1e-10
    # the reference's unshifted logits score token t with the logits that predict t+1
    with torch.no_grad():
        unshifted = torch.log_softmax(model(torch.tensor([tok("abc")["input_ids"]])).logits[0], -1)
    assert (unshifted[0, tok("abc")["input_ids"][0]] - lp[0]).abs() > 1e-3


def test_8_only_one_of_prompt_and_response_is_an_error(models, char_tok):
    scorer = TransformersWrapper(models("gpt2"), tokenizer=char_tok, generate=False)
    with pytest.raises(ValueError, match="text_response"):
        scorer(TensorDict(text=["1+1="], batch_size=[1]))
    with pytest.raises(ValueError, match="'text'"):
        scorer(TensorDict(text_response=["2"], batch_size=[1]))


def test_9_generation_keeps_one_step_of_logits_not_all(models, char_tok):
    model = models("gpt2")
    wrapper = TransformersWrapper(model, tokenizer=char_tok, return_log_probs=True,
                                  generate_kwargs={"max_new_tokens": 6, "min_new_tokens": 6})  # fmt: skip
    assert "logits" not in wrapper.out_keys and wrapper.generation_config.output_logits is False
    out = wrapper(TensorDict(text=["1+1=", "22+3="], batch_size=[2]))
    assert "logits" not in out.keys()
    recorder = StepLogProbs(1.0)
    handle = model.register_forward_hook(recorder, with_kwargs=True)
    try:
        model.generate(torch.tensor([[5, 6]]), attention_mask=torch.ones(1, 2, dtype=torch.long),
                       max_new_tokens=6, min_new_tokens=6, do_sample=True, pad_token_id=0)  # fmt: skip
    finally:
        handle.remove()
    assert recorder.pending.shape == (1, len(char_tok))  # one step's [B, V], not B x T x V
    assert all(s.shape == (1,) for s in recorder.steps)
    # full logits only on request, and then they are the raw logits behind the log-probs
    full = TransformersWrapper(model, tokenizer=char_tok, return_log_probs=True, return_logits=True,
                               generate_kwargs={"max_new_tokens": 4})(TensorDict(text=["1+1="], batch_size=[1]))  # fmt: skip
    logits, lp, resp = full["logits"][0], full["log_probs"][0], full["tokens_response"][0]
    assert logits.shape == (len(resp), len(char_tok))
    assert (torch.log_softmax(logits, -1).gather(-1, resp[:, None]).squeeze(-1) - lp).abs().max() < 1e-5


def test_10_missing_tokenizer_is_a_clear_error_not_get_tokenizer(models):
    with pytest.raises(ValueError, match="tokenizer is required"):
        TransformersWrapper(models("gpt2"), from_text=True)


def test_11_callers_tokenizer_is_not_mutated(models, char_tok):
    assert char_tok.pad_token is None
    wrapper = TransformersWrapper(models("gpt2"), tokenizer=char_tok, generate_kwargs={"max_new_tokens": 2})
    wrapper(TensorDict(text=["a", "bcd"], batch_size=[2]))
    assert char_tok.pad_token is None
    assert wrapper.pad_token_id == char_tok.eos_token_id  # pad id, not tokenizer(pad_token)[0]


def test_skip_special_tokens_decodes_the_completion_text(models, char_tok):
    model = models("gpt2")
    prompt_len = len(char_tok("1+1=")["input_ids"])
    force = LogitsProcessorList([ForceTokenAt(prompt_len, row=0, step=2, token=char_tok.eos_token_id)])
    outs = {}
    for skip in (False, True):
        wrapper = TransformersWrapper(model, tokenizer=char_tok, skip_special_tokens=skip,
                                      generate_kwargs={"max_new_tokens": 5, "logits_processor": force})  # fmt: skip
        outs[skip] = wrapper(TensorDict(text=["1+1="], batch_size=[1]))
    resp = outs[True].get("tokens_response", as_list=True)[0]
    assert torch.equal(resp, outs[False].get("tokens_response", as_list=True)[0])
    assert len(resp) == 3 and resp[-1] == char_tok.eos_token_id
    assert outs[False].get("text_response").tolist() == [char_tok.decode(resp)]
    assert outs[True].get("text_response").tolist() == [char_tok.decode(resp[:-1])]
    assert char_tok.eos_token not in outs[True].get("text_response").tolist()[0]
