"""Shared test helpers: Hydra composition, in-process and subprocess runs, reading what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

from pipeline.config import register_configs, validate
from pipeline.runtime import recipe_class

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Overrides for runs that take seconds: 2 prompts x 2 samples, 4 new tokens.
SMALL_RUN = [
    "trainer.steps=2",
    "trainer.prompts_per_step=2",
    "generate.num_samples=2",
    "generate.max_new_tokens=4",
    "trainer.micro_batch_size=2",
    "trainer.eval_every=1",
    "trainer.eval_size=4",
    "trainer.completions_every=1",
    "trainer.save_every=1",
    # a length reward varies even for a random model, so updates are non-zero
    "+reward.functions.short._target_=pipeline.rewards.length_penalty",
    "+reward.functions.short.max_chars=1",
]


def compose_train(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """``conf/train.yaml`` composed with Hydra's compose API, as ``train.py`` would see it."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides or [], return_hydra_config=return_hydra_config)


def run_recipe(cfg_or_overrides: Any, run_dir: Path) -> tuple[Any, float]:
    """Set up, train and clean up the configured recipe in-process; returns it and the final held-out accuracy.

    Takes a validated config or a list of overrides.
    """
    cfg = (
        validate(compose_train(cfg_or_overrides)) if isinstance(cfg_or_overrides, list) else cfg_or_overrides
    )
    recipe = recipe_class(cfg.algo.recipe)(cfg, run_dir)
    try:
        recipe.setup()
        return recipe, recipe.train()
    finally:
        recipe.cleanup()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a user's process: offline hub and wandb, and no ``WANDB_SERVICE``. An in-process
    run of an earlier test leaves a wandb service and its address in ``os.environ``; a child that inherits
    it hands its run to that service, which may not have written the run file when the child exits."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    return {**env, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **extra}


def run_script(
    script: str, args: list[str], cwd: Path = ROOT, timeout: int = 240
) -> subprocess.CompletedProcess:
    """``python SCRIPT ARGS`` (``train.py``, ``evaluate.py``) as a user runs it (offline hub, offline wandb)."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_without_cpp_compiler(code: str) -> subprocess.CompletedProcess:
    """``python -c CODE`` in a fresh process that finds no C++ compiler (``PATH`` emptied, no ``CXX``):
    torch caches its compiler search for the life of a process, so this cannot run in the test's own."""
    env = {k: v for k, v in os.environ.items() if k != "CXX"} | {"PATH": "/nonexistent"}
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def load_configured(path: Path, dtype: Any = None, **options: Any) -> Any:
    """The model folder ``path`` loaded as a run loads it (``pipeline.models.load_model``) on CPU, with
    ``model.*`` ``options`` (``fused_activation``, ``compile_activation``, ...), in ``dtype`` (float32)."""
    import torch

    from pipeline.config import ModelConfig
    from pipeline.models import check_model_source, load_model

    cfg = ModelConfig(name_or_path=str(path), **options)
    _, config = check_model_source(cfg)
    return load_model(cfg, str(path), torch.device("cpu"), dtype or torch.float32, config)


def run_train(args: list[str], cwd: Path = ROOT, timeout: int = 240) -> subprocess.CompletedProcess:
    return run_script("train.py", args, cwd=cwd, timeout=timeout)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics without wall-clock measurements."""
    return [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rows]


def save_tiny_model(path: Path, **model_kwargs: Any) -> Path:
    """A random tiny model + the char tokenizer saved in Hugging Face format (a local model folder)."""
    from pipeline.tiny import char_tokenizer, tiny_model

    tok = char_tokenizer()
    tiny_model(tok, seed=0, **model_kwargs).save_pretrained(path)
    tok.save_pretrained(path)
    return path
