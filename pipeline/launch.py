"""How a process learns its place in a distributed job: torchrun's environment, or SLURM's / submitit's
when a scheduler started the ranks itself; and Hydra's arguments on ranks other than 0."""

from __future__ import annotations

import atexit
import os
import random
import re
import shutil
import sys
import tempfile
from collections.abc import Mapping


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


# (global rank, local rank, number-of-tasks variables, job id) of the schedulers that start every rank:
# srun (SLURM, Hydra's submitit_slurm launcher) and submitit's local executor (submitit_local)
_SCHEDULERS = {
    "SLURM": ("SLURM_PROCID", "SLURM_LOCALID", ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"), "SLURM_JOB_ID"),
    "SUBMITIT_LOCAL": (
        "SUBMITIT_LOCAL_GLOBALID",
        "SUBMITIT_LOCAL_LOCALID",
        ("SUBMITIT_LOCAL_NTASKS",),
        "SUBMITIT_LOCAL_JOB_ID",
    ),
}


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12]-ib,cpu1`` -> ``gpu07-ib``."""
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    prefix, ranges, suffix = m.groups() if m else (nodelist, None, "")
    return prefix + (ranges.split(",")[0].split("-")[0] if ranges else "") + suffix


def scheduler_env(environ: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)
    derived from a scheduler that started every rank itself: srun's ``SLURM_PROCID``/``SLURM_LOCALID``/
    ``SLURM_STEP_NUM_TASKS`` (rendezvous on the first host of the step's node list) or submitit's local
    executor. Empty when torchrun's variables are there (torchrun inside a SLURM job wins) or no scheduler
    is. The port: ``MASTER_PORT`` if set, else one drawn from the job id (the same on every rank)."""
    if "RANK" in environ:
        return {}
    for name, (rank, local, ntasks, job_id) in _SCHEDULERS.items():
        if rank not in environ:
            continue
        size = next((environ[k] for k in ntasks if k in environ), "1")
        if name == "SLURM":
            nodes = next(
                (
                    environ[k]
                    for k in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
                    if k in environ
                ),
                "localhost",
            )
            addr = environ.get("MASTER_ADDR", first_host(nodes))
        else:
            addr = environ.get("MASTER_ADDR", "127.0.0.1")
        port = environ.get("MASTER_PORT", str(random.Random(environ.get(job_id, "0")).randint(20000, 60000)))
        return {
            "RANK": environ[rank],
            "WORLD_SIZE": size,
            "LOCAL_RANK": environ.get(local, "0"),
            "MASTER_ADDR": addr,
            "MASTER_PORT": port,
        }
    return {}


def hydra_argv_for_rank(argv: list[str]) -> list[str]:
    """Command-line overrides for a torchrun rank: ranks > 0 write no Hydra output.

    Every rank runs ``@hydra.main``; left alone, each would create a run folder (two folders when
    ``${now:...}`` ticks between them) and race on ``.hydra/`` and the job log. Ranks > 0 get a
    throw-away run folder, removed at exit; the recipe takes rank 0's folder through the process group.
    """
    if env_rank() == 0:
        return argv
    tmp = tempfile.mkdtemp(prefix=f"rank{env_rank()}-hydra-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    kept = [a for a in argv if not a.lstrip("+").startswith(("hydra.run.dir=", "hydra.output_subdir="))]
    quiet = ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return [*kept, f"hydra.run.dir={tmp}", *quiet]


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or env_world_size() > 1


def quiet_hydra() -> None:
    """``sys.argv`` rewritten for this rank (see :func:`hydra_argv_for_rank`); call before ``@hydra.main``."""
    if launched_by_torchrun():
        sys.argv[1:] = hydra_argv_for_rank(sys.argv[1:])
