"""PPO's critic, DAPO's dynamic sampling and the configured algorithm, against plain references."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

from pipeline.algorithm import Algorithm
from pipeline.config import validate
from pipeline.config_types import LossAgg
from pipeline.dynamic_sampling import Groups, refill
from pipeline.recipe import GRPORecipe
from pipeline.rewards import RewardResult
from pipeline.tasks import Example
from tests.helpers import SMALL_RUN, compose_train

QUICK = ["logger=none", "logger.plot=false", "task.num_train=64", "task.num_eval=16"]
PPO = [*SMALL_RUN, "algo=ppo", "algo.kl_coef=0", "generate.max_new_tokens=6", *QUICK]


def _recipe(saved_tiny, tmp_path, *overrides: str) -> GRPORecipe:
    cfg = validate(compose_train([*PPO, f"model.name_or_path={saved_tiny}", *overrides]))
    recipe = GRPORecipe(cfg, tmp_path)
    recipe.setup()
    with torch.no_grad():  # a non-zero head, so that the values say something
        torch.manual_seed(1)
        recipe.critic.head.weight.normal_()
        recipe.critic.head.bias.fill_(0.1)
    return recipe


def _reference_values(
    backbone: torch.nn.Module, head: torch.nn.Module, rollout: TensorDict
) -> list[list[float]]:
    """Each sequence alone, unpadded: the head on the last hidden state before each response token."""
    out = []
    for i in range(len(rollout)):
        prompt = rollout["tokens"][i][rollout["attention_mask"][i].bool()]
        n = int(rollout["lengths"][i])
        ids = torch.cat([prompt, rollout["tokens_response"][i, :n]]).unsqueeze(0)
        with torch.no_grad():
            h = backbone(input_ids=ids).last_hidden_state[0]
            out.append(head(h[len(prompt) - 1 : len(prompt) - 1 + n]).squeeze(-1).tolist())
    return out


@pytest.mark.parametrize("critic", ["shared", "separate"])
def test_rollout_and_training_values_equal_a_plain_forward(saved_tiny, tmp_path, critic):
    recipe = _recipe(saved_tiny, tmp_path, f"algo.critic={critic}", "trainer.prompts_per_step=3")
    try:
        rollout = recipe.collect(recipe.task.sample(3))
        backbone = recipe.model.base_model if critic == "shared" else recipe.critic.backbone
        ref = _reference_values(backbone, recipe.critic.head, rollout)
        mask = rollout["tokens_response_mask"]
        assert bool((rollout["values"][~mask] == 0).all())
        for i, row in enumerate(ref):  # shared: the values of the generation passes themselves
            assert rollout["values"][i, : len(row)].tolist() == pytest.approx(row, abs=1e-5)
        # the training pass: values from the same forward as the log-probs, with gradients
        lp, _, values = recipe._forward(rollout, detach=False)
        assert values.requires_grad and values.shape == mask.shape
        assert torch.allclose(values[mask], rollout["values"][mask], atol=1e-5)
        assert torch.allclose(lp[mask], rollout["log_probs"][mask], atol=1e-5)
        values[mask].sum().backward()
        head_grad = recipe.critic.head.weight.grad
        assert head_grad is not None and bool(head_grad.abs().sum() > 0)
        reaches_policy = any(p.grad is not None for p in recipe.model.parameters())
        assert reaches_policy == (critic == "shared")  # a separate critic never touches the policy
    finally:
        recipe.cleanup()


def test_critic_checkpoint_state_and_optimizer_group(saved_tiny, tmp_path):
    recipe = _recipe(saved_tiny, tmp_path, "algo.value_lr=0.003")
    try:
        groups = recipe.optimizer.param_groups
        assert len(groups) == 2 and groups[1]["lr"] == 0.003 and groups[0]["lr"] == 1e-4
        assert {id(p) for p in groups[1]["params"]} == {id(p) for p in recipe.critic.head.parameters()}
        assert set(recipe.critic.state_dict()) == {"head.weight", "head.bias"}  # not the policy's weights
    finally:
        recipe.cleanup()


# ----------------------------------------------------------------------------- dynamic sampling
def _groups(prompts: list[str], rewards: list[float], width: int, failed: tuple[int, ...] = ()) -> Groups:
    """Scored groups of G = 2 with prompts ``width`` tokens long; ``failed``: samples whose reward failed."""
    n = len(rewards)
    rollout = TensorDict(
        {
            "tokens": torch.full((n, width), 7),
            "attention_mask": torch.ones(n, width, dtype=torch.long),
            "tokens_response": torch.full((n, width + 1), 5),
            "tokens_response_mask": torch.ones(n, width + 1, dtype=torch.bool),
            "log_probs": torch.full((n, width + 1), -1.0),
            "reward": torch.tensor(rewards),
            "text": [p for p in prompts for _ in range(2)],
        },
        batch_size=[n],
    )
    total = torch.tensor(rewards)
    exact = total.double().index_fill(0, torch.tensor(failed, dtype=torch.long), float("nan"))
    result = RewardResult(total, torch.ones(n, dtype=torch.bool), {"exact": exact}, {"exact": len(failed)})
    pairs = total.reshape(-1, 2)
    return Groups([Example(p, p) for p in prompts], rollout, result, pairs[:, 0] == pairs[:, 1])


def test_dynamic_sampling_keeps_informative_groups_and_refills():
    first = _groups(["a", "b", "c"], [1, 1, 0, 1, 0, 0], width=2)  # only b carries signal
    more = [
        _groups(["d", "e"], [1, 0, 1, 1], width=4),
        _groups(["f", "g"], [0, 1, 1, 1], width=1, failed=(2,)),
    ]
    asked = []

    def draw(n):
        asked.append(n)
        return more[len(asked) - 1]

    out, metrics = refill(first, draw, target=3, group_size=2, max_rounds=3, pad_token_id=0)
    assert [e.prompt for e in out.examples] == ["b", "d", "f"]
    assert list(out.rollout["text"]) == ["b", "b", "d", "d", "f", "f"]
    assert out.rollout["reward"].tolist() == [0, 1, 1, 0, 0, 1] and not out.zero_var.any()
    # prompts asked per extra round: the shortfall scaled by the keep rate so far, at most the target
    assert asked == [3, 3]  # min(3, 2 x 3 / 1); then ceil(1 x 5 / 2)
    # re-padded to the widest round: prompts on the left, responses on the right
    assert out.rollout["tokens"].shape == (6, 4) and out.rollout["tokens"][0].tolist() == [0, 0, 7, 7]
    assert out.rollout["attention_mask"][0].tolist() == [0, 0, 1, 1]
    assert out.rollout["tokens_response_mask"][0].tolist() == [True, True, True, False, False]
    assert out.rewards.failures == {"exact": 0}  # the failed sample was in the dropped group g
    expected = {
        "kept_groups": 3,
        "dropped_groups": 4,
        "extra_rounds": 2,
        "extra_prompts": 6,
        "filled_groups": 0,
    }
    assert metrics == {f"dynamic/{k}": v for k, v in expected.items()}


def test_dynamic_sampling_cap_fills_with_dropped_groups():
    first = _groups(["a", "b", "c"], [1, 1, 0, 1, 0, 0], width=2)

    def no_draw(n: int) -> Groups:
        raise AssertionError("no extra round allowed")

    out, metrics = refill(first, no_draw, target=3, group_size=2, max_rounds=0, pad_token_id=0)
    assert [e.prompt for e in out.examples] == ["b", "a", "c"] and len(out.rollout) == 6
    assert out.zero_var.tolist() == [False, True, True]
    assert metrics["dynamic/filled_groups"] == 2 and metrics["dynamic/extra_rounds"] == 0


# ----------------------------------------------------------------------------- the configured algorithm
def test_algorithm_overlong_term_masking_and_ppo_placeholder():
    cfg = validate(compose_train(["algo=dapo", "generate.max_new_tokens=8", "algo.mask_truncated=true"]))
    algo = Algorithm(cfg)
    total = torch.tensor([1.0, 0.0])
    rewards = RewardResult(total, torch.tensor([True, True]), {"exact": total.double()}, {"exact": 0})
    shaped = algo.rewards(rewards, torch.tensor([3, 8]))  # buffer 2: 8 tokens is the full penalty
    assert shaped.total.tolist() == [1.0, -1.0] and shaped.per_function["overlong"].tolist() == [0.0, -1.0]
    assert algo.valid(torch.tensor([True, True]), torch.tensor([True, False])).tolist() == [True, False]
    ppo = Algorithm(validate(compose_train(["algo=ppo", "generate.num_samples=1"])))
    adv, zero_var = ppo.advantages(torch.tensor([1.0, 0.0]))
    assert adv.tolist() == [0.0, 0.0] and zero_var.tolist() == [True, True]


def test_configs_old_loss_agg_names_and_checks(tmp_path):
    saved = OmegaConf.to_yaml(compose_train(["algo=dr_grpo"])).replace(
        "loss_agg: seq_mean_token_sum_norm", "loss_agg: seq_sum_norm"
    )
    assert "loss_agg: seq_sum_norm" in saved  # a config written by a previous run
    (tmp_path / "config.yaml").write_text(saved)
    cfg = validate(OmegaConf.load(tmp_path / "config.yaml"))
    assert cfg.algo.loss_agg is LossAgg.seq_mean_token_sum_norm
    assert validate(compose_train(["algo.loss_agg=seq_mean"])).algo.loss_agg is LossAgg.seq_mean_token_mean
    assert validate(compose_train(["algo=ppo", "generate.num_samples=1"])).generate.num_samples == 1
    for bad, key in [
        (["generate.num_samples=1"], "num_samples"),
        (["algo=ppo", "algo.dynamic_sampling=true"], "dynamic_sampling"),
        (["algo.kl_in_reward=true"], "kl_in_reward"),
        (["algo.dual_clip_c=1.0"], "dual_clip_c"),
        (["algo.overlong_buffer=9"], "overlong_buffer"),
        (["algo.lam=1.5"], "algo.lam"),
        (["algo.importance_ratio=seq"], "importance_ratio"),
        (["algo.critic=both"], "critic"),
        (["algo=ppo", "trainer.strategy=ddp"], "trainer.strategy=single"),
        (["algo=ppo", "rollout=vllm"], "rollout=hf"),
    ]:
        with pytest.raises(Exception, match=key):
            validate(compose_train(bad))
