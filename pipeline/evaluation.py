"""Held-out evaluation: greedy responses scored by the accuracy reward, shared across ranks.

Each rank evaluates its share of the eval examples; the scores and lengths of all ranks are
gathered (in example order) before the metrics are computed, so N ranks report exactly what one
process would.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pipeline.rewards import RewardSet
from pipeline.tasks import Example

CHUNK = 256  # prompts per greedy generation batch


def eval_metrics(
    scores: torch.Tensor, lengths: list[int], *, drop_failed: bool, formats: torch.Tensor | None = None
) -> dict[str, float]:
    """Accuracy (score == 1), mean length, failed scorings (NaN scores) and, given the ``format``
    reward's values, the format rate (mean of the finite ones; failures count as 0).

    ``drop_failed`` (``reward.on_error=drop``) leaves failed samples out of the accuracy; otherwise
    they count as wrong.
    """
    failed = ~torch.isfinite(scores)
    kept = scores[~failed] if drop_failed else scores
    out = {
        "eval/accuracy": float(np.mean((kept == 1.0).tolist())) if kept.numel() else float("nan"),
        "eval/len_mean": float(np.mean(lengths)),
        "eval/reward_failures": int(failed.sum()),
    }
    if formats is not None and formats.numel():
        out["eval/format"] = float(torch.nan_to_num(formats, nan=0.0).mean())
    return out


@torch.no_grad()  # not inference_mode: FSDP2 cannot run under it (the recipe picks the mode)
def greedy_eval(
    greedy: Callable[[Any], Any],
    prompt_batch: Callable[[list[Example]], Any],
    rewards: RewardSet,
    accuracy: str | None,
    examples: list[Example],
    gather: Callable[..., list[Any]] | None = None,
    format_name: str = "format",
    real: int | None = None,
) -> dict[str, float]:
    """Greedy held-out accuracy (the ``accuracy`` reward == 1) and mean length of ``examples``.

    ``greedy`` may also be a sampling policy (``n`` responses per prompt, ``[prompts, n]``): the
    accuracy is then over all samples, and ``eval/pass_at_n`` is the share of prompts with at least
    one correct sample.

    A failing accuracy reward is handled as in training (``rewards.on_error``): ``zero`` counts the
    sample as wrong, ``drop`` leaves it out of the accuracy, ``fail`` stops the run. ``gather``
    concatenates the per-rank scores and lengths (``Distributed.gather_all``). A reward function
    named ``format_name`` (when the set has one, whatever its weight) gives ``eval/format``. Only the
    first ``real`` examples count (``None``: all): the others pad a rank's share so that every rank
    runs the same generate calls (FSDP, :meth:`pipeline.distributed.Distributed.eval_shard`).
    """
    fmt = format_name if format_name in rewards.functions else None
    scores, formats, lengths, n = [], [], [], 1
    for start in range(0, len(examples), CHUNK):
        chunk = examples[start : start + CHUNK]
        out = greedy(prompt_batch(chunk))
        out = out.reshape(-1) if out.ndim > 1 else out  # a sampling policy: [prompts, n] -> prompt-major
        n = len(out) // max(len(chunk), 1)
        keep = len(chunk) if real is None else min(len(chunk), real - start)
        if keep <= 0:
            continue
        if keep < len(chunk):
            chunk, out = chunk[:keep], out[: keep * n]
        lengths += out["tokens_response_mask"].sum(-1).tolist()
        completions = list(out["text_response"])
        answers = [e.answer for e in chunk for _ in range(n)]
        prompts = [e.prompt for e in chunk for _ in range(n)]
        if accuracy is not None:
            scores.append(rewards.score_one(accuracy, completions, answers, prompts).cpu())
        if fmt is not None:
            formats.append(rewards.score_one(fmt, completions, answers, prompts).cpu())
    values = torch.cat(scores) if scores else torch.zeros(0)
    fmt_values = torch.cat(formats) if formats else torch.zeros(0, dtype=torch.float64)
    if gather is not None:
        values, lengths, fmt_values = gather(values, lengths, fmt_values)
    out = eval_metrics(
        values, lengths, drop_failed=rewards.on_error == "drop", formats=fmt_values if fmt else None
    )
    if n > 1 and values.numel():
        out["eval/pass_at_n"] = float((values.reshape(-1, n) == 1.0).any(-1).float().mean())
    return out
