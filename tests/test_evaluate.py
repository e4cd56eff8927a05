"""evaluate.py as a user runs it: a table printed and written (JSON + markdown) for a model folder, and a
checkpoint of a 1-step training run scored exactly as that run's own held-out evaluation scored it."""

from __future__ import annotations

import json
import subprocess

from tests.helpers import SMALL_RUN, read_metrics, run_recipe, run_script

HEADER = "| model | task | n | samples | accuracy | pass_at_n | format | len_mean | seconds |"


def _evaluate(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    out = run_script("evaluate.py", args, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_evaluate_prints_and_writes_the_table(saved_tiny, tmp_path):
    args = [
        f"model.name_or_path={saved_tiny}",
        "eval.size=6",
        "generate.max_new_tokens=4",
        "task.num_eval=20",
    ]
    out = _evaluate([*args, f"hydra.run.dir={tmp_path}"])
    assert HEADER in out.stdout
    (row,) = json.loads((tmp_path / "eval.json").read_text())
    assert row["model"] == str(saved_tiny) and row["task"] == "arithmetic num_eval=20"
    assert (row["n"], row["samples"]) == (6, 1) and 0.0 <= row["accuracy"] <= 1.0
    assert 0.0 < row["len_mean"] <= 4 and row["format"] is not None  # reward=arithmetic has a format term
    md = (tmp_path / "eval.md").read_text()
    assert md.splitlines()[0] == HEADER and f"| {saved_tiny} | arithmetic num_eval=20 | 6 | 1 |" in md
    assert md in out.stdout


def test_evaluate_a_checkpoint_of_a_one_step_run(saved_tiny, tmp_path):
    run_dir = tmp_path / "run"
    common = [f"model.name_or_path={saved_tiny}", "logger=none", "generate.max_new_tokens=4"]
    run_recipe([*SMALL_RUN, *common, "trainer.steps=1", "trainer.eval_size=5"], run_dir)
    logged = [r for r in read_metrics(run_dir) if r["step"] == 1 and "eval/accuracy" in r][-1]
    # greedy and 3 samples per prompt in one multirun; the run folder resolves to its latest checkpoint
    sweep = tmp_path / "sweep"
    sweep_args = ["eval.size=5", "eval.num_samples=1,3", f"hydra.sweep.dir={sweep}"]
    _evaluate(["-m", *common, f"eval.checkpoint={run_dir}", *sweep_args])
    (greedy,) = json.loads((sweep / "0" / "eval.json").read_text())
    (sampled,) = json.loads((sweep / "1" / "eval.json").read_text())
    assert greedy["model"] == str(run_dir / "checkpoints" / "step_000001")
    assert (greedy["accuracy"], greedy["len_mean"]) == (logged["eval/accuracy"], logged["eval/len_mean"])
    assert (sampled["n"], sampled["samples"]) == (5, 3) and sampled["pass_at_n"] >= sampled["accuracy"]
