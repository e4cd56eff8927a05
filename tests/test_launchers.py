"""Cluster launches through Hydra's submitit launcher: the example SLURM configs, SLURM's rank
environment read by :class:`pipeline.distributed.Distributed`, and real multiruns through
``hydra/launcher=submitit_local`` (one process per job, and one job of two ranks)."""

from __future__ import annotations

import os

import pytest
from omegaconf import OmegaConf

from pipeline.config import validate
from pipeline.distributed import Distributed
from pipeline.launch import first_host, scheduler_env
from tests.helpers import SMALL_RUN, compose_train, read_metrics, run_train

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _no_torchrun_env(monkeypatch) -> None:
    """Remove torchrun's variables, and have monkeypatch restore them (absent) after the test even
    when the code under test sets them."""
    for var in TORCHRUN_VARS:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)


SLURM_TASK = {  # what srun sets for task 5 of 16 (2 nodes x 8)
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "5",
    "SLURM_NTASKS": "16",
    "SLURM_STEP_NUM_TASKS": "16",
    "SLURM_JOB_NODELIST": "gpu[017-018]",
    "SLURM_STEP_NODELIST": "gpu[017-018]",
    "SLURM_JOB_ID": "4242",
}


def test_slurm_environment_becomes_torchrun_environment():
    env = scheduler_env(SLURM_TASK)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "5",
        "MASTER_ADDR": "gpu017",
    }
    assert 20000 <= int(env["MASTER_PORT"]) <= 60000
    assert (
        scheduler_env({**SLURM_TASK, "SLURM_PROCID": "0"})["MASTER_PORT"] == env["MASTER_PORT"]
    )  # every rank
    assert scheduler_env({**SLURM_TASK, "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    assert scheduler_env({**SLURM_TASK, "RANK": "1"}) == {}  # torchrun inside the SLURM job wins
    assert scheduler_env({"PATH": "/bin"}) == {}
    local = {"SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1", "SUBMITIT_LOCAL_NTASKS": "2"}
    assert scheduler_env(local)["MASTER_ADDR"] == "127.0.0.1" and scheduler_env(local)["WORLD_SIZE"] == "2"
    assert [first_host(n) for n in ("gpu[07-09,12]-ib,cpu1", "node1,node2", "solo")] == [
        "gpu07-ib",
        "node1",
        "solo",
    ]


def test_distributed_reads_slurm_ranks_without_starting_a_group(monkeypatch):
    _no_torchrun_env(monkeypatch)
    for key, value in {**SLURM_TASK, "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "2"}.items():
        monkeypatch.setenv(key, value)
    # single: SLURM's variables are ignored (one process in a SLURM job is not a data-parallel run)
    assert Distributed(validate(compose_train([]))).world_size == 1 and "RANK" not in os.environ
    # ddp: 2 ranks from SLURM_NTASKS (the size check fails before the process group is joined)
    with pytest.raises(ValueError, match=r"divisible by the number of ranks \(2\)"):
        Distributed(validate(compose_train(["trainer.strategy=ddp", "trainer.prompts_per_step=3"])))
    assert (os.environ["RANK"], os.environ["LOCAL_RANK"], os.environ["MASTER_ADDR"]) == ("5", "5", "gpu017")


@pytest.mark.parametrize(("name", "nodes"), [("slurm_gpu_node", 1), ("slurm_multi_node", 2)])
def test_slurm_launcher_configs_make_an_srun_job(monkeypatch, name, nodes):
    """The example configs compose into the plugin's schema and give submitit's sbatch script one task
    per GPU (srun starts the ranks, as torchrun --nproc_per_node would), without a SLURM cluster."""
    submitit = pytest.importorskip("submitit")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit.slurm import slurm

    cfg = compose_train([f"hydra/launcher={name}", "hydra.launcher.partition=gpu"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.nodes == nodes
    # what SlurmLauncher.launch does with these parameters (no srun here: skip its detection)
    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    params = OmegaConf.to_container(launcher, resolve=True)
    for key in ("_target_", "submitit_folder", "max_num_timeout"):
        params.pop(key)
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor = submitit.AutoExecutor(folder="unused", cluster="slurm")
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = slurm._make_sbatch_string(
        command="python -m submitit.core._submit x", folder="x", **executor._executor.parameters
    )
    for line in (
        f"--nodes={nodes}",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--partition=gpu",
        "export OMP_NUM_THREADS=8",
    ):
        assert line in script, script
    assert "\nsrun " in script


def _multirun(tmp_path, saved_tiny, extra: list[str]):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", *SMALL_RUN, "trainer.steps=1", "trainer.eval_every=0",
            "trainer.completions_every=0", "logger=none", f"model.name_or_path={saved_tiny}",
            f"hydra.sweep.dir={sweep}", "hydra.launcher.timeout_min=5", *extra]  # fmt: skip
    proc = run_train(args, cwd=tmp_path)
    logs = "\n".join(p.read_text() for p in sweep.glob(".submitit/*/*.err")) if sweep.exists() else ""
    assert proc.returncode == 0, proc.stderr[-3000:] + logs[-6000:]
    return sweep, sorted(p for p in sweep.iterdir() if p.is_dir() and (p / ".hydra").is_dir())


@pytest.mark.slow
def test_submitit_local_multirun_runs_each_job_in_its_folder(saved_tiny, tmp_path):
    sweep, jobs = _multirun(tmp_path, saved_tiny, ["seed=1,2"])
    assert [j.name for j in jobs] == ["0", "1"]
    for job, seed in zip(jobs, (1, 2)):
        assert OmegaConf.load(job / ".hydra" / "config.yaml").seed == seed
        assert {r["step"] for r in read_metrics(job)} == {1}  # the step and the final evaluation
        assert (job / "final_model" / "config.json").exists()
    assert len([d for d in (sweep / ".submitit").iterdir() if d.name.isdigit()]) == 2  # two submitit jobs


@pytest.mark.slow
def test_submitit_local_job_of_two_ranks_trains_data_parallel(saved_tiny, tmp_path):
    """One job with tasks_per_node=2: submitit starts both ranks (as srun would on a SLURM node), the
    recipe builds the process group from their variables; rank 0 alone writes the run folder."""
    sweep, jobs = _multirun(
        tmp_path, saved_tiny, ["hydra.launcher.tasks_per_node=2", "trainer.strategy=ddp", "seed=3"]
    )
    assert [j.name for j in jobs] == ["0"]
    assert {r["step"] for r in read_metrics(jobs[0])} == {1}
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_0_log.out"))
    assert "ddp over 2 ranks (gloo" in logs
