"""Every algorithm preset composes and trains for 2 steps; PPO resumes exactly (value head and its AdamW state)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.config import validate
from tests.helpers import CONF, SMALL_RUN, comparable, compose_train, read_metrics, run_recipe

# no plot, no wandb, a task of 64 training prompts (start-up tokenizes them all)
QUICK = ["logger=none", "logger.plot=false", "task.num_train=64", "task.num_eval=16"]
PPO_KEYS = [
    "loss/value",
    "value/explained_var",
    "value/clip_frac",
    "advantage/mean",
    "advantage/std",
    "value/returns_mean",
    "value/returns_std",
    "value/mean",
    "value/grad_norm",
]
PRESETS = sorted(p.stem for p in (CONF / "algo").glob("*.yaml"))


def _run(saved_tiny: Path, run_dir: Path, *overrides: str):
    base = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", *QUICK]
    cfg = validate(compose_train([*base, *overrides]))
    return run_recipe(cfg, run_dir)


def test_presets_are_the_ones_the_issue_names():
    assert PRESETS == ["dapo", "dr_grpo", "grpo", "gspo", "ppo", "rloo"]


@pytest.mark.parametrize(
    "overrides",
    [[f"algo={p}"] for p in PRESETS]
    + [
        ["algo=ppo", "algo.critic=separate", "algo.kl_in_reward=true", "algo.mask_truncated=true", "algo.dual_clip_c=3"],
        ["algo=ppo", "generate.num_samples=1", "trainer.prompts_per_step=4", "algo.value_clip=null",
         "algo.value_warmup_steps=2"],
    ],
    ids=lambda o: " ".join(o),
)  # fmt: skip
def test_preset_trains_two_steps(saved_tiny, tmp_path, overrides):
    quick = ["trainer.eval_every=0", "trainer.completions_every=0", "trainer.save_every=0"]
    recipe, accuracy = _run(saved_tiny, tmp_path, *quick, *overrides)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 2] and 0.0 <= accuracy <= 1.0  # the last row: final eval
    last, algo = rows[1], recipe.cfg.algo
    warmup = algo.value_warmup_steps >= 2
    trained = not (algo.mask_truncated and last["completions/eos_rate"] == 0)  # else no token left to train
    assert last["loss/nonfinite_skipped"] == 0 and (last["loss/grad_norm"] > 0 or warmup or not trained)
    if algo.advantage.value == "gae":
        assert set(PPO_KEYS) <= set(last), set(PPO_KEYS) - set(last)
        assert ("kl/ref_mean" in last) == (algo.kl_coef > 0) and (last["loss/value"] > 0 or not trained)
    if warmup:  # the critic alone learned: the policy is the initial model, the head moved from zero
        initial = dict(AutoModelForCausalLM.from_pretrained(saved_tiny).named_parameters())
        assert all(torch.equal(p, initial[n]) for n, p in recipe.model.named_parameters())
        assert recipe.critic.head.weight.abs().sum() > 0
    if algo.dynamic_sampling:
        assert {"dynamic/kept_groups", "dynamic/dropped_groups", "dynamic/extra_rounds"} <= set(last)
        assert last["dynamic/kept_groups"] + last["dynamic/filled_groups"] == 2
    if algo.overlong_buffer:
        assert "reward/overlong_mean" in last
    if algo.dual_clip_c:
        assert "loss/dual_clip_frac" in last


def test_ppo_resume_is_exact(saved_tiny, tmp_path):
    run = [
        "algo=ppo",
        "trainer.steps=3",
        "trainer.save_every=1",
        "trainer.keep_last=5",
        "trainer.eval_every=0",
    ]
    _run(saved_tiny, tmp_path / "ref", *run)
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(
        tmp_path / "ref" / "checkpoints" / "step_000002", resumed_dir / "checkpoints" / "step_000002"
    )
    recipe, _ = _run(saved_tiny, resumed_dir, *run, "trainer.resume=auto")
    assert recipe.resume_from.name == "step_000002"
    ref = [r for r in comparable(read_metrics(tmp_path / "ref")) if r["step"] > 2]
    assert comparable(read_metrics(resumed_dir)) == ref and "loss/value" in ref[0]
    a, b = tmp_path / "ref" / "checkpoints" / "step_000003", resumed_dir / "checkpoints" / "step_000003"
    critic_a, critic_b = torch.load(a / "critic.pt"), torch.load(b / "critic.pt")
    assert critic_a.keys() == {"head.weight", "head.bias"} and critic_a["head.weight"].abs().sum() > 0
    assert all(torch.equal(critic_a[k], critic_b[k]) for k in critic_a)
    optim_a, optim_b = torch.load(a / "optimizer.pt"), torch.load(b / "optimizer.pt")
    assert len(optim_a["param_groups"]) == 2  # the value head's group, with its AdamW moments
    for i, state in optim_a["state"].items():
        assert all(torch.equal(v, optim_b["state"][i][k]) for k, v in state.items())
