"""Run logging: metrics.jsonl, wandb (offline by default, never fatal), console bar and a PNG plot.

All metrics share one step axis and are namespaced (``reward/``, ``logprobs/``, ``loss/``, ``kl/``,
``completions/``, ``perf/``, ``eval/``). wandb failing to start falls back to local logging with one
warning; logging errors never stop training.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from pipeline.config import LoggerConfig

# Curves drawn in plots.png, in this order (missing ones are skipped).
PLOTTED = (
    "reward/total_mean",
    "reward/accuracy",
    "eval/accuracy",
    "kl/ref_mean",
    "loss/pg",
    "completions/len_mean",
)


class RunLogger:
    """Fans metrics out to the JSONL file, wandb and the console progress bar."""

    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        *,
        config: dict[str, Any],
        run_name: str,
        group: str | None,
        total_steps: int,
        start_step: int,
        wandb_id: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.completions_path = run_dir / "completions.jsonl"
        _truncate_after(self.metrics_path, start_step)
        _truncate_after(self.completions_path, start_step)
        self.wandb = None
        self.wandb_id = wandb_id
        if cfg.wandb and cfg.mode.value != "disabled":
            self._start_wandb(config, run_name, group)
        self.bar = None
        if cfg.console:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _start_wandb(self, config: dict[str, Any], run_name: str, group: str | None) -> None:
        try:
            import wandb

            run = wandb.init(
                project=self.cfg.project,
                entity=self.cfg.entity,
                mode=self.cfg.mode.value,
                dir=str(self.run_dir),
                config=config,
                name=run_name,
                group=self.cfg.group or group,
                tags=list(self.cfg.tags),
                id=self.wandb_id,
                resume="allow" if self.wandb_id else None,
                settings=wandb.Settings(silent=True, console="off", x_disable_stats=True),
            )
            self.wandb = run
            self.wandb_id = run.id
            run.define_metric("*", step_metric="step")
        except Exception as err:  # wandb must never stop training
            warnings.warn(
                f"wandb could not start ({type(err).__name__}: {err}); logging locally only.", stacklevel=2
            )
            self.wandb = None

    def log(
        self, step: int, metrics: dict[str, float], histograms: dict[str, torch.Tensor] | None = None
    ) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            try:
                import wandb

                payload = dict(row)
                for key, values in (histograms or {}).items():
                    payload[key] = wandb.Histogram(values.detach().float().cpu().numpy())
                self.wandb.log(payload)
            except Exception as err:
                warnings.warn(f"wandb.log failed ({err}); continuing with local logging.", stacklevel=2)
        if self.bar is not None:
            shown = {
                "reward": "reward/total_mean",
                "acc": "reward/accuracy",
                "kl": "kl/ref_mean",
                "eval": "eval/accuracy",
            }
            self.bar.set_postfix(
                {k: f"{metrics[v]:.3f}" for k, v in shown.items() if v in metrics}, refresh=False
            )
            self.bar.n = step
            self.bar.refresh()

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        with self.completions_path.open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **row}) + "\n")
        if self.wandb is not None and rows:
            try:
                import wandb

                columns = ["step", *rows[0]]
                table = wandb.Table(columns=columns, data=[[step, *r.values()] for r in rows])
                self.wandb.log({"step": step, "completions/table": table})
            except Exception as err:
                warnings.warn(f"wandb table logging failed ({err}).", stacklevel=2)

    def plot(self) -> Path | None:
        """Write plots.png with the main curves from metrics.jsonl."""
        if not self.cfg.plot or not self.metrics_path.exists():
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]
        keys = [k for k in PLOTTED if any(k in r for r in rows)]
        if not keys:
            return None
        fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.2 * len(keys)), sharex=True, squeeze=False)
        for ax, key in zip(axes[:, 0], keys):
            pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
            ax.set_ylabel(key, fontsize=8)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("step")
        fig.tight_layout()
        path = self.run_dir / "plots.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.wandb is not None:
            try:
                self.wandb.finish()
            except Exception as err:
                warnings.warn(f"wandb.finish failed ({err}).", stacklevel=2)
            self.wandb = None


def _clean(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _truncate_after(path: Path, step: int) -> None:
    """On resume, drop rows logged after the checkpoint's step (they will be logged again)."""
    if not path.exists():
        return
    keep = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step
    ]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)
