"""``evaluate.py``: held-out accuracy of a model folder or a training checkpoint, as a table row and files.

The model, tokenizer, chat template, task and rewards come from the same config groups as training
(``build_policy``, :func:`pipeline.evaluation.greedy_eval`), so a checkpoint is scored exactly as the
run's own held-out evaluation scored it. ``eval.checkpoint`` names a checkpoint folder
(``.../checkpoints/step_N``) or a run folder (its latest checkpoint): a full fine-tuning checkpoint is a
complete Hugging Face folder and replaces ``model.name_or_path``; a LoRA checkpoint holds adapters,
loaded onto the base model of ``model.name_or_path`` (pass the run's model, e.g. its ``experiment=``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

from transformers.utils import logging as hf_logging

from pipeline import checkpoint, lora
from pipeline.build import build_policy, load_model_and_tokenizer
from pipeline.chat import prompt_batch
from pipeline.config import TrainConfig, instantiate_node
from pipeline.evaluation import greedy_eval
from pipeline.rewards import RewardSet
from pipeline.runtime import seed_everything

COLUMNS = ("model", "task", "n", "samples", "accuracy", "pass_at_n", "format", "len_mean", "seconds")


def resolve_checkpoint(path: str) -> Path:
    """A checkpoint folder, or the latest one of a run folder or its ``checkpoints/``."""
    p = Path(path).expanduser()
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if not (p / "state.json").is_file():
        found = checkpoint.list_checkpoints(p)
        p = found[-1] if found else p
    return checkpoint.check_checkpoint(p, key="eval.checkpoint")


def evaluate(cfg: TrainConfig, task_label: str | None = None) -> dict[str, Any]:
    """One table row: the model, task, prompts, samples per prompt, accuracy, pass@n (n > 1),
    format rate (the ``format`` reward's mean, when the reward set has one), mean length in tokens."""
    hf_logging.disable_progress_bar()
    seed_everything(cfg.seed, cfg.trainer.deterministic, cfg.trainer.threads)
    weights, label = None, cfg.eval.label
    if cfg.eval.checkpoint:
        ckpt = resolve_checkpoint(cfg.eval.checkpoint)
        if lora.is_adapter_folder(ckpt / "model"):
            weights = str(ckpt / "model")
        else:  # a complete HF folder: its own weights, config and tokenizer
            cfg = dataclasses.replace(
                cfg, model=dataclasses.replace(cfg.model, name_or_path=str(ckpt / "model"))
            )
        label = label or str(ckpt)
    task = instantiate_node(cfg.task, "task")
    rewards = RewardSet.from_config(cfg.reward)
    examples = task.eval_examples[: cfg.eval.size]
    model, tokenizer = load_model_and_tokenizer(cfg, weights=weights, prompts=[e.prompt for e in examples])
    n = cfg.eval.num_samples
    mode, extra = ("greedy", {}) if n == 1 else ("generate", {"num_samples": n, "return_log_probs": False})
    policy = build_policy(cfg, mode, model=model, tokenizer=tokenizer, **extra)
    start = time.perf_counter()
    out = greedy_eval(
        policy, partial(prompt_batch, chat=cfg.chat_template), rewards, cfg.reward.accuracy, examples
    )
    return {
        "model": label or cfg.model.name_or_path,
        "task": task_label or type(task).__name__,
        "n": len(examples),
        "samples": n,
        "accuracy": out["eval/accuracy"],
        "pass_at_n": out.get("eval/pass_at_n", out["eval/accuracy"]),
        "format": out.get("eval/format", math.nan),
        "len_mean": out["eval/len_mean"],
        "seconds": time.perf_counter() - start,
        "reward_failures": out["eval/reward_failures"],
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a markdown table of :data:`COLUMNS`."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(rows: list[dict[str, Any]], out_dir: Path, stem: str = "eval") -> tuple[Path, Path]:
    """``stem.json`` (the rows, NaN as null) and ``stem.md`` (the table) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    json_path, md_path = out_dir / f"{stem}.json", out_dir / f"{stem}.md"
    json_path.write_text(json.dumps(clean, indent=2) + "\n")
    md_path.write_text(markdown_table(rows))
    return json_path, md_path
