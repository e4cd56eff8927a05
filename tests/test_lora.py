"""LoRA through peft (model.lora.*): the reference is the base with adapters disabled, only adapters train,
checkpoints hold the adapters and resume exactly, the final model is merged, and memory goes down."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from tensordict import TensorDict
from transformers import AutoModelForCausalLM

from pipeline import TransformersWrapper, lora
from pipeline.config import LoraConfig, validate
from pipeline.eval_report import evaluate
from pipeline.tiny import char_tokenizer, tiny_model
from tests.helpers import (
    ROOT,
    SMALL_RUN,
    comparable,
    compose_train,
    read_metrics,
    run_recipe,
    save_tiny_model,
)

pytest.importorskip("peft")

LORA = ["model.lora.enabled=true", "model.lora.r=4", "logger=none"]


def _log_probs(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reference_is_the_base_with_adapters_disabled(arch):
    tok = char_tokenizer()
    base = tiny_model(tok, arch=arch, seed=0)
    ids = torch.tensor([tok("12+35=47").input_ids, tok("9+9=18+1").input_ids])
    with torch.no_grad():
        expected = _log_probs(base, ids)
        model = lora.attach(tiny_model(tok, arch=arch, seed=0), LoraConfig(enabled=True, r=4))
        for name, p in model.named_parameters():  # peft starts with B = 0: make the adapters matter
            if "lora_B" in name:
                p.normal_(std=0.5)
        assert not torch.allclose(_log_probs(model, ids), expected, atol=1e-3)
        with lora.adapters_disabled(model):
            assert torch.equal(_log_probs(model, ids), expected)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    assert len(trainable) == sum("lora_" in n for n, _ in model.named_parameters())


@pytest.mark.parametrize("compile_decode", [False, True])
def test_generation_log_probs_of_a_lora_model_are_its_scores(compile_decode):
    # peft's generate runs its base model's forward: the log-probs are recorded there, adapters on
    tok = char_tokenizer()
    model = lora.attach(tiny_model(tok, arch="llama", seed=0), LoraConfig(enabled=True, r=4))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    policy = TransformersWrapper(model, tokenizer=tok, return_log_probs=True, num_samples=3,
                                 compile_decode=compile_decode, generate_kwargs={"max_new_tokens": 6, "do_sample": True})  # fmt: skip
    torch.manual_seed(0)
    out = policy(TensorDict(text=["12+35=", "7+8="], batch_size=[2])).reshape(-1)
    scored = TransformersWrapper(model, tokenizer=tok, from_text=False, generate=False)(out.clone())
    mask = out["log_probs_mask"]
    assert out["log_probs"][mask].abs().min() > 0  # not the zeros of an unrecorded generation
    assert (scored["log_probs"][mask] - out["log_probs"][mask]).abs().max() < 1e-5


def test_lora_run_trains_only_adapters_shares_the_reference_and_saves_merged(saved_tiny, tmp_path):
    run = [*SMALL_RUN, *LORA, f"model.name_or_path={saved_tiny}", "algo.kl_coef=0.1", "optim.lr=1e-2"]
    recipe, _ = run_recipe([*run, "model.gradient_checkpointing=true"], tmp_path)
    model = recipe.model
    assert lora.is_lora(model) and recipe.ref_scorer.model is model  # no second copy of the weights
    optimized = {id(p) for g in recipe.optimizer.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in optimized}
    assert names and all("lora_" in n for n in names)
    initial = AutoModelForCausalLM.from_pretrained(saved_tiny).state_dict()
    base = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in model.named_parameters()
    }
    assert all(torch.equal(base[n], initial[n]) for n in base if "lora_" not in n)  # the base never moves
    gap = [r["logprobs/gen_train_absdiff_max"] for r in read_metrics(tmp_path) if "kl/ref_mean" in r]
    assert max(gap) < 1e-4  # the behaviour log-probs of generation are the trainer's
    kl = [r["kl/ref_mean"] for r in read_metrics(tmp_path) if "kl/ref_mean" in r]
    assert kl[0] == 0.0 and kl[-1] > 0.0  # adapters start at B = 0: the policy is the reference, then moves
    # checkpoints: adapters only; the final model: merged HF folder + the adapters alone
    ckpt = tmp_path / "checkpoints" / "step_000002" / "model"
    assert lora.is_adapter_folder(ckpt) and not (ckpt / "model.safetensors").exists()
    assert all("lora_" in k for k in load_file(ckpt / "adapter_model.safetensors"))
    assert lora.is_adapter_folder(tmp_path / "final_model_adapter")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model")
    assert not lora.is_lora(merged)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        torch.testing.assert_close(_log_probs(merged, ids), _log_probs(model, ids), atol=1e-5, rtol=0)
    # evaluate.py's evaluation of the adapter checkpoint = the run's own last held-out evaluation
    row = evaluate(validate(compose_train([*run, f"eval.checkpoint={tmp_path}", "eval.size=4"])))
    logged = [r for r in read_metrics(tmp_path) if "eval/accuracy" in r][-1]
    assert (row["accuracy"], row["len_mean"]) == (logged["eval/accuracy"], logged["eval/len_mean"])


def test_lora_resume_is_exact(saved_tiny, tmp_path):
    run = [*SMALL_RUN, *LORA, f"model.name_or_path={saved_tiny}", "algo.kl_coef=0.1", "trainer.steps=3"]
    run += ["trainer.keep_last=5", "optim.lr=1e-2"]
    run_recipe([*run, f"hydra.run.dir={tmp_path / 'ref'}"], tmp_path / "ref")
    resumed = tmp_path / "resumed"
    src = tmp_path / "ref" / "checkpoints" / "step_000001"
    shutil.copytree(src, resumed / "checkpoints" / "step_000001")
    recipe, _ = run_recipe([*run, "trainer.resume=auto"], resumed)
    assert recipe.resume_from.name == "step_000001" and lora.is_lora(recipe.model)
    ref = [r for r in comparable(read_metrics(tmp_path / "ref")) if r["step"] > 1]
    assert comparable(read_metrics(resumed)) == ref
    a = load_file(tmp_path / "ref" / "checkpoints" / "step_000003" / "model" / "adapter_model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_000003" / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(
        not torch.equal(a[k], v) for k, v in load_file(src / "model" / "adapter_model.safetensors").items()
    )


# One GRPO step with a KL reference in a fresh process: peak RSS, and the bytes of the weights, gradients
# and AdamW state that the run holds (exact, unlike RSS).
_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    sys.path.insert(0, sys.argv[1])
    from tests.helpers import SMALL_RUN, run_recipe
    recipe, _ = run_recipe([*SMALL_RUN, *sys.argv[3:]], __import__("pathlib").Path(sys.argv[2]))
    models = {id(recipe.model): recipe.model, id(recipe.ref_scorer.model): recipe.ref_scorer.model}
    params = [p for m in models.values() for p in m.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    state = sum(v.numel() * v.element_size() for s in recipe.optimizer.state.values() for v in s.values()
                if isinstance(v, __import__("torch").Tensor))
    print(json.dumps({"held": weights + grads + state, "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
    """
)


@pytest.fixture(scope="module")
def larger_tiny(tmp_path_factory):
    """A 4-layer, 512-wide Llama (about 13M parameters): optimizer state and gradients dominate memory."""
    return save_tiny_model(tmp_path_factory.mktemp("larger-tiny"), arch="llama", hidden=512, layers=4)


def _measure(model_path, run_dir, *extra) -> dict:
    args = [f"model.name_or_path={model_path}", "logger=none", "algo.kl_coef=0.1", "trainer.steps=1", *extra]
    args += ["trainer.save_every=0", "trainer.eval_every=0"]
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ROOT), str(run_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_lora_holds_less_memory_than_full_fine_tuning_with_a_reference(larger_tiny, tmp_path):
    full = _measure(larger_tiny, tmp_path / "full")
    adapters = _measure(larger_tiny, tmp_path / "lora", *LORA)
    print(
        f"held bytes: full {full['held']} vs LoRA {adapters['held']}; peak RSS KiB: full "
        f"{full['maxrss_kb']} vs LoRA {adapters['maxrss_kb']}"
    )
    # full: policy + reference weights, gradients, two AdamW moments = 5x the weights; LoRA: about 1x
    assert adapters["held"] < 0.3 * full["held"], (adapters, full)
    # peak RSS is printed, not asserted: torch's import-time peak can dominate it on a model this small
