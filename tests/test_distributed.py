"""Data parallelism: ``torchrun --nproc_per_node 2`` on CPU (gloo) against a single-process run.

Each torchrun run goes through a probe that starts ``train.py`` as torchrun would and, every time
a checkpoint is taken (every step here), stores each rank's parameters, so the test sees all ranks.
With ``PROBE_KILL=<rank>:<step>`` that rank SIGKILLs itself as it starts collecting that step: a crash
at a known point, so the test does not race a fast machine; ``PROBE_STEP_DELAY`` (seconds) slows every
step, so a signal sent after step 1 arrives before the run ends.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tensordict import TensorDict, set_list_to_stack
from transformers import AutoModelForCausalLM

from pipeline import checkpoint
from pipeline.config import instantiate_node, validate
from pipeline.distributed import Distributed
from pipeline.evaluation import greedy_eval
from pipeline.rewards import RewardSet
from tests.helpers import ROOT, SMALL_RUN, comparable, compose_train, read_metrics, run_recipe, subprocess_env

DDP = ["trainer.strategy=ddp"]

_PROBE = textwrap.dedent(
    """
    import os, runpy, signal, sys, time, torch
    sys.path.insert(0, {root!r})
    from pipeline.recipe import GRPORecipe

    out, rank = os.environ["PROBE_DIR"], os.environ["RANK"]
    open(f"{{out}}/rank{{rank}}.pid", "w").write(str(os.getpid()))
    save = GRPORecipe.save_checkpoint

    def save_checkpoint(self):
        from torch.distributed.tensor import DTensor  # fsdp: whole parameters from the shards

        params = {{n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
                  for n, p in self.model.named_parameters()}}
        torch.save(params, f"{{out}}/rank{{rank}}_step{{self.step}}.pt")
        return save(self)

    GRPORecipe.save_checkpoint = save_checkpoint
    kill = os.environ.get("PROBE_KILL")
    if kill:
        collect, (kill_rank, kill_step) = GRPORecipe.collect, kill.split(":")

        def collect_or_die(self, examples):
            if rank == kill_rank and self.step == int(kill_step):
                open(f"{{out}}/killed_at", "w").write(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            return collect(self, examples)

        GRPORecipe.collect = collect_or_die
    delay = float(os.environ.get("PROBE_STEP_DELAY", "0"))
    if delay:
        slow_collect = GRPORecipe.collect

        def collect_slowly(self, examples):
            time.sleep(delay)  # a slow step: a signal sent after step 1 lands well before the last step
            return slow_collect(self, examples)

        GRPORecipe.collect = collect_slowly
    sys.argv[0] = {train!r}
    runpy.run_path({train!r}, run_name="__main__")
    """
)


def _env(probe: Path, kill: str | None = None, delay: float = 0.0) -> dict:
    env = subprocess_env(PROBE_DIR=str(probe), OMP_NUM_THREADS="1")
    env.pop("PROBE_KILL", None)
    env["PROBE_STEP_DELAY"] = str(delay)
    return {**env, "PROBE_KILL": kill} if kill else env


def _torchrun(
    args: list[str], probe: Path, cwd: Path, nproc: int = 2, kill: str | None = None, delay: float = 0.0
) -> subprocess.Popen:
    probe.mkdir(parents=True, exist_ok=True)
    script = probe / "probe.py"
    script.write_text(_PROBE.format(root=str(ROOT), train=str(ROOT / "train.py")))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launcher, str(script), *args]
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=_env(probe, kill, delay),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM: torchrun forwards it to the ranks (own sessions: a killed torchrun would orphan them)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
        raise AssertionError(f"torchrun still running after {timeout}s:\n{out[-3000:]}") from None
    assert proc.returncode == 0, out[-3000:]
    return out


def _params(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".pt":
        return torch.load(path, weights_only=True)
    return dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n].detach() - b[n].detach()).abs().max()) for n in a)


def test_two_ranks_reproduce_the_single_process_run(saved_tiny, tmp_path):
    # micro-batches of 1 on both sides: each rank holds one group of 2 and accumulates 2 micro-batches
    args = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "trainer.micro_batch_size=1"]
    single_dir = tmp_path / "single"
    run_recipe([*args, "logger=none"], single_dir)

    # replicate: each rank samples the global batch from the single-process RNG stream, keeps its groups
    cwd, probe = tmp_path / "ddp", tmp_path / "probe"
    cwd.mkdir()
    out = _finish(_torchrun([*args, *DDP, "trainer.dist_rollout=replicate"], probe, cwd))
    runs = list((cwd / "outputs" / "runs").glob("*/*"))
    assert len(runs) == 1, runs  # one run folder (ranks > 0 write no Hydra output) ...
    run_dir = runs[0]
    assert len(list((run_dir / "wandb").glob("offline-run-*"))) == 1  # ... and one wandb run
    assert "ddp over 2 ranks (gloo" in out

    for step in (1, 2):
        rank0, rank1 = _params(probe / f"rank0_step{step}.pt"), _params(probe / f"rank1_step{step}.pt")
        assert _max_diff(rank0, rank1) == 0.0  # DDP keeps the replicas identical
        single = _params(single_dir / "checkpoints" / f"step_{step:06d}" / "model")
        assert _max_diff(rank0, single) < 1e-5
    assert _max_diff(_params(run_dir / "final_model"), _params(single_dir / "final_model")) < 1e-5

    # the metrics are those of the single-process run: over both ranks' samples and tokens
    ddp_rows, single_rows = comparable(read_metrics(run_dir)), comparable(read_metrics(single_dir))
    assert [r["step"] for r in ddp_rows] == [0, 1, 2]
    for d, s in zip(ddp_rows, single_rows):
        assert d.keys() == s.keys()
        for key, value in s.items():
            assert d[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert abs(ddp_rows[1]["loss/total"]) > 0  # a real update, not 0 == 0
    completions = (run_dir / "completions.jsonl").read_text().splitlines()
    assert len(completions) == 2 * 4  # both ranks' samples (2 prompts x 2) at each of 2 steps
    assert [json.loads(c)["completion"] for c in completions] == [
        json.loads(c)["completion"] for c in (single_dir / "completions.jsonl").read_text().splitlines()
    ]


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.exists() and any(
            json.loads(x)["step"] >= step for x in metrics.read_text().splitlines() if x
        ):
            return
        assert proc.poll() is None, proc.stdout.read()[-12000:]
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout}s")


def test_killed_rank_ends_the_job_and_a_resumed_run_matches(saved_tiny, tmp_path):
    quiet = ["trainer.eval_every=0", "trainer.completions_every=0", "logger=none"]
    args = [
        *SMALL_RUN,
        f"model.name_or_path={saved_tiny}",
        *DDP,
        "trainer.steps=4",
        "trainer.save_every=2",
        *quiet,
    ]
    ref_dir = tmp_path / "ref"
    _finish(_torchrun([*args, f"hydra.run.dir={ref_dir}"], tmp_path / "probe-ref", tmp_path))

    run_dir, probe = tmp_path / "killed", tmp_path / "probe-killed"
    # rank 1 dies as it starts step 4; rank 0 saved step 2 before the step-3 gradient all-reduce
    proc = _torchrun([*args, f"hydra.run.dir={run_dir}"], probe, tmp_path, kill="1:3")
    out, _ = proc.communicate(timeout=180)  # no hang: rank 0, blocked in a collective, is ended too
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in out, out[-3000:]
    assert time.time() - float((probe / "killed_at").read_text()) < 60
    saved = [p.name for p in checkpoint.list_checkpoints(run_dir / "checkpoints")]
    assert "step_000002" in saved and "step_000004" not in saved

    out = _finish(_torchrun([*args, f"hydra.run.dir={run_dir}", "trainer.resume=auto"], probe, tmp_path))
    assert "resuming from" in out
    assert _max_diff(_params(run_dir / "final_model"), _params(ref_dir / "final_model")) == 0.0
    assert comparable(read_metrics(run_dir)) == comparable(read_metrics(ref_dir))


QUIET = ["trainer.eval_every=0", "trainer.completions_every=1", "logger=none"]


@pytest.mark.slow
def test_sigterm_saves_once_from_rank0_and_one_process_resumes_it(saved_tiny, tmp_path):
    """SIGTERM on torchrun: every rank finishes the step, rank 0 alone saves one checkpoint, the job
    exits non-zero. That 2-rank checkpoint resumed by ONE process ends where an uninterrupted single-
    process run does: with ``dist_rollout=replicate`` the 2 ranks consume the single-process RNG stream,
    and the task sampler is global, so the restored state is the single-process state (to 1e-5: the
    gradient sums are added in another order)."""
    args = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "trainer.micro_batch_size=1", *QUIET]
    args += ["trainer.steps=4", "trainer.save_every=0"]
    ref_dir = tmp_path / "ref"
    run_recipe(args, ref_dir)

    run_dir, probe = tmp_path / "stopped", tmp_path / "probe"
    proc = _torchrun(
        [*args, *DDP, "trainer.dist_rollout=replicate", f"hydra.run.dir={run_dir}"],
        probe,
        tmp_path,
        delay=1.0,
    )
    _wait_for_step(proc, run_dir / "metrics.jsonl", 1)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both ranks
    start = time.monotonic()
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode != 0 and time.monotonic() - start < 60, out[-3000:]
    assert out.count("[SIGTERM] finishing the current step") == 2 and "checkpoint saved" in out
    saved = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert len(saved) == 1, saved  # one checkpoint, written once
    k = int(saved[0].name.split("_")[-1])
    assert 1 <= k < 4
    # both ranks reached the save at the same step boundary, with identical replicas
    assert sorted(x.name for x in probe.glob("rank*_step*.pt")) == [f"rank0_step{k}.pt", f"rank1_step{k}.pt"]
    assert _max_diff(_params(probe / f"rank0_step{k}.pt"), _params(probe / f"rank1_step{k}.pt")) == 0.0
    assert not (run_dir / "final_model").exists()

    run_recipe([*args, "trainer.resume=auto"], run_dir)  # one process, strategy=single
    assert _max_diff(_params(run_dir / "final_model"), _params(ref_dir / "final_model")) < 1e-5
    rows, ref_rows = comparable(read_metrics(run_dir)), comparable(read_metrics(ref_dir))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]  # no step lost or repeated
    for d, s in zip(rows, ref_rows):
        for key, value in s.items():
            assert d[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (d["step"], key)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_ranks(saved_tiny, tmp_path):
    """A single-process checkpoint continued by 2 ranks. Replicated rollout: the same run to 1e-5.
    Sharded rollout (the default): the same prompts (the sampler is global) but other samples
    (seeds per (seed, step, rank)), so only the prompt sequence and completion are asserted."""
    args = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "trainer.micro_batch_size=1", *QUIET]
    args += ["trainer.steps=3", "trainer.save_every=1", "trainer.keep_last=3"]
    ref_dir = tmp_path / "ref"
    run_recipe(args, ref_dir)

    def prompts(run_dir: Path, step: int) -> list[str]:
        rows = [json.loads(x) for x in (run_dir / "completions.jsonl").read_text().splitlines()]
        return [r["prompt"] for r in rows if r["step"] == step]

    for mode in ("replicate", "shard"):
        run_dir = tmp_path / mode
        shutil.copytree(ref_dir / "checkpoints" / "step_000001", run_dir / "checkpoints" / "step_000001")
        resumed = [*args, *DDP, f"trainer.dist_rollout={mode}", "trainer.resume=auto"]
        out = _finish(_torchrun([*resumed, f"hydra.run.dir={run_dir}"], tmp_path / f"probe-{mode}", tmp_path))
        assert "resuming from" in out and "at step 1" in out
        assert [r["step"] for r in read_metrics(run_dir)] == [2, 3, 3]  # steps 2, 3 and the final eval
        for step in (2, 3):
            assert prompts(run_dir, step) == prompts(ref_dir, step)
        diff = _max_diff(_params(run_dir / "final_model"), _params(ref_dir / "final_model"))
        if mode == "replicate":
            assert diff < 1e-5
            for d, s in zip(comparable(read_metrics(run_dir)), comparable(read_metrics(ref_dir))[1:]):
                for key, value in s.items():
                    assert d[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (d["step"], key)


FSDP = ["trainer.strategy=fsdp", "trainer.dist_rollout=replicate"]


def test_fsdp_two_ranks_reproduce_the_single_process_run(saved_tiny, tmp_path):
    """FSDP2 over 2 ranks: sharded weights, gradients summed by the reduce-scatter, the KL reference
    sharded too. Replicated rollout: the single-process run to 1e-5, metrics included. 3 eval examples:
    rank 0 holds 1 and pads it to 2, so both ranks make the same (collective) generate calls."""
    args = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "trainer.micro_batch_size=1", *QUIET]
    args += ["trainer.eval_every=1", "trainer.eval_size=3"]
    single_dir, run_dir, probe = tmp_path / "single", tmp_path / "fsdp", tmp_path / "probe"
    run_recipe(args, single_dir)
    out = _finish(_torchrun([*args, *FSDP, f"hydra.run.dir={run_dir}"], probe, tmp_path))
    assert "fsdp over 2 ranks (gloo" in out

    for step in (1, 2):
        rank0, rank1 = _params(probe / f"rank0_step{step}.pt"), _params(probe / f"rank1_step{step}.pt")
        assert _max_diff(rank0, rank1) == 0.0  # the same whole parameters seen from both ranks
        single = _params(single_dir / "checkpoints" / f"step_{step:06d}" / "model")
        assert _max_diff(rank0, single) < 1e-5
        assert _max_diff(_params(run_dir / "checkpoints" / f"step_{step:06d}" / "model"), single) < 1e-5
    assert _max_diff(_params(run_dir / "final_model"), _params(single_dir / "final_model")) < 1e-5
    # the files one process writes: HF class name, no tied duplicate (lm_head.weight) in the weights
    final, single_final = run_dir / "final_model", single_dir / "final_model"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["GPT2LMHeadModel"]
    assert (
        load_file(final / "model.safetensors").keys() == load_file(single_final / "model.safetensors").keys()
    )
    rows, single_rows = comparable(read_metrics(run_dir)), comparable(read_metrics(single_dir))
    assert [r["step"] for r in rows] == [0, 1, 2]
    for d, s in zip(rows, single_rows):
        assert d.keys() == s.keys()
        for key, value in s.items():
            assert d[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (d["step"], key)
    assert abs(rows[1]["loss/total"]) > 0 and rows[2]["kl/ref_max"] > 0  # real updates, KL to the reference


def test_fsdp_checkpoint_resumes_on_one_process_and_on_fsdp(saved_tiny, tmp_path):
    """An fsdp checkpoint holds whole states in the one-process format: resumed by one process, or by
    2 fsdp ranks (each keeps its shards of the AdamW state), it ends where the uninterrupted run ends."""
    args = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "trainer.micro_batch_size=1", *QUIET]
    args += ["trainer.steps=4", "trainer.save_every=2"]
    ref_dir = tmp_path / "ref"
    _finish(_torchrun([*args, *FSDP, f"hydra.run.dir={ref_dir}"], tmp_path / "probe-ref", tmp_path))
    saved, ref = ref_dir / "checkpoints" / "step_000002", _params(ref_dir / "final_model")
    optim = torch.load(saved / "optimizer.pt", weights_only=True)
    shapes = [p.shape for p in ref.values()]  # whole AdamW moments, in the optimizer's parameter order
    assert [optim["state"][i]["exp_avg"].shape for i in range(len(shapes))] == shapes

    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    for run_dir in (one_dir, two_dir):
        shutil.copytree(saved, run_dir / "checkpoints" / saved.name)
    run_recipe([*args, "trainer.resume=auto"], one_dir)  # strategy=single
    resumed = [*args, *FSDP, "trainer.resume=auto", f"hydra.run.dir={two_dir}"]
    assert "at step 2" in _finish(_torchrun(resumed, tmp_path / "probe-two", tmp_path))
    ref_rows = comparable(read_metrics(ref_dir))
    for run_dir in (one_dir, two_dir):
        assert _max_diff(_params(run_dir / "final_model"), ref) < 1e-5
        rows = comparable(read_metrics(run_dir))
        assert [r["step"] for r in rows] == [3, 4, 4]  # steps 3, 4 and the final eval
        for d, s in zip(rows, ref_rows[2:]):
            for key, value in s.items():
                assert d[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (d["step"], key)


def test_padded_eval_share_scores_only_its_real_examples():
    """Under fsdp a rank's eval share is padded (every rank makes the same generate calls): the padding
    is generated but neither scored nor counted in the lengths."""
    cfg = validate(compose_train([]))
    rewards = RewardSet.from_config(cfg.reward)
    first, second = instantiate_node(cfg.task, "task").eval_examples[:2]

    def greedy(chunk):  # right on `first` only; responses as long as their prompt
        texts = [e.answer if e is first else "x" for e in chunk]
        width = max(len(e.prompt) for e in chunk)
        mask = torch.tensor([[i < len(e.prompt) for i in range(width)] for e in chunk])
        with set_list_to_stack(True):
            return TensorDict(text_response=texts, tokens_response_mask=mask, batch_size=[len(chunk)])

    def run(examples, real=None):
        return greedy_eval(greedy, lambda chunk: chunk, rewards, cfg.reward.accuracy, examples, real=real)

    assert run([first])["eval/accuracy"] == 1.0 and run([second])["eval/accuracy"] == 0.0
    assert run([second, first, first], real=1) == run([second])  # the two copies of `first` ignored


def test_strategy_checks(monkeypatch):
    with pytest.raises(ValueError, match=r"model\.lora\.enabled=true .* trainer\.strategy=fsdp"):
        validate(compose_train(["trainer.strategy=fsdp", "model.lora.enabled=true"]))
    for strategy in ("ddp", "fsdp"):
        cfg = validate(compose_train([f"trainer.strategy={strategy}"]))
        with pytest.raises(ValueError, match=rf"trainer\.strategy={strategy} needs the torchrun"):
            Distributed(cfg)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match=r"trainer\.strategy=single"):
        Distributed(validate(compose_train([])))
    monkeypatch.setenv("MASTER_ADDR", "localhost")
    with pytest.raises(ValueError, match=r"trainer\.prompts_per_step=3 must be divisible"):
        Distributed(validate(compose_train(["trainer.strategy=ddp", "trainer.prompts_per_step=3"])))
