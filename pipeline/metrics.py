"""Metrics of a training step: pure functions of the rollout, the rewards and the update statistics.

Every key is namespaced (``reward/``, ``logprobs/``, ``completions/``, ``loss/``, ``kl/``, ``perf/``) on
one step axis; README's "Metrics" section lists them.
"""

from __future__ import annotations

import resource
from typing import Any

import numpy as np
import torch
from tensordict import TensorDictBase

from pipeline import algos
from pipeline.rewards import RewardResult


def _mean(x: torch.Tensor) -> float:
    return float(x.float().mean()) if x.numel() else 0.0


def _std(x: torch.Tensor) -> float:
    return float(x.std()) if x.numel() > 1 else 0.0


def reward_metrics(rewards: RewardResult, accuracy: str | None, zero_var: torch.Tensor) -> dict[str, float]:
    """Total and per-function reward statistics, failures, dropped samples, zero-variance groups."""
    out = {
        "reward/total_mean": _mean(rewards.total),
        "reward/total_std": _std(rewards.total),
        "reward/total_max": float(rewards.total.max()),
        "reward/zero_var_groups": _mean(zero_var),
        "reward/dropped": int((~rewards.valid).sum()),
    }
    for name, values in rewards.per_function.items():
        ok = values[torch.isfinite(values)]
        out[f"reward/{name}_mean"] = _mean(ok)
        out[f"reward/{name}_std"] = _std(ok)
        out[f"reward/{name}_max"] = float(ok.max()) if ok.numel() else 0.0
        out[f"reward/{name}_failures"] = rewards.failures[name]
    if accuracy is not None:
        out["reward/accuracy"] = _mean(rewards.per_function[accuracy] == 1.0)
    return out


def rollout_metrics(rollout: TensorDictBase, max_new_tokens: int) -> dict[str, float]:
    """Sampled-token log-prob statistics and completion lengths, EOS and truncation rates.

    Reads behaviour ``log_probs`` and ``tokens_response_mask`` (``[N, T]``), ``lengths`` and ``ended`` (``[N]``).
    """
    sampled = rollout["log_probs"][rollout["tokens_response_mask"]]
    lengths, ended = rollout["lengths"], rollout["ended"]
    return {
        "logprobs/mean": _mean(sampled),
        "logprobs/std": _std(sampled),
        "logprobs/min": float(sampled.min()) if sampled.numel() else 0.0,
        "completions/len_mean": _mean(lengths),
        "completions/len_min": float(lengths.min()),
        "completions/len_max": float(lengths.max()),
        "completions/eos_rate": _mean(ended),
        "completions/truncation_rate": _mean(~ended & (lengths >= max_new_tokens)),
    }


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory on a GPU; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def perf_metrics(
    tokens: float, phases: dict[str, float], step_time: float, device: torch.device
) -> dict[str, float]:
    """Per-phase wall-clock seconds (``perf/<phase>_time``), throughput and peak memory."""
    out = {"perf/step_time": step_time, **{f"perf/{k}_time": v for k, v in phases.items()}}
    out["perf/gen_tokens_per_s"] = tokens / max(phases.get("collect", 0.0), 1e-9)
    out["perf/tokens_per_s"] = tokens / max(step_time, 1e-9)
    out["perf/peak_mem_mb"] = peak_memory_mb(device)
    return out


def completion_rows(
    prompts: list[str], completions: list[str], answers: list[str], rewards: torch.Tensor, limit: int = 16
) -> list[dict[str, Any]]:
    """The first ``limit`` samples of a step as rows of the completions table."""
    return [
        {
            "prompt": prompts[i],
            "completion": completions[i],
            "answer": answers[i],
            "reward": float(rewards[i]),
        }
        for i in range(min(limit, len(prompts)))
    ]


class UpdateStats:
    """Accumulates per-token statistics over the micro-batches of one update; ``summary()`` reduces them.

    Only valid tokens (the loss mask) are kept, so every mean is over the tokens that were trained on.
    """

    def __init__(self) -> None:
        self.tokens: dict[str, list[torch.Tensor]] = {}
        self.gen_train_diff: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.value_grad_norms: list[float] = []
        self.skipped = 0

    def add_tokens(self, stats: dict[str, torch.Tensor], mask: torch.Tensor) -> None:
        for key, value in stats.items():
            self.tokens.setdefault(key, []).append(value[mask])

    def add_gen_train_diff(self, log_ratio: torch.Tensor, mask: torch.Tensor) -> None:
        """|training - behaviour| log-prob on the first pass, before any update: the sampler/trainer gap."""
        self.gen_train_diff.append(log_ratio.abs()[mask])

    def add_step(
        self, loss: float, grad_norm: float, skipped: bool, value_grad_norm: float | None = None
    ) -> None:
        self.losses.append(loss)
        self.grad_norms.append(grad_norm)
        self.skipped += int(skipped)
        if value_grad_norm is not None:
            self.value_grad_norms.append(value_grad_norm)

    def summary(self) -> dict[str, float]:
        cat = {k: torch.cat(v) for k, v in self.tokens.items()}
        ratio = cat.get("ratio", torch.zeros(0))
        diff = torch.cat(self.gen_train_diff) if self.gen_train_diff else torch.zeros(0)
        log_ratio = cat.get("log_ratio", torch.zeros(0))
        out = {
            "loss/total": float(np.mean(self.losses)),
            "loss/pg": _mean(cat.get("pg", torch.zeros(0))),
            "loss/clip_frac": _mean(cat.get("clipped", torch.zeros(0)).float()),
            "loss/grad_norm": float(np.mean(self.grad_norms)),
            "loss/nonfinite_skipped": self.skipped,
            "logprobs/gen_train_absdiff_mean": _mean(diff),
            "logprobs/gen_train_absdiff_max": float(diff.max()) if diff.numel() else 0.0,
            "logprobs/ratio_mean": _mean(ratio),
            "logprobs/ratio_min": float(ratio.min()) if ratio.numel() else 1.0,
            "logprobs/ratio_max": float(ratio.max()) if ratio.numel() else 1.0,
            "logprobs/ess": float(algos.effective_sample_size(log_ratio)),  # over the valid tokens kept
        }
        if "entropy" in cat:
            out["loss/entropy"] = _mean(cat["entropy"])
        if "kl" in cat:
            out["kl/ref_mean"] = _mean(cat["kl"])
            out["kl/ref_max"] = float(cat["kl"].max()) if cat["kl"].numel() else 0.0
        if "tis_ratio" in cat:  # truncated importance sampling (rollout.tis_cap)
            out["logprobs/tis_mean_ratio"] = _mean(cat["tis_ratio"]) if cat["tis_ratio"].numel() else 1.0
            out["logprobs/tis_capped_frac"] = _mean(cat["tis_capped"].float())
        if "dual_clipped" in cat:
            out["loss/dual_clip_frac"] = _mean(cat["dual_clipped"].float())
        if "value_loss" in cat:  # PPO's critic
            out["loss/value"] = _mean(cat["value_loss"])
            out["value/clip_frac"] = _mean(cat["value_clipped"].float())
            out["value/grad_norm"] = float(np.mean(self.value_grad_norms)) if self.value_grad_norms else 0.0
        return out


def gae_metrics(
    advantages: torch.Tensor, returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """PPO: raw (unwhitened) GAE advantages, returns and the rollout's values over the valid tokens, and
    how much of the returns' variance the values explain (1 = a perfect critic, 0 = no better than the mean)."""
    m = mask.bool()
    adv, ret, val = advantages[m], returns[m], values[m]
    return {
        "advantage/mean": _mean(adv),
        "advantage/std": _std(adv),
        "value/returns_mean": _mean(ret),
        "value/returns_std": _std(ret),
        "value/returns_min": float(ret.min()) if ret.numel() else 0.0,
        "value/returns_max": float(ret.max()) if ret.numel() else 0.0,
        "value/mean": _mean(val),
        "value/explained_var": algos.explained_variance(values, returns, mask),
    }
