"""Run-level plumbing shared by every recipe: seeding, the reproducibility bundle, stop signals, timing."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. repeated non-finite losses); the message says why."""


def seed_everything(seed: int, deterministic: bool = True, threads: int | None = None) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def config_dict(cfg: Any, *, resolve: bool = True) -> dict[str, Any]:
    """A typed config (dataclass) or DictConfig as a plain dict."""
    node = cfg if OmegaConf.is_config(cfg) else OmegaConf.structured(cfg)
    return OmegaConf.to_container(node, resolve=resolve)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            cwd=Path(__file__).parent,
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def write_run_info(run_dir: Path, cfg: Any) -> None:
    """The reproducibility bundle: resolved config, git commit, seed, library versions."""
    versions = {}
    for pkg in ("torch", "transformers", "tensordict", "torchrl", "hydra-core", "omegaconf", "wandb"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    info = {
        "git_commit": git_commit(),
        "seed": cfg.seed,
        "versions": versions,
        "config": config_dict(cfg, resolve=False),
    }
    (run_dir / "run_info.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(info)))


class StopRequest:
    """Ctrl-C / SIGTERM during training: finish the current step, save a checkpoint, then stop.

    A step is the unit of consistent state (weights, optimizer, sampler, RNG), so the first signal
    only sets ``requested``; a second one interrupts immediately.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            raise KeyboardInterrupt(f"second {name}: stopping without a checkpoint")
        self.requested = name
        print(
            f"\n[{name}] finishing the current step, then saving a checkpoint (send it again to stop now)",
            flush=True,
        )

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals only reach the main thread
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def check_cpp_compiler(option: str, off: str) -> None:
    """Raises a ``ValueError`` naming ``option`` and how to turn it ``off`` when ``torch.compile`` could not
    build its C++ kernels (a CPU without a compiler): it would fail at the first compiled call, deep in
    a run, so the option fails when it is set up, with the fix."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: the first compilation reports it instead
        return
    try:
        get_cpp_compiler()
    except Exception as err:  # InvalidCxxCompiler, or the compiler's version check failing
        raise ValueError(
            f"{option} needs a C++ compiler on CPU (torch.compile builds its kernels with it; install g++ "
            f"or set CXX), or set {off}: {err}"
        ) from err


class PhaseTimer:
    """Wall-clock seconds per named phase of a step: ``with timer("collect"): ...``; ``timer.times``."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.times: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            with torch.profiler.record_function(f"phase/{phase}"):  # a profile shows each phase's share
                yield
        finally:
            self.times[phase] = self.times.get(phase, 0.0) + time.perf_counter() - t0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def recipe_class(path: str) -> type:
    """The recipe class named by ``algo.recipe`` (a dotted path), with an error that names the key."""
    from hydra.utils import get_class

    try:
        cls = get_class(path)
    except Exception as err:
        raise ValueError(f"algo.recipe={path!r}: cannot import a recipe class there ({err}).") from err
    missing = [m for m in ("setup", "train", "cleanup") if not callable(getattr(cls, m, None))]
    if missing:
        raise ValueError(f"algo.recipe={path!r} is not a recipe: it has no {missing} method(s).")
    return cls
