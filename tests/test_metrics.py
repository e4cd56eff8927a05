"""Metric functions on hand-computed inputs; the chunked log-softmax across chunks; gradient
accumulation over micro-batches equal to one pass over the whole minibatch."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tensordict import TensorDict

from pipeline import logprobs
from pipeline.algos import effective_sample_size
from pipeline.config import validate
from pipeline.metrics import UpdateStats, completion_rows, reward_metrics, rollout_metrics
from pipeline.recipe import GRPORecipe
from pipeline.rewards import RewardResult
from tests.helpers import SMALL_RUN, compose_train


def test_reward_metrics_by_hand():
    rewards = RewardResult(
        total=torch.tensor([1.0, 0.0, 0.5, 0.5]),
        valid=torch.tensor([True, True, False, True]),
        per_function={"exact": torch.tensor([1.0, 0.0, float("nan"), 1.0], dtype=torch.float64)},
        failures={"exact": 1},
    )
    out = reward_metrics(rewards, "exact", zero_var=torch.tensor([False, True]))
    assert out["reward/total_mean"] == 0.5 and out["reward/total_max"] == 1.0
    assert out["reward/total_std"] == pytest.approx(math.sqrt(((0.5**2) * 2) / 3))  # unbiased
    assert out["reward/zero_var_groups"] == 0.5 and out["reward/dropped"] == 1
    assert out["reward/exact_mean"] == pytest.approx(2 / 3) and out["reward/exact_failures"] == 1
    assert out["reward/accuracy"] == 0.5  # NaN (failed) is not "correct"


def test_rollout_metrics_by_hand():
    mask = torch.tensor([[True, True, True], [True, False, False]])
    rollout = TensorDict(
        log_probs=torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]]),
        tokens_response_mask=mask,
        lengths=torch.tensor([3, 1]),
        ended=torch.tensor([False, True]),
        batch_size=[2],
    )
    out = rollout_metrics(rollout, max_new_tokens=3)
    assert out["logprobs/mean"] == pytest.approx(-6.5 / 4) and out["logprobs/min"] == -3.0
    assert out["completions/len_mean"] == 2.0 and out["completions/len_max"] == 3.0
    assert out["completions/eos_rate"] == 0.5 and out["completions/truncation_rate"] == 0.5


def test_update_stats_and_ess_by_hand():
    stats = UpdateStats()
    mask = torch.tensor([[True, False], [True, True]])
    log_ratio = torch.tensor([[0.0, 9.0], [math.log(2.0), 0.0]])  # the 9.0 is padding: never counted
    stats.add_tokens({"pg": torch.tensor([[1.0, 100.0], [2.0, 3.0]]), "ratio": log_ratio.exp(),
                      "clipped": torch.tensor([[True, True], [False, False]]), "log_ratio": log_ratio}, mask)  # fmt: skip
    stats.add_gen_train_diff(log_ratio, mask)
    stats.add_step(0.5, 2.0, skipped=False)
    stats.add_step(float("nan"), 3.0, skipped=True)
    out = stats.summary()
    assert out["loss/pg"] == 2.0 and out["loss/clip_frac"] == pytest.approx(1 / 3)
    assert out["logprobs/ratio_max"] == 2.0 and out["logprobs/ratio_min"] == 1.0
    assert out["logprobs/gen_train_absdiff_max"] == pytest.approx(math.log(2.0))
    assert out["loss/grad_norm"] == 2.5 and out["loss/nonfinite_skipped"] == 1
    w = torch.tensor([1.0, 2.0, 1.0])  # ESS = (sum w)^2 / (n sum w^2) over the valid tokens
    assert out["logprobs/ess"] == pytest.approx(float(w.sum() ** 2 / (3 * (w**2).sum())))
    assert float(effective_sample_size(torch.zeros(5))) == 1.0
    assert "loss/entropy" not in out and "kl/ref_mean" not in out
    rows = completion_rows(["p1", "p2"], ["c1", "c2"], ["a1", "a2"], torch.tensor([1.0, 0.0]), limit=1)
    assert rows == [{"prompt": "p1", "completion": "c1", "answer": "a1", "reward": 1.0}]


def test_chunked_log_softmax_over_several_chunks(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, 11, generator=gen)
    tokens = torch.randint(0, 11, (5, 7), generator=gen)
    monkeypatch.setattr(logprobs, "_CHUNK_ELEMENTS", 3 * 11)  # 3 rows per chunk: 12 chunks of 35 rows
    got = logprobs.token_log_probs(logits, tokens, temperature=0.7)
    ref = torch.log_softmax(logits.double() / 0.7, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    assert (got.double() - ref).abs().max() < 1e-6


@pytest.mark.parametrize("loss_agg", ["token_mean", "seq_mean", "seq_sum_norm"])
def test_gradient_accumulation_equals_the_full_minibatch(saved_tiny, tmp_path, loss_agg):
    cfg = validate(compose_train([*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none",
                                  "trainer.prompts_per_step=4", "trainer.micro_batch_size=8",
                                  f"algo.loss_agg={loss_agg}", "optim.max_grad_norm=1e9"]))  # fmt: skip
    recipe = GRPORecipe(cfg, tmp_path)
    recipe.setup()
    try:
        torch.manual_seed(0)
        examples = recipe.task.sample(4)
        rollout = recipe.collect(examples)
        recipe.score(rollout, examples)
        recipe.reference_log_probs(rollout)
        start = copy.deepcopy(recipe.model.state_dict())
        grads = {}
        for micro in (8, 3, 1):  # one pass; uneven micro-batches; one sequence at a time
            recipe.model.load_state_dict(start)
            recipe.sizes["micro_batch"] = micro
            recipe.optimizer.step = lambda: None  # keep the accumulated gradients for comparison
            recipe.optimizer.zero_grad = lambda set_to_none=True: None
            for p in recipe.model.parameters():
                p.grad = None
            torch.manual_seed(1)
            recipe.update(rollout)
            grads[micro] = {
                n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.grad is not None
            }
    finally:
        recipe.cleanup()
    assert grads[8] and any(g.abs().max() > 0 for g in grads[8].values())
    for micro in (3, 1):
        for name, g in grads[8].items():
            assert torch.allclose(grads[micro][name], g, atol=1e-6, rtol=1e-4), (micro, name)
