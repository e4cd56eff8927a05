"""DAPO's dynamic sampling (Yu et al. 2025): train only on groups whose rewards differ.

A group whose G samples got the same reward has zero advantage everywhere: it adds nothing to the
policy gradient but still dilutes the loss normaliser. Dynamic sampling drops those groups and samples
more prompts until ``target`` informative groups are kept, with at most ``max_rounds`` extra generation
rounds per step. A batch still short after the cap is filled up with dropped groups, so every step
trains on the configured number of sequences (the sizes validated at start-up hold).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tensordict import TensorDict

from pipeline.rewards import RewardResult
from pipeline.tasks import Example

LEFT_PADDED = ("tokens", "attention_mask")  # prompts are left-padded; every other [N, T] entry right-padded


@dataclass
class Groups:
    """Scored samples of whole prompt groups: what the recipe's collect + score produce for a step."""

    examples: list[Example]  # [prompts]
    rollout: TensorDict  # [prompts x G]
    rewards: RewardResult  # [prompts x G]
    zero_var: torch.Tensor  # [prompts] bool

    def select(self, keep: torch.Tensor, group_size: int) -> Groups:
        """The groups where ``keep`` ([prompts] bool) is True, in order."""
        rows = keep.repeat_interleave(group_size)
        r = self.rewards
        per_fn = {k: v[rows] for k, v in r.per_function.items()}
        rewards = RewardResult(
            total=r.total[rows],
            valid=r.valid[rows],
            per_function=per_fn,
            failures={k: int((~torch.isfinite(v)).sum()) for k, v in per_fn.items()},
        )
        examples = [e for e, k in zip(self.examples, keep.tolist()) if k]
        return Groups(examples, self.rollout[rows], rewards, self.zero_var[keep])


def concat(parts: list[Groups], pad_token_id: int) -> Groups:
    """Groups of several rounds as one batch; padded entries are re-padded to the widest round."""
    parts = [p for p in parts if len(p.examples)] or parts[:1]
    rollouts = [p.rollout for p in parts]
    for key, value in rollouts[0].items():
        if not isinstance(value, torch.Tensor) or value.ndim < 2:
            continue
        width = max(r[key].shape[1] for r in rollouts)
        pad = pad_token_id if key in ("tokens", "tokens_response") else 0
        for r in rollouts:
            missing = width - r[key].shape[1]
            if missing:
                side = (missing, 0) if key in LEFT_PADDED else (0, missing)
                r[key] = torch.nn.functional.pad(r[key], side, value=pad)
    per_fn = {k: torch.cat([p.rewards.per_function[k] for p in parts]) for k in parts[0].rewards.per_function}
    rewards = RewardResult(
        total=torch.cat([p.rewards.total for p in parts]),
        valid=torch.cat([p.rewards.valid for p in parts]),
        per_function=per_fn,
        failures={k: sum(p.rewards.failures[k] for p in parts) for k in per_fn},
    )
    examples = [e for p in parts for e in p.examples]
    return Groups(examples, torch.cat(rollouts), rewards, torch.cat([p.zero_var for p in parts]))


def refill(
    first: Groups,
    draw: Callable[[int], Groups],
    *,
    target: int,
    group_size: int,
    max_rounds: int,
    pad_token_id: int,
) -> tuple[Groups, dict[str, float]]:
    """Keep the groups of ``first`` that carry signal; ``draw(n)`` collects and scores ``n`` more prompts
    per extra round (as many as the keep rate so far suggests are needed, at most ``target``).

    Returns ``target`` groups (informative ones first, then dropped ones if still short) and the
    ``dynamic/*`` metrics: groups kept, zero-variance groups dropped (all rounds), extra rounds and
    prompts, and groups filled back in.
    """
    kept, dropped, batch = [], [], first
    n_kept = n_dropped = rounds = extra_prompts = 0
    while True:
        keep = ~batch.zero_var
        kept.append(batch.select(keep, group_size))
        dropped.append(batch.select(~keep, group_size))
        n_kept, n_dropped = n_kept + int(keep.sum()), n_dropped + int((~keep).sum())
        if n_kept >= target or rounds >= max_rounds:
            break
        n = min(target, math.ceil((target - n_kept) * (n_kept + n_dropped) / max(n_kept, 1)))
        batch, rounds, extra_prompts = draw(n), rounds + 1, extra_prompts + n
    filled = max(0, target - n_kept)
    parts = kept + ([_first(concat(dropped, pad_token_id), filled, group_size)] if filled else [])
    out = _first(concat(parts, pad_token_id), target, group_size)
    return out, {
        "dynamic/kept_groups": min(n_kept, target),
        "dynamic/dropped_groups": n_dropped,
        "dynamic/extra_rounds": rounds,
        "dynamic/extra_prompts": extra_prompts,
        "dynamic/filled_groups": filled,
    }


def draw(
    sample: Callable[[int], list[Example]],
    collect: Callable[[list[Example]], TensorDict],
    score: Callable[[TensorDict, list[Example]], tuple[RewardResult, torch.Tensor]],
    n: int,
) -> Groups:
    """``n`` new prompts sampled, their groups collected and scored (the recipe's own steps)."""
    examples = sample(n)
    rollout = collect(examples)
    return Groups(examples, rollout, *score(rollout, examples))


def _first(groups: Groups, n: int, group_size: int) -> Groups:
    keep = torch.arange(len(groups.examples)) < n
    return groups if bool(keep.all()) else groups.select(keep, group_size)
