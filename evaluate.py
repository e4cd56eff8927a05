"""Held-out accuracy of a model folder or a training checkpoint on a task: a table, printed and written.

python evaluate.py                                                    # the embedded model, greedy
python evaluate.py experiment=smollm2_chat_math                       # the untrained SmolLM2
python evaluate.py experiment=smollm2_chat_math eval.checkpoint=RUN/checkpoints/step_000020
python evaluate.py experiment=smollm2_chat_math model.name_or_path=RUN/final_model eval.num_samples=8
python evaluate.py -m experiment=smollm2_chat_math eval.checkpoint=RUN_A,RUN_B   # one folder per job

The config is train.yaml's (conf/evaluate.yaml adds the ``eval`` options and the output folder); the
table (model, task, n, accuracy, format rate, mean length) goes to ``eval.json`` and ``eval.md`` there.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.config import register_configs, validate
from pipeline.eval_report import evaluate, markdown_table, write_report

register_configs()


def task_label(choices: dict, overrides: list[str]) -> str:
    """The task as chosen on the command line: its config name and any ``task.*`` overrides."""
    parts = [str(choices.get("task"))] + [o.removeprefix("task.") for o in overrides if o.startswith("task.")]
    return " ".join(parts)


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(raw: DictConfig) -> float:
    cfg = validate(raw)
    hc = HydraConfig.get()
    row = evaluate(cfg, task_label(dict(hc.runtime.choices), list(hc.overrides.task)))
    json_path, md_path = write_report([row], Path(hc.runtime.output_dir))
    print(markdown_table([row]), end="")
    print(f"[eval] wrote {json_path} and {md_path}")
    return row["accuracy"]


if __name__ == "__main__":
    main()
