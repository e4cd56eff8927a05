"""Model loading: the fused activation swap is the same function, and saved models keep their config."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from pipeline.logprobs import sequence_log_probs
from tests.helpers import load_configured


def test_fused_activation_is_the_same_function(saved_tiny, tmp_path):
    plain, fused = (
        load_configured(saved_tiny, fused_activation=False),
        load_configured(saved_tiny, fused_activation=True),
    )
    assert plain.config.activation_function == fused.config.activation_function == "gelu_new"
    kinds = {type(b.mlp.act).__name__ for b in fused.transformer.h}
    assert kinds != {type(b.mlp.act).__name__ for b in plain.transformer.h}, kinds
    prompts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
    responses = [torch.tensor([10, 11, 12, 13]), torch.tensor([14, 15])]
    lp_plain, mask, _ = sequence_log_probs(plain, prompts, responses, pad_token_id=0)
    lp_fused, _, _ = sequence_log_probs(fused, prompts, responses, pad_token_id=0)
    assert torch.allclose(lp_plain[mask], lp_fused[mask], atol=1e-5)
    # float64 reference: gelu_new's formula against the fused kernel
    ref64 = sequence_log_probs(
        load_configured(saved_tiny, torch.float64, fused_activation=False), prompts, responses, pad_token_id=0
    )[0]
    assert (lp_fused[mask].double() - ref64[mask]).abs().max() < 1e-5
    # the saved model still says gelu_new: other tools load it unchanged
    fused.save_pretrained(tmp_path / "out")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.activation_function == "gelu_new"
