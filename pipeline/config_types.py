"""Enums of the configuration schemas and the range-check helper they share."""

from __future__ import annotations

from enum import Enum
from typing import Any


class DType(Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"


class Advantage(Enum):
    grpo = "grpo"  # (r - mean) / (std + eps) within each group; std_normalize=false is Dr. GRPO
    rloo = "rloo"  # leave-one-out baseline
    gae = "gae"  # PPO: token-level GAE from a critic's values (algo.critic)


class LossAgg(Enum):
    token_mean = "token_mean"  # DAPO: every token of the minibatch weighs the same
    seq_mean_token_mean = "seq_mean_token_mean"  # GRPO: mean per sequence, then over sequences
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"  # Dr. GRPO: token sum / (sequences x max_new_tokens)
    seq_mean = "seq_mean_token_mean"  # the older names: aliases, so saved configs still load
    seq_sum_norm = "seq_mean_token_sum_norm"


class ImportanceRatio(Enum):
    token = "token"  # PPO/GRPO: one ratio per token
    sequence = "sequence"  # GSPO: the length-normalised sequence ratio on every token of a row


class CriticKind(Enum):
    shared = "shared"  # a linear value head on the policy's last hidden state (same forward pass)
    separate = "separate"  # a second copy of the model with its own value head


class OnError(Enum):
    zero = "zero"  # a failed reward scores 0
    drop = "drop"  # the sample is left out of the loss
    fail = "fail"  # stop the run


class WandbMode(Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {value!r}.")


class Strategy(Enum):
    single = "single"  # one process
    ddp = "ddp"  # torchrun ranks, DistributedDataParallel
    fsdp = "fsdp"  # torchrun ranks, FSDP2 fully_shard (pipeline.fsdp)


class DistRollout(Enum):
    shard = "shard"  # each rank generates its own prompt groups (per-rank seeds)
    replicate = "replicate"  # every rank generates the global batch and keeps its rows (tests)


class RolloutEngine(Enum):
    hf = "hf"  # Hugging Face generate on the training model
    vllm = "vllm"  # a vLLM engine with its own copy of the weights (optional extra: make install-vllm)
