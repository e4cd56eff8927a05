"""Misuse of the wrapper API: a clear ValueError/TypeError naming the argument or key, before any model call."""

from __future__ import annotations

import pytest
import torch
from tensordict import TensorDict, lazy_stack, tensorclass

from pipeline import TransformersWrapper


class CountingModel(torch.nn.Module):
    """Wraps a tiny model and counts forward calls, to prove errors come before any model work."""

    def __init__(self, model):
        super().__init__()
        self.inner = model
        self.calls = 0
        self.generation_config = model.generation_config
        self.config = model.config

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)

    def generate(self, *args, **kwargs):
        self.calls += 1
        return self.inner.generate(*args, **kwargs)


def W(model, tok, **kw):
    return TransformersWrapper(model, tokenizer=tok, **kw)


@tensorclass
class PromptOnly:
    """A tensorclass that cannot hold the wrapper's outputs."""

    text: list | None = None


TEXT = TensorDict(text=["1+1="], batch_size=[1])
TOKENS = TensorDict(tokens=torch.tensor([[5, 6]]), batch_size=[1])

# (id, constructor kwargs, input or None, forward kwargs, error type, text the message must contain)
CASES = [
    ("model-not-a-module", {"model": "gpt2"}, None, {}, TypeError, "model"),
    ("from-text-no-tokenizer", {"tokenizer": None}, None, {}, ValueError, "tokenizer"),
    ("tokenizer-wrong-type", {"tokenizer": "gpt2"}, None, {}, TypeError, "tokenizer"),
    ("pad-output-false", {"pad_output": False}, None, {}, ValueError, "pad_output"),
    ("inplace-bad", {"inplace": "yes"}, None, {}, ValueError, "inplace"),
    ("generate-not-bool", {"generate": "no"}, None, {}, TypeError, "generate"),
    ("skip-special-not-bool", {"skip_special_tokens": 1}, None, {}, TypeError, "skip_special_tokens"),
    ("score-without-log-probs", {"generate": False, "return_log_probs": False}, None, {}, ValueError, "return_log_probs"),
    ("unknown-template-name", {"chat_template_name": "vicuna"}, None, {}, ValueError, "chat_template_name"),
    ("both-templates", {"chat_template_name": "qwen", "chat_template": "{{x}}"}, None, {}, ValueError, "chat_template"),
    ("num-samples-zero", {"num_samples": 0}, None, {}, ValueError, "num_samples"),
    ("num-samples-score", {"num_samples": 2, "generate": False}, None, {}, ValueError, "num_samples"),
    ("log-probs-temperature", {"log_probs_temperature": 0.0}, None, {}, ValueError, "log_probs_temperature"),
    ("max-new-tokens-zero", {"generate_kwargs": {"max_new_tokens": 0}}, None, {}, ValueError, "max_new_tokens"),
    ("temperature-negative", {"generate_kwargs": {"temperature": -1.0, "do_sample": True}}, None, {}, ValueError, "temperature"),
    ("top-p-out-of-range", {"generate_kwargs": {"top_p": 1.5, "do_sample": True}}, None, {}, ValueError, "top_p"),
    ("unknown-generate-key", {"generate_kwargs": {"temprature": 0.7}}, None, {}, ValueError, "temprature"),
    ("num-return-sequences", {"generate_kwargs": {"num_return_sequences": 4}}, None, {}, ValueError, "num_samples"),
    ("beams-with-log-probs", {"return_log_probs": True, "generate_kwargs": {"num_beams": 2}}, None, {}, ValueError, "num_beams"),
    ("generate-kwargs-not-dict", {"generate_kwargs": [("max_new_tokens", 3)]}, None, {}, TypeError, "generate_kwargs"),
    ("tokenizer-padding-right", {"tokenizer_kwargs": {"padding_side": "right"}}, None, {}, ValueError, "padding_side"),
    ("tokenizer-unknown-kwarg", {"tokenizer_kwargs": {"return_offsets": True}}, None, {}, ValueError, "return_offsets"),
    ("input-not-tensordict", {}, {"text": ["a"]}, {}, TypeError, "TensorDict"),
    ("tensorclass-missing-fields", {}, PromptOnly(text=["a"], batch_size=[1]), {}, ValueError,
     r"PromptOnly does not declare .*'tokens_response', .*'tokens_response_mask'"),
    ("tensordict-out-wrong-size", {}, TEXT, {"tensordict_out": TensorDict(batch_size=[3])}, ValueError, "tensordict_out"),
    ("tensordict-out-not-tensordict", {}, TEXT, {"tensordict_out": {}}, TypeError, "tensordict_out"),
    ("no-text-no-history", {}, TensorDict(tokens=torch.tensor([[1]]), batch_size=[1]), {}, ValueError, "history"),
    ("text-not-strings", {}, TensorDict(text=torch.tensor([1.0]), batch_size=[1]), {}, TypeError, "text"),
    ("runtime-unknown-kwarg", {}, TEXT, {"temprature": 0.5}, ValueError, "temprature"),
    ("runtime-max-new-tokens", {}, TEXT, {"max_new_tokens": -3}, ValueError, "max_new_tokens"),
    ("runtime-num-samples", {}, TEXT, {"num_samples": -1}, ValueError, "num_samples"),
    ("empty-batch", {}, TensorDict(text=[], batch_size=[0]), {}, ValueError, "empty batch"),
    ("history-without-template", {}, "history", {}, ValueError, "chat_template"),
    ("tokens-missing", {"from_text": False}, TensorDict(text=["a"], batch_size=[1]), {}, ValueError, "tokens"),
    ("tokens-float", {"from_text": False}, TensorDict(tokens=torch.tensor([[1.0, 2.0]]), batch_size=[1]), {}, TypeError, "tokens"),
    ("tokens-out-of-vocab", {"from_text": False}, TensorDict(tokens=torch.tensor([[5, 10_000]]), batch_size=[1]), {}, ValueError, "vocabulary"),
    ("tokens-negative", {"from_text": False}, TensorDict(tokens=torch.tensor([[-1, 5]]), batch_size=[1]), {}, ValueError, "tokens"),
    ("tokens-out-of-vocab-row", {"from_text": False}, TensorDict(tokens=torch.tensor([[5, 6], [7, 999]]), batch_size=[2]), {},
     ValueError, r"tokens\[1\] has token ids outside the vocabulary .*max 999"),
    ("mask-shape-mismatch", {"from_text": False},
     lazy_stack([TensorDict(tokens=torch.tensor([5, 6]), attention_mask=torch.tensor([1, 1, 1]))]), {}, ValueError, "attention_mask"),
    ("response-mask-shape-mismatch", {"from_text": False, "generate": False},
     TensorDict(tokens=torch.tensor([[5]]), tokens_response=torch.tensor([[6, 7]]), tokens_response_mask=torch.tensor([[True]]),
                batch_size=[1]), {}, ValueError, "tokens_response_mask"),
    ("score-missing-response", {"from_text": False, "generate": False}, TOKENS, {}, ValueError, "tokens_response"),
    ("score-response-out-of-vocab", {"from_text": False, "generate": False},
     TensorDict(tokens=torch.tensor([[5]]), tokens_response=torch.tensor([[999]]), batch_size=[1]), {}, ValueError, "tokens_response"),
    ("score-runtime-kwargs", {"generate": False}, TensorDict(text=["a"], text_response=["b"], batch_size=[1]),
     {"temperature": 0.5}, ValueError, "generate=True"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("ctor", "td", "fwd", "err", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_wrapper_input(models, char_tok, ctor, td, fwd, err, needle):
    model = CountingModel(models("gpt2"))
    ctor = dict(ctor)
    target = ctor.pop("model", model)
    tok = ctor.pop("tokenizer", char_tok)
    if td == "history":
        from torchrl.data.llm import History

        td = TensorDict(history=History.from_chats([[{"role": "user", "content": "hi"}]]), batch_size=[1])
    with pytest.raises(err, match=needle):
        wrapper = W(target, tok, **ctor)
        if td is not None:
            wrapper(td, **fwd)
    assert model.calls == 0
