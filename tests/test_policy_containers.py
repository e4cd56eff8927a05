"""Issue #13: every mode x input container x ``inplace`` value, and torchrl's LLM env/collector.

Layout follows the container that receives the outputs: a lazy stack gets per-sample entries, a
dense TensorDict or tensorclass (any batch shape, 0-dim included) gets padded tensors with one
boolean mask per padded output. The per-sample values are the same either way, log-probs exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from tensordict import LazyStackedTensorDict, TensorDict, TensorDictBase, is_tensorclass, lazy_stack
from transformers import LogitsProcessorList

from pipeline import TransformersWrapper
from tests.test_policy_invariants import ForceTokenAt, LMData, make_input, per_sample, strings

PROMPTS = ["12+35=", "7*8=", "a longer prompt: 1+2="]
RESPONSES = ["47<|endoftext|>", "56", "3 and more"]
MODES = ["text-generate", "tokens-generate", "text-score", "tokens-score"]
CONTAINERS = ["0-dim", "dense", "lazy", "tensorclass"]
INPLACE = [True, False, "empty"]
RIGHT_PADDED = {
    "tokens_response": "tokens_response_mask",
    "log_probs": "log_probs_mask",
    "logits": "logits_mask",
}


def wrapper_for(mode, model, tok, **kw):
    from_text, generate = mode.startswith("text"), mode.endswith("generate")
    gen = {}
    if generate:
        # row 0 stops after 2 tokens: responses of different lengths, pad (== EOS) after the first EOS
        force = ForceTokenAt(len(tok(PROMPTS[2])["input_ids"]), row=0, step=1, token=tok.eos_token_id)
        gen = {"max_new_tokens": 5, "do_sample": True, "logits_processor": LogitsProcessorList([force])}
    return TransformersWrapper(model, tokenizer=tok, from_text=from_text, generate=generate,
                               return_log_probs=True, generate_kwargs=gen, **kw)  # fmt: skip


def columns(mode, tok, n):
    ids = [torch.tensor(tok(p)["input_ids"]) for p in PROMPTS[:n]]
    resp = [torch.tensor(tok(r, add_special_tokens=False)["input_ids"]) for r in RESPONSES[:n]]
    return {
        "text-generate": {"text": PROMPTS[:n]},
        "tokens-generate": {"tokens": ids},
        "text-score": {"text": PROMPTS[:n], "text_response": RESPONSES[:n]},
        "tokens-score": {"tokens": ids, "tokens_response": resp},
    }[mode]


def build(container, mode, tok):
    if container == "0-dim":
        return make_input("dense", **columns(mode, tok, 1))[0]
    return make_input(container, **columns(mode, tok, len(PROMPTS)))


def run(wrapper, td, **kw):
    torch.manual_seed(0)
    return wrapper(td, **kw)


_REFERENCES: dict = {}


def reference(mode, model, tok, n, **kw):
    """The lazy-stack path (inplace=False): per-sample outputs of the same prompts (cached)."""
    key = (mode, id(model), n, tuple(sorted(kw.items())))
    if key not in _REFERENCES:
        out = run(
            wrapper_for(mode, model, tok, inplace=False, **kw), make_input("lazy", **columns(mode, tok, n))
        )
        _REFERENCES[key] = out.reshape(-1) if out.ndim > 1 else out
    return _REFERENCES[key]


def tensor_keys(wrapper):
    return [k for k in wrapper.out_keys if k not in ("text", "text_response")]


def check_layout(out: TensorDictBase, wrapper, pad_id):
    """Dense outputs: right-padded with the pad id / 0 behind a prefix mask; prompts left-padded."""
    td = out._tensordict if is_tensorclass(out) else out
    td = td.reshape(-1) if td.ndim != 1 else td
    for key, mask_key in RIGHT_PADDED.items():
        if key not in wrapper.out_keys:
            continue
        value, mask = td.get(key), td.get(mask_key)
        assert mask.dtype == torch.bool and mask.shape == value.shape[:2]
        lengths = mask.sum(-1)
        assert torch.equal(mask, torch.arange(mask.shape[1]) < lengths[:, None])  # a prefix: right-padded
        assert (value[~mask] == (pad_id if key == "tokens_response" else 0)).all()
    if "tokens" in wrapper.out_keys:
        mask = td.get("attention_mask")
        assert torch.equal(
            mask.bool(), torch.arange(mask.shape[1]) >= (mask.shape[1] - mask.sum(-1))[:, None]
        )
        assert (td.get("tokens")[~mask.bool()] == pad_id).all()


@pytest.mark.parametrize("inplace", INPLACE, ids=str)
@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("mode", MODES)
def test_mode_container_inplace(models, char_tok, mode, container, inplace):
    model = models("gpt2")
    wrapper = wrapper_for(mode, model, char_tok, inplace=inplace)
    td = build(container, mode, char_tok)
    keys_before = set(td.keys())
    out = run(wrapper, td)
    ref = reference(mode, model, char_tok, max(1, td.numel()))

    assert type(out) is type(td) or (container == "lazy" and isinstance(out, LazyStackedTensorDict))
    assert out.batch_size == td.batch_size
    if inplace is True:
        assert out is td
    else:
        assert out is not td and set(td.keys()) == keys_before  # the input is left as it was
        if inplace is False:
            assert set(out.keys()) <= set(wrapper.out_keys) | set(RIGHT_PADDED.values())
    for key in tensor_keys(wrapper):
        got, want = per_sample(out, key), ref.get(key, as_list=True)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), key  # exactly: log-probs included
    for key in set(wrapper.out_keys) & {"text", "text_response"}:
        got = strings(out, key)
        assert (got if out.ndim else [got]) == ref.get(key).tolist()
    if container == "lazy":
        assert not set(RIGHT_PADDED.values()) & set(out.keys())
    else:
        check_layout(out, wrapper, wrapper.pad_token_id)


@pytest.mark.parametrize("inplace", INPLACE, ids=str)
@pytest.mark.parametrize("container", CONTAINERS)
def test_num_samples_in_every_container(models, char_tok, container, inplace):
    """G samples per prompt: a [*batch, G] result; a dense input cannot hold it, so even with
    inplace=True a new dense batch comes back (the input entries repeated per sample)."""
    model = models("gpt2")
    wrapper = wrapper_for("text-generate", model, char_tok, inplace=inplace, num_samples=2)
    td = build(container, "text-generate", char_tok)
    keys_before = set(td.keys())
    out = run(wrapper, td)
    assert out.batch_size == (*td.batch_size, 2)
    assert out is not td and set(td.keys()) == keys_before
    assert type(out) is type(td) or container == "lazy"
    ref = reference("text-generate", model, char_tok, max(1, td.numel()), num_samples=2)
    for key in tensor_keys(wrapper):
        assert all(torch.equal(g, w) for g, w in zip(per_sample(out, key), ref.get(key, as_list=True)))
    flat = out.reshape(-1)
    assert strings(flat, "text") == [p for p in PROMPTS[: max(1, td.numel())] for _ in range(2)]
    if container != "lazy":
        check_layout(out, wrapper, wrapper.pad_token_id)


@pytest.mark.parametrize("container", ["dense", "tensorclass"])
def test_dense_input_of_any_batch_shape_is_written_in_place(models, char_tok, container):
    model = models("gpt2")
    wrapper = wrapper_for("text-generate", model, char_tok)
    prompts = ["1+1=", "22+3=", "x", "9*9="]
    td = TensorDict(text=[prompts[:2], prompts[2:]], batch_size=[2, 2])
    td = LMData.from_tensordict(td) if container == "tensorclass" else td
    out = run(wrapper, td)
    assert out is td and out.batch_size == (2, 2)
    assert td.get("tokens_response").shape[:2] == td.get("tokens_response_mask").shape[:2] == (2, 2)
    ref = run(wrapper, lazy_stack([TensorDict(text=p) for p in prompts]))
    for key in ("tokens", "tokens_response", "log_probs"):
        assert all(torch.equal(g, w) for g, w in zip(per_sample(out, key), ref.get(key, as_list=True)))
    assert strings(td, "text_response") == [
        ref.get("text_response").tolist()[:2],
        ref.get("text_response").tolist()[2:],
    ]


def test_dense_round_trip_generate_then_score_in_place(models, char_tok):
    """The scorer reads the dense generation output as it is: the masks unpad prompts and responses."""
    model = models("gpt2", torch.float64)
    td = make_input("dense", text=PROMPTS)
    run(wrapper_for("text-generate", model, char_tok), td)
    gen_lp = td.get("log_probs").clone()
    scorer = TransformersWrapper(model, tokenizer=char_tok, from_text=False, generate=False)
    assert scorer(td) is td
    assert torch.equal(td.get("log_probs_mask"), td.get("tokens_response_mask"))
    assert (td.get("log_probs") - gen_lp).abs().max() < 1e-10


def test_score_mode_writes_log_probs_at_the_positions_of_the_response_mask(models, char_tok):
    """A dense ``tokens_response`` padded on the left: its mask says where the tokens are, and the
    log-probs come back at those same positions (aligned column for column with the input)."""
    model = models("gpt2", torch.float64)
    cols = columns("tokens-score", char_tok, 3)
    resp = torch.nn.utils.rnn.pad_sequence(cols["tokens_response"], batch_first=True, padding_side="left")
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r, dtype=torch.bool) for r in cols["tokens_response"]],
                                           batch_first=True, padding_side="left")  # fmt: skip
    td = make_input("dense", tokens=cols["tokens"])
    td.update({"tokens_response": resp, "tokens_response_mask": mask})
    scorer = TransformersWrapper(model, tokenizer=char_tok, from_text=False, generate=False)
    out = scorer(td)
    ref = scorer(make_input("lazy", **cols)).get("log_probs", as_list=True)
    assert out.get("log_probs").shape == resp.shape and torch.equal(out.get("log_probs_mask"), mask)
    assert all(torch.equal(out.get("log_probs")[i][mask[i]], ref[i]) for i in range(3))
    assert (out.get("log_probs")[~mask] == 0).all()


def test_lazy_stack_of_tensorclasses_gets_per_sample_entries(models, char_tok):
    wrapper = wrapper_for("text-generate", models("gpt2"), char_tok)
    td = lazy_stack([LMData(text=p, batch_size=[]) for p in PROMPTS])
    out = run(wrapper, td)
    assert out is td and isinstance(td._tensordict, LazyStackedTensorDict)
    assert [len(r) for r in td.get("tokens_response", as_list=True)] == [
        len(x) for x in td.get("log_probs", as_list=True)
    ]


def test_tensordict_out_receives_the_layout_of_its_container(models, char_tok):
    model = models("gpt2")
    wrapper = wrapper_for("text-generate", model, char_tok)
    td = make_input("dense", text=PROMPTS)
    dense_out, lazy_out = TensorDict(batch_size=[3]), lazy_stack([TensorDict() for _ in PROMPTS])
    assert run(wrapper, td, tensordict_out=dense_out) is dense_out
    assert run(wrapper, td, tensordict_out=lazy_out) is lazy_out
    assert "tokens_response" not in td.keys()
    assert all(
        torch.equal(g, w)
        for g, w in zip(per_sample(dense_out, "log_probs"), lazy_out.get("log_probs", as_list=True))
    )
    assert "log_probs_mask" in dense_out.keys() and "log_probs_mask" not in lazy_out.keys()


def test_torchrl_llm_env_and_collector_drive_the_wrapper(models, char_tok):
    """torchrl's LLMEnv (the env of this key contract: text / text_response / tokens_response) and
    LLMCollector run the wrapper as their policy, unchanged, for a short multi-turn collection."""
    from torchrl.collectors.llm import LLMCollector
    from torchrl.envs.llm import LLMEnv

    class Prompts:  # a dataloader: one batch of prompts per reset
        batch_size = 2

        def __iter__(self):
            return self

        def __next__(self):
            return {"text": PROMPTS[:2]}

    model = models("gpt2")
    policy = TransformersWrapper(model, tokenizer=char_tok, return_log_probs=True,
                                 generate_kwargs={"max_new_tokens": 3, "do_sample": True})  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # LLMEnv is deprecated in favour of ChatEnv
        env = LLMEnv.from_dataloader(
            Prompts(), from_text=True, batch_size=2, eos_token_id=char_tok.eos_token_id
        )
        # any nn.Module policy makes torchrl 0.14 warn that the env lacks InitTracker (unused here)
        warnings.simplefilter("ignore", FutureWarning)
        collector = LLMCollector(env, policy=policy, dialog_turns_per_batch=4, total_dialog_turns=8)
    torch.manual_seed(0)
    batches = list(collector)
    assert len(batches) == 2
    scorer = TransformersWrapper(model, tokenizer=char_tok, from_text=False, generate=False)
    for data in batches:
        assert data.batch_size == (2, 2)  # [envs, turns]
        flat = data.reshape(-1)
        responses = flat.get("tokens_response", as_list=True)
        log_probs = flat.get("log_probs", as_list=True)
        assert [len(r) for r in responses] == [len(lp) for lp in log_probs]
        assert flat.get("text_response").tolist() == [char_tok.decode(r) for r in responses]
        # next turn's prompt = this prompt + this response (the env concatenates text)
        nxt = flat.get(("next", "text")).tolist()
        assert nxt == [p + r for p, r in zip(flat.get("text").tolist(), flat.get("text_response").tolist())]
        scored = scorer(lazy_stack([flat[i].select("tokens", "tokens_response") for i in range(4)]))
        for lp, s in zip(log_probs, scored.get("log_probs", as_list=True)):
            assert (lp - s).abs().max() < 1e-4
