"""The training pipeline run for real on tiny budgets: in-process, as a subprocess, as a sweep."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM

from pipeline.config import validate
from tests.helpers import SMALL_RUN, compose_train, read_metrics, run_recipe, run_train
from tests.wandb_reader import read_run

LOGPROB_KEYS = ["logprobs/mean", "logprobs/std", "logprobs/min", "logprobs/gen_train_absdiff_mean",
                "logprobs/gen_train_absdiff_max", "logprobs/ratio_mean", "logprobs/ratio_min",
                "logprobs/ratio_max", "logprobs/ess"]  # fmt: skip


def test_in_process_two_steps(saved_tiny, tmp_path):
    cfg = validate(compose_train([*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none"]))
    recipe, accuracy = run_recipe(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert 0.0 <= accuracy <= 1.0 and rows[-1]["eval/accuracy"] == accuracy
    for key in [*LOGPROB_KEYS, "reward/total_mean", "kl/ref_mean", "loss/clip_frac", "loss/grad_norm",
                "completions/eos_rate", "completions/truncation_rate", "perf/tokens_per_s", "reward/zero_var_groups"]:  # fmt: skip
        assert key in rows[1], key
    # behaviour and training log-probs agree on the first update pass (the policy was not updated yet)
    assert rows[1]["logprobs/gen_train_absdiff_max"] < 1e-4
    assert rows[1]["logprobs/mean"] < 0 and rows[1]["logprobs/min"] <= rows[1]["logprobs/mean"]
    assert (tmp_path / "plots.png").stat().st_size > 0
    assert (tmp_path / "completions.jsonl").read_text().count('"completion"') == 2 * 4
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "final_model")
    trained = dict(recipe.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in final.named_parameters())
    initial = AutoModelForCausalLM.from_pretrained(saved_tiny)
    assert any(not torch.equal(p, trained[n]) for n, p in initial.named_parameters())  # it trained
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step_000001", "step_000002"]


def test_bf16_autocast_run_keeps_float32_weights_and_scores_in_low_precision(saved_tiny, tmp_path):
    over = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none", "model.autocast=bfloat16"]
    recipe, _ = run_recipe(over, tmp_path)
    assert all(p.dtype == torch.float32 for p in recipe.model.parameters())  # float32 master weights
    rows = read_metrics(tmp_path)
    assert rows[1]["logprobs/gen_train_absdiff_max"] < 0.1  # sampler and trainer both under autocast
    rollout = recipe.collect(recipe.task.sample(2))
    keys = ("tokens", "attention_mask", "tokens_response", "tokens_response_mask")
    with torch.no_grad():
        low = recipe.scorer(rollout.select(*keys))["log_probs"]
        recipe.scorer.autocast_dtype = None
        full = recipe.scorer(rollout.select(*keys))["log_probs"]
    mask = rollout["tokens_response_mask"]
    assert low.dtype == torch.float32 and 1e-6 < (low - full)[mask].abs().max() < 0.1  # bf16 arithmetic


def test_max_minutes_stops_after_the_step_that_reaches_it_saves_and_evaluates(saved_tiny, tmp_path):
    over = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none", "trainer.steps=50"]
    over += ["trainer.eval_every=20", "trainer.max_minutes=1e-6"]  # reached by the first step
    _, accuracy = run_recipe(over, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1]  # the start's evaluation, then one step
    assert rows[1]["perf/train_minutes"] > 0 and rows[1]["eval/accuracy"] == accuracy  # evaluated at the stop
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]
    assert (tmp_path / "final_model" / "config.json").exists()


@pytest.mark.slow
def test_subprocess_end_to_end_with_wandb_offline(saved_tiny, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*SMALL_RUN, f"model.name_or_path={saved_tiny}", f"hydra.run.dir={run_dir}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[sizes] 2 prompts x 2 samples = 4 sequences/step" in proc.stdout
    saved = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert validate(saved).trainer.steps == 2  # the run folder's config reproduces the run
    assert "trainer.steps=2" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    info = OmegaConf.load(run_dir / "run_info.yaml")
    assert info.versions.torch and info.seed == 0
    # the offline wandb run holds the log-prob statistics and the resolved config
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = read_run(runs[0])
    rows = [r for r in logged["history"] if "logprobs/mean" in r]
    assert [r["step"] for r in rows] == [1, 2]
    ours = read_metrics(run_dir)
    for key in LOGPROB_KEYS:
        assert rows[-1][key] == pytest.approx(ours[-1][key]), key
    assert rows[-1]["logprobs/hist/_type"] == "histogram" and sum(rows[-1]["logprobs/hist/values"]) > 0
    assert logged["config"]["generate"]["temperature"] == 1.0


@pytest.mark.slow
def test_multirun_sweep_gives_each_job_its_folder(saved_tiny, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "generate.temperature=0.5,1.0", *SMALL_RUN, "trainer.steps=1", "trainer.eval_every=0",
            f"model.name_or_path={saved_tiny}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())
    assert [j.name for j in jobs] == ["0", "1"]
    temps, groups = [], []
    for job in jobs:
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")
        temps.append(next(o for o in overrides if o.startswith("generate.temperature=")))
        assert OmegaConf.load(job / ".hydra" / "config.yaml").generate.temperature == float(
            temps[-1].split("=")[1]
        )
        assert len(read_metrics(job)) >= 1
        groups.append(read_run(next((job / "wandb").glob("offline-run-*")))["group"])
    assert groups == [sweep.name, sweep.name]  # the jobs of one sweep are one wandb group
    assert temps == ["generate.temperature=0.5", "generate.temperature=1.0"]


@pytest.mark.slow
def test_hub_model_offline_fails_fast_and_local_copy_works(saved_tiny, tmp_path):
    proc = run_train(
        ["model=gpt2", "generate.temperature=0.7", "logger=none", f"hydra.run.dir={tmp_path / 'a'}"]
    )
    assert proc.returncode != 0
    assert "model.name_or_path='gpt2'" in proc.stderr and "model.name_or_path=./models/gpt2" in proc.stderr
    assert not (tmp_path / "a" / "metrics.jsonl").exists()
    shown = run_train(["model=gpt2", "generate.temperature=0.7", "--cfg", "job"])
    job = OmegaConf.create(shown.stdout)
    assert job.model.name_or_path == "gpt2" and job.generate.temperature == 0.7
    # the same model config, pointed at a local folder, trains
    cfg = validate(compose_train(["model=gpt2", "generate.temperature=0.7", f"model.name_or_path={saved_tiny}",
                                  *SMALL_RUN, "trainer.steps=1", "logger=none"]))  # fmt: skip
    run_recipe(cfg, tmp_path / "b")
    assert read_metrics(tmp_path / "b")[-1]["step"] == 1


@pytest.mark.parametrize("algo", ["dr_grpo", "rloo"])
def test_other_algorithms_run(saved_tiny, tmp_path, algo):
    cfg = validate(compose_train([f"algo={algo}", *SMALL_RUN, "trainer.steps=1", f"model.name_or_path={saved_tiny}",
                                  "logger=none", "algo.entropy_coef=0.01"]))  # fmt: skip
    run_recipe(cfg, tmp_path)
    assert "loss/entropy" in read_metrics(tmp_path)[-1]


@pytest.mark.slow
def test_default_job_learns_on_the_embedded_model(tmp_path):
    """`python train.py`'s model and task, shortened: GRPO must raise held-out greedy accuracy."""
    cfg = validate(
        compose_train(["trainer.steps=40", "trainer.eval_every=40", "trainer.save_every=0", "logger=none"])
    )
    assert cfg.model.name_or_path == "builtin://arith-tiny"
    _, final = run_recipe(cfg, tmp_path)
    evals = [r["eval/accuracy"] for r in read_metrics(tmp_path) if "eval/accuracy" in r]
    start = evals[0]
    # the shipped model is pretrained only part-way: RL has room, yet groups carry signal
    assert 0.1 <= start <= 0.5, start
    assert final >= start + 0.08, evals
