"""Atomic training checkpoints: write to a temporary folder, fsync, rename; keep the last K.

A checkpoint folder ``step_NNNNNN/`` holds everything a resume needs: ``model/`` (Hugging Face
format, safetensors), ``optimizer.pt`` and ``scheduler.pt`` (tensors only: loaded with
``weights_only=True``), ``rng.pt`` (torch RNG states), ``state.json`` (step, counters, task sampler
position, python/numpy RNG, wandb run id) and ``config.yaml``. A crash mid-write leaves only a
``.tmp-*`` folder, which is ignored and cleaned up; the previous checkpoint stays intact.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step_"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def rng_state() -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor states for ``rng.pt``, JSON-able states for ``state.json``)."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, plain


def set_rng_state(tensors: dict[str, Any], plain: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])
    version, state, gauss = plain["python"]
    random.setstate((version, tuple(state), gauss))
    kind, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(
    root: Path,
    step: int,
    *,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    config_yaml: str,
    keep_last: int,
    extra: dict[str, dict[str, torch.Tensor]] | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write ``root/step_NNNNNN`` atomically and prune to the newest ``keep_last``.

    ``extra`` maps a name to a state dict of tensors saved as ``NAME.pt`` (e.g. PPO's ``critic``).
    ``state_dict`` / ``optimizer_state`` replace the model's and optimizer's own (FSDP: the full
    states gathered from the shards, so the files are those one process writes).
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = root / f".tmp-{PREFIX}{step:06d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    model.save_pretrained(tmp / "model", safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(tmp / "model")
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    for name, tensors in (extra or {}).items():
        torch.save(tensors, tmp / f"{name}.pt")
    tensors, plain = rng_state()
    torch.save(tensors, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({**state, "step": step, "rng": plain}))
    (tmp / "config.yaml").write_text(config_yaml)
    _fsync_tree(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): replace it
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    for stale in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def clean_partial(root: Path) -> None:
    """Remove folders left by a write that was interrupted."""
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def resume_path(resume: str | None, root: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` names: ``auto`` is the newest complete one under ``root`` (none
    yet: a fresh start; half-written ones are removed), a path is checked; ``None``: no resume."""
    if resume is None:
        return None
    if resume == "auto":
        clean_partial(root)
        found = list_checkpoints(root)
        return found[-1] if found else None
    return check_checkpoint(Path(resume))


def check_checkpoint(path: Path, key: str = "trainer.resume") -> Path:
    """Validate a checkpoint folder given by the user (before any model loading)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"{key}={str(path)!r}: no such checkpoint folder (expected .../checkpoints/step_NNNNNN)."
        )
    missing = [
        n
        for n in ("state.json", "optimizer.pt", "scheduler.pt", "rng.pt", "model")
        if not (path / n).exists()
    ]
    if missing:
        raise ValueError(f"{key}={str(path)!r} is not a complete checkpoint: missing {missing}.")
    return path


def load_training_state(path: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(state.json, optimizer state, scheduler state, rng tensors), tensors loaded weights-only."""
    state = json.loads((path / "state.json").read_text())
    optim = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    sched = torch.load(path / "scheduler.pt", weights_only=True, map_location="cpu")
    rng = torch.load(path / "rng.pt", weights_only=True, map_location="cpu")
    return state, optim, sched, rng


def load_extra(path: Path, name: str, key: str = "trainer.resume") -> dict[str, torch.Tensor]:
    """A state dict saved through ``save_checkpoint(extra={name: ...})``, loaded weights-only."""
    file = path / f"{name}.pt"
    if not file.is_file():
        raise ValueError(
            f"{key}={str(path)!r} has no {file.name}: the checkpoint was written by a run without a {name} "
            "(e.g. a GRPO run resumed as PPO)."
        )
    return torch.load(file, weights_only=True, map_location="cpu")
