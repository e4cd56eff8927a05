"""The log-prob invariants of DESIGN.md §2, on GPT-2 (absolute positions) and Llama (rotary)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tensordict import LazyStackedTensorDict, TensorDict, is_tensorclass, lazy_stack, tensorclass
from transformers import LogitsProcessor, LogitsProcessorList

from pipeline import TransformersWrapper

PROMPTS = ["12+35=", "7*8=", "a much longer prompt: 123+456=", "x"]
TOL = {torch.float32: 1e-4, torch.float64: 1e-10}
CONTAINERS = ["dense", "lazy", "tensorclass"]


@tensorclass
class LMData:
    """A user's tensorclass declaring every field the wrapper reads or writes."""

    text: Any = None
    history: Any = None
    tokens: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    tokens_response: torch.Tensor | None = None
    tokens_response_mask: torch.Tensor | None = None
    text_response: Any = None
    log_probs: torch.Tensor | None = None
    log_probs_mask: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    logits_mask: torch.Tensor | None = None


def make_input(container: str, **columns):
    """A batch of per-sample ``columns`` (lists of str or 1-D tensors) in the given container.

    Dense containers hold tensors padded as the wrapper writes them: ``tokens`` left-padded with
    ``attention_mask``, ``tokens_response`` right-padded with ``tokens_response_mask``.
    """
    n = len(next(iter(columns.values())))
    if container == "lazy":
        return lazy_stack([TensorDict({k: v[i] for k, v in columns.items()}) for i in range(n)])
    data = {}
    for key, values in columns.items():
        if not isinstance(values[0], torch.Tensor):
            data[key] = values
            continue
        side = "left" if key == "tokens" else "right"
        data[key] = torch.nn.utils.rnn.pad_sequence(values, batch_first=True, padding_side=side)
        mask = torch.nn.utils.rnn.pad_sequence(
            [torch.ones_like(v) for v in values], batch_first=True, padding_side=side
        )
        data["attention_mask" if key == "tokens" else f"{key}_mask"] = (
            mask if key == "tokens" else mask.bool()
        )
    td = TensorDict(data, batch_size=[n])
    return LMData.from_tensordict(td) if container == "tensorclass" else td


def strings(out, key: str) -> list:
    """A text entry as a (nested) list of str, from a tensordict or a tensorclass."""
    value = out.get(key)
    return (
        value.tolist() if hasattr(value, "tolist") else [list(v) if isinstance(v, list) else v for v in value]
    )


def per_sample(out, key: str) -> list:
    """The per-sample values of ``key`` in any output layout (flattened batch)."""
    td = out._tensordict if is_tensorclass(out) else out
    flat = td.reshape(-1) if td.ndim != 1 else td
    if isinstance(flat, LazyStackedTensorDict):
        return flat.get(key, as_list=True)
    mask_key = "attention_mask" if key in ("tokens", "attention_mask") else f"{key}_mask"
    return [row[m.bool()] for row, m in zip(flat.get(key), flat.get(mask_key))]


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


SCORE_KEYS = ("tokens", "attention_mask", "tokens_response", "tokens_response_mask")


def generate(model, tok, *, dtype, temperature=1.0, num_samples=None, container="dense", **gen):
    wrapper = TransformersWrapper(
        model,
        tokenizer=tok,
        return_log_probs=True,
        log_probs_temperature=temperature,
        num_samples=num_samples,
        generate_kwargs={"max_new_tokens": 12, "do_sample": True, "temperature": temperature, **gen},
    )
    torch.manual_seed(1)
    return wrapper(make_input(container, text=PROMPTS))


def score(scorer, out, key="log_probs"):
    """Scores the prompt/response pairs of a generation output (same container), per sample."""
    return per_sample(scorer(out.select(*SCORE_KEYS, strict=False)), key)


@pytest.mark.parametrize("container", CONTAINERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_generation_log_probs_equal_scoring_and_reference(models, char_tok, arch, dtype, container):
    model = models(arch, dtype)
    prompt_len = max(len(char_tok(p)["input_ids"]) for p in PROMPTS)
    force_eos = LogitsProcessorList([ForceTokenAt(prompt_len, row=1, step=3, token=char_tok.eos_token_id)])
    out = generate(model, char_tok, dtype=dtype, container=container, logits_processor=force_eos)

    responses = per_sample(out, "tokens_response")
    gen_lp = per_sample(out, "log_probs")
    assert len(responses[1]) == 4 and responses[1][-1] == char_tok.eos_token_id  # pad == eos kept
    assert [len(r) for r in responses] == [len(lp) for lp in gen_lp]
    assert gen_lp[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)

    scorer = TransformersWrapper(model, tokenizer=char_tok, from_text=False, generate=False)
    scored = score(scorer, out)
    for i, prompt in enumerate(per_sample(out, "tokens")):
        ref = reference_log_probs(model, prompt, responses[i])
        assert (gen_lp[i] - scored[i]).abs().max() <= TOL[dtype]
        assert (gen_lp[i].double() - ref).abs().max() <= TOL[dtype]
        assert (scored[i].double() - ref).abs().max() <= TOL[dtype]
        assert gen_lp[i].isfinite().all() and (gen_lp[i] <= 0).all()


@pytest.mark.parametrize("container", CONTAINERS)
def test_log_probs_at_sampling_temperature(models, char_tok, arch, container):
    model = models(arch, torch.float64)
    out = generate(model, char_tok, dtype=torch.float64, temperature=0.7, container=container)
    scorer = TransformersWrapper(
        model, tokenizer=char_tok, from_text=False, generate=False, log_probs_temperature=0.7
    )
    scored = score(scorer, out)
    gen_lp = per_sample(out, "log_probs")
    for i, (prompt, resp) in enumerate(zip(per_sample(out, "tokens"), per_sample(out, "tokens_response"))):
        ref = reference_log_probs(model, prompt, resp, temperature=0.7)
        assert (gen_lp[i] - ref).abs().max() <= 1e-10
        assert (scored[i] - ref).abs().max() <= 1e-10
        # and it is a different distribution from T=1: the option is not a no-op
        assert (reference_log_probs(model, prompt, resp) - ref).abs().max() > 1e-3


@pytest.mark.parametrize("container", CONTAINERS)
def test_batched_scoring_equals_one_by_one(models, char_tok, arch, container):
    model = models(arch, torch.float64)
    scorer = TransformersWrapper(model, tokenizer=char_tok, generate=False)
    responses = ["47<|endoftext|>", "56", "579 and more", "y"]
    batched = per_sample(scorer(make_input(container, text=PROMPTS, text_response=responses)), "log_probs")
    for i in range(4):
        single = scorer(TensorDict(text=PROMPTS[i], text_response=responses[i])).get("log_probs")
        assert single.shape == batched[i].shape == (len(char_tok(responses[i])["input_ids"]),)
        assert (single - batched[i]).abs().max() <= 1e-10


@pytest.mark.parametrize("container", ["dense", "lazy"])
def test_greedy_matches_model_generate_token_for_token(models, char_tok, arch, container):
    model = models(arch, torch.float64)
    wrapper = TransformersWrapper(
        model, tokenizer=char_tok, generate_kwargs={"max_new_tokens": 10, "do_sample": False}
    )
    out = wrapper(make_input(container, text=PROMPTS))
    for prompt, resp in zip(PROMPTS, per_sample(out, "tokens_response")):
        ids = torch.tensor([char_tok(prompt)["input_ids"]])
        ref = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=False, pad_token_id=0
        )[0, ids.shape[1] :]
        eos = (ref == char_tok.eos_token_id).nonzero()
        ref = ref[: int(eos[0]) + 1] if len(eos) else ref
        assert torch.equal(resp, ref)


@pytest.mark.parametrize("container", CONTAINERS)
def test_num_samples_groups_and_log_probs(models, char_tok, container):
    model = models("gpt2", torch.float64)
    out = generate(model, char_tok, dtype=torch.float64, num_samples=3, container=container)
    assert out.batch_size == (4, 3)
    flat = out.reshape(-1)
    assert strings(flat, "text") == [p for p in PROMPTS for _ in range(3)]
    responses = per_sample(flat, "tokens_response")
    assert len({tuple(r.tolist()) for r in responses[:3]}) > 1  # samples differ within a group
    for prompt, resp, lp in zip(per_sample(flat, "tokens"), responses, per_sample(flat, "log_probs")):
        assert (lp - reference_log_probs(model, prompt, resp)).abs().max() <= 1e-10


def test_padded_reads_of_outputs(models, char_tok):
    model = models("gpt2")
    out = generate(model, char_tok, dtype=torch.float32, container="lazy")
    lengths = [len(r) for r in out.get("tokens_response", as_list=True)]
    padded = out.get("log_probs", as_padded_tensor=True, padding_side="right", padding_value=0.0)
    assert padded.shape == (4, max(lengths))
    for i, n in enumerate(lengths):
        assert torch.equal(padded[i, :n], out[i]["log_probs"])
        assert (padded[i, n:] == 0).all()
    # the dense layout is that same padded tensor, with its mask
    dense = generate(model, char_tok, dtype=torch.float32, container="dense")
    assert torch.equal(dense["log_probs"], padded)
    assert dense["log_probs_mask"].sum(-1).tolist() == lengths


def test_lazy_stacked_input_is_written_in_place(models, char_tok):
    model = models("gpt2")
    wrapper = TransformersWrapper(model, tokenizer=char_tok, generate_kwargs={"max_new_tokens": 3})
    td = lazy_stack([TensorDict(text=p) for p in PROMPTS[:2]])
    out = wrapper(td)
    assert out is td and "tokens_response" in td[0].keys()
