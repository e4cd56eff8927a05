"""Reliability: determinism, exact resume after SIGKILL, atomic checkpoints, faults that never lose a run."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import checkpoint
from pipeline.runtime import TrainingError
from tests.helpers import ROOT, SMALL_RUN, comparable, read_metrics, run_recipe, run_train, subprocess_env
from tests.wandb_reader import read_run

RUN = [*SMALL_RUN, "trainer.steps=6", "trainer.save_every=2", "trainer.eval_every=3", "trainer.keep_last=5"]


def _env() -> dict:
    return subprocess_env()


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(
            json.loads(x)["step"] >= step for x in metrics.read_text().splitlines() if x
        ):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_same_config_and_seed_give_identical_metrics(saved_tiny, tmp_path):
    overrides = [*SMALL_RUN, "trainer.steps=3", f"model.name_or_path={saved_tiny}", "logger=none"]
    run_recipe(overrides, tmp_path / "a")
    run_recipe(overrides, tmp_path / "b")
    a, b = comparable(read_metrics(tmp_path / "a")), comparable(read_metrics(tmp_path / "b"))
    assert len(a) == 4 and a == b
    other, _ = run_recipe([*overrides, "seed=1"], tmp_path / "c")
    assert comparable(read_metrics(tmp_path / "c")) != a and other.step == 3


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(saved_tiny, tmp_path):
    args = [*RUN, f"model.name_or_path={saved_tiny}"]
    ref = run_train([*args, f"hydra.run.dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-2000:]

    run_dir = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(proc, run_dir / "metrics.jsonl", 3)  # checkpoint of step 2 is on disk, step 3 logged
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    saved = [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")]
    assert saved and "step_000006" not in saved

    resumed = run_train([*args, f"hydra.run.dir={run_dir}", "trainer.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(tmp_path / "ref"))
    # the resumed process continued the same wandb run
    runs = sorted((run_dir / "wandb").glob("offline-run-*"))  # offline-run-<time>-<run id>
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1
    assert read_run(runs[-1])["run_id"] == runs[0].name.rsplit("-", 1)[1]
    final = AutoModelForCausalLM.from_pretrained(run_dir / "final_model")
    ref_final = AutoModelForCausalLM.from_pretrained(tmp_path / "ref" / "final_model")
    ref_params = dict(ref_final.named_parameters())
    assert all(torch.equal(p, ref_params[n]) for n, p in final.named_parameters())


_SLOW_WRITE = textwrap.dedent(
    """
    import sys, time, torch
    from pathlib import Path
    from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler
    from pipeline import checkpoint

    src, root = sys.argv[1], Path(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(src)
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = get_scheduler("constant", optim)
    kw = dict(model=model, tokenizer=tokenizer, optimizer=optim, scheduler=sched, config_yaml="seed: 0\\n", keep_last=3)
    checkpoint.save_checkpoint(root, 1, state={"task": {}}, **kw)

    class SlowDisk:  # a tokenizer save that stalls midway through the checkpoint write
        def save_pretrained(self, path):
            tokenizer.save_pretrained(path)
            print("writing", flush=True)
            time.sleep(60)

    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    kw["tokenizer"] = SlowDisk()
    checkpoint.save_checkpoint(root, 2, state={"task": {}}, **kw)
    """
)


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(saved_tiny, tmp_path):
    root = tmp_path / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITE, str(saved_tiny), str(root)], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout.readline().strip() == "writing", proc.stderr.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert any(p.name.startswith(".tmp-step_000002") for p in root.iterdir())  # the half-written one
    assert [p.name for p in checkpoint.list_checkpoints(root)] == ["step_000001"]
    state, optim, _sched, rng = checkpoint.load_training_state(root / "step_000001")
    assert state["step"] == 1 and "state" in optim and "torch" in rng
    model = AutoModelForCausalLM.from_pretrained(root / "step_000001" / "model")
    original = dict(AutoModelForCausalLM.from_pretrained(saved_tiny).named_parameters())
    assert all(torch.equal(p, original[n]) for n, p in model.named_parameters())
    checkpoint.clean_partial(root)
    assert [p.name for p in root.iterdir()] == ["step_000001"]


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(saved_tiny, tmp_path):
    run_dir = tmp_path / "run"
    args = [*RUN, f"model.name_or_path={saved_tiny}", "trainer.save_every=0", "logger=none"]
    cmd = [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_step(proc, run_dir / "metrics.jsonl", 2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "checkpoint saved" in out
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1
    step = json.loads((saved[0] / "state.json").read_text())["step"]
    assert 2 <= step < 6
    resumed = run_train([*args, f"hydra.run.dir={run_dir}", "trainer.resume=auto"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [0, 1, 2, 3, 4, 5, 6]


def huge_reward(completions, answers, prompts):
    """Finite in float64, infinite once summed in float32: advantages and loss become NaN."""
    return [1e300 * (i % 2) for i in range(len(completions))]


def flaky_reward(completions, answers, prompts):
    if len(completions) > 4:  # the greedy eval batch
        return [0.0] * len(completions)
    raise ConnectionError("judge unavailable")


def test_non_finite_loss_is_skipped_counted_then_aborts(saved_tiny, tmp_path):
    overrides = [*SMALL_RUN, "trainer.steps=5", f"model.name_or_path={saved_tiny}", "logger=none",
                 "+reward.functions.huge._target_=tests.test_reliability.huge_reward", "trainer.max_nonfinite=3"]  # fmt: skip
    before = {n: p.clone() for n, p in AutoModelForCausalLM.from_pretrained(saved_tiny).named_parameters()}
    with pytest.raises(TrainingError, match=r"3 non-finite .* trainer\.max_nonfinite=3"):
        run_recipe(overrides, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["loss/nonfinite_skipped"] for r in rows if "loss/nonfinite_skipped" in r] == [1, 1]
    recipe_model = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoints" / "step_000002" / "model")
    assert all(torch.equal(p, before[n]) for n, p in recipe_model.named_parameters())  # no update applied


def test_failing_reward_function_is_counted_and_training_continues(saved_tiny, tmp_path):
    overrides = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none",
                 "+reward.functions.judge._target_=tests.test_reliability.flaky_reward"]  # fmt: skip
    recipe, _ = run_recipe(overrides, tmp_path)
    rows = [r for r in read_metrics(tmp_path) if "reward/judge_failures" in r]
    assert [r["reward/judge_failures"] for r in rows] == [4, 4] and recipe.step == 2
    with pytest.raises(RuntimeError, match="'judge' raised ConnectionError"):
        run_recipe([*overrides, "reward.on_error=fail"], tmp_path / "fail")


def test_wandb_that_cannot_start_falls_back_to_local_logging(saved_tiny, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))  # no stored login
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.warns(UserWarning, match="wandb could not start"):
        run_recipe([*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger.mode=online"], tmp_path / "run")
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [0, 1, 2]


def test_no_secret_from_the_environment_is_written(saved_tiny, tmp_path):
    secret = "sk-test-7f3a9c1e5b2d4680"
    env = {"WANDB_API_KEY": secret, "HF_TOKEN": secret + "-hf"}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *SMALL_RUN, f"model.name_or_path={saved_tiny}",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT, env={**_env(), **env},
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(files) > 10
    for path in files:
        assert secret.encode() not in path.read_bytes(), path


def test_bad_resume_config_touches_nothing_saved(saved_tiny, tmp_path):
    run_dir = tmp_path / "run"
    run_recipe([*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none"], run_dir)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
    bad = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none", "trainer.resume=auto"]
    with pytest.raises(ValueError, match=r"model\.name_or_path"):
        run_recipe([*bad, "model.name_or_path=/no/such/model"], run_dir)
    with pytest.raises(ValueError, match=r"trainer\.resume"):
        run_recipe([*bad, f"trainer.resume={run_dir / 'checkpoints' / 'step_000099'}"], run_dir)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
    assert after == digest


def judge_failing_in_eval(completions, answers, prompts):
    """Scores 1.0 in training (prompts repeat G times); in the held-out eval (distinct prompts) it
    cannot score the first sample (None)."""
    if len(set(prompts)) < len(prompts):
        return [1.0] * len(completions)
    return [None] + [1.0] * (len(completions) - 1)


@pytest.mark.parametrize(("on_error", "accuracy"), [("zero", 0.75), ("drop", 1.0), ("fail", None)])
def test_reward_failing_only_in_evaluation_is_handled_per_on_error(saved_tiny, tmp_path, on_error, accuracy):
    overrides = [*SMALL_RUN, "trainer.steps=1", f"model.name_or_path={saved_tiny}", "logger=none",
                 "+reward.functions.judge._target_=tests.test_reliability.judge_failing_in_eval",
                 "reward.accuracy=judge", f"reward.on_error={on_error}"]  # fmt: skip
    if accuracy is None:
        with pytest.raises(RuntimeError, match=r"'judge' failed on 1 of 4 samples \(reward.on_error=fail\)"):
            run_recipe(overrides, tmp_path)
        return
    run_recipe(overrides, tmp_path)
    evals = [r for r in read_metrics(tmp_path) if "eval/accuracy" in r]
    assert [(r["eval/accuracy"], r["eval/reward_failures"]) for r in evals] == [(accuracy, 1)] * 2
    assert read_metrics(tmp_path)[-1]["reward/judge_failures"] == 0  # training batches scored fine
