"""``model.compile_activation`` (pipeline.activations): the tanh approximation of GELU as compiled
kernels gives torch's values and gradients (float64 references), inside a model and inside a compiled
decoding graph; what it cannot do is refused by name, before the model loads."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.activations import CompiledGeluTanh, compile_gelu_tanh
from pipeline.logprobs import sequence_log_probs
from tests.helpers import load_configured, run_without_cpp_compiler, save_tiny_model

PROMPTS = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
RESPONSES = [torch.tensor([10, 11, 12, 13]), torch.tensor([14, 15])]


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    extremes = torch.tensor([-100.0, -30.0, -9.0, -3.0, -1e-3, 0.0, 1e-3, 3.0, 9.0, 30.0, 100.0])
    return torch.cat([extremes, torch.randn(4096, generator=torch.Generator().manual_seed(0)) * 3]).to(dtype)


def _reference(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x64 = x.detach().double().requires_grad_()
    y64 = F.gelu(x64, approximate="tanh")
    y64.backward(grad.double())
    return y64.detach(), x64.grad


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-6), (torch.bfloat16, 0.07)])
def test_values_and_gradients_are_torchs_tanh_gelu(dtype, atol):
    x = _inputs(dtype).requires_grad_()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = CompiledGeluTanh()(x)
    y.backward(grad)
    ref_y, ref_grad = _reference(x, grad)
    assert y.dtype == x.grad.dtype == dtype
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()  # exp(-z) stays finite at x = -100
    # at least as close as torch's own kernel in the same dtype (bfloat16: its rounding of a value ~100)
    torch_y = F.gelu(x.detach(), approximate="tanh")
    assert (y.double() - ref_y).abs().max() <= max(atol, 2 * (torch_y.double() - ref_y).abs().max())
    assert (x.grad.double() - ref_grad).abs().max() < (atol if dtype == torch.float32 else 0.02)


def test_inside_a_compiled_graph_the_ops_join_it():
    x = _inputs(torch.float32)
    act = CompiledGeluTanh()
    graph = torch.compile(lambda v: act(v) * 2, fullgraph=True)  # fails on a graph break
    with torch.no_grad():
        assert (graph(x).double() - 2 * F.gelu(x.double(), approximate="tanh")).abs().max() < 4e-6


def test_a_model_scores_and_trains_as_with_torchs_kernel(saved_tiny):
    plain, compiled = load_configured(saved_tiny), load_configured(saved_tiny, compile_activation=True)
    acts = [type(block.mlp.act) for block in compiled.transformer.h]
    assert acts == [CompiledGeluTanh] * len(compiled.transformer.h)
    assert compiled.config.activation_function == "gelu_new"  # the saved config is unchanged
    lp, mask, _ = sequence_log_probs(compiled, PROMPTS, RESPONSES, pad_token_id=0)
    lp_plain, _, _ = sequence_log_probs(plain, PROMPTS, RESPONSES, pad_token_id=0)
    ref64 = sequence_log_probs(copy.deepcopy(plain).double(), PROMPTS, RESPONSES, pad_token_id=0)[0]
    assert (lp[mask].double() - ref64[mask]).abs().max() < 1e-5
    assert (lp[mask] - lp_plain[mask]).abs().max() < 1e-5
    lp[mask].sum().backward()
    lp_plain[mask].sum().backward()
    for (name, p), q in zip(compiled.named_parameters(), plain.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), name


def test_swaps_every_tanh_gelu_module_and_nothing_else():
    from transformers.activations import ACT2FN

    model = torch.nn.Sequential(
        ACT2FN["gelu_new"], ACT2FN["gelu_pytorch_tanh"], ACT2FN["gelu_fast"], ACT2FN["gelu"], ACT2FN["silu"]
    )
    assert compile_gelu_tanh(model) == 3
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["CompiledGeluTanh"] * 3 + ["GELUActivation", "SiLUActivation"]


def test_a_model_without_tanh_gelu_is_refused_before_it_loads(tmp_path, monkeypatch):
    path = save_tiny_model(tmp_path / "llama", arch="llama")  # SiLU
    loaded = []
    monkeypatch.setattr(
        "pipeline.models.AutoModelForCausalLM.from_pretrained", lambda *a, **k: loaded.append(1)
    )
    with pytest.raises(ValueError, match=r"model\.compile_activation=true .* activation is 'silu'.*=false"):
        load_configured(path, compile_activation=True)
    assert not loaded


def test_no_cpp_compiler_is_refused_before_the_model_loads(saved_tiny):
    code = (
        "import torch\n"
        "from pipeline.config import ModelConfig\n"
        "from pipeline.models import check_model_source, load_model\n"
        f"cfg = ModelConfig(name_or_path={str(saved_tiny)!r}, compile_activation=True)\n"
        "load_model(cfg, cfg.name_or_path, torch.device('cpu'), torch.float32, check_model_source(cfg)[1])\n"
    )
    proc = run_without_cpp_compiler(code)
    assert proc.returncode == 1
    message = "ValueError: model.compile_activation needs a C++ compiler on CPU"
    assert message in proc.stderr, proc.stderr[-2000:]
    assert "or set model.compile_activation=false" in proc.stderr
