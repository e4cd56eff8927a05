"""Data parallelism over ``torchrun`` ranks (``trainer.strategy=ddp|fsdp``): every distributed concern of a recipe.

``torchrun --nproc_per_node N train.py trainer.strategy=ddp ...`` starts N ranks. Each samples the
same global batch of prompts (the task sampler stays identical, hence resumable on any number of
ranks), keeps its contiguous share of whole prompt groups, generates, scores and computes
advantages locally. The loss normalisers (token and sequence counts) are summed over ranks and
gradients are *summed* by DDP (a sum comm hook, no 1/N averaging), so N ranks compute exactly the
gradient of the single-process loss. Micro-batches other than the last of a minibatch run under
``no_sync``. Rank 0 alone writes the run folder, wandb, metrics and checkpoints; metrics are
computed on the tensors gathered from every rank.

``trainer.strategy=fsdp`` runs the same loop on a model sharded by FSDP2 (:mod:`pipeline.fsdp`):
gradients are reduce-scattered as sums, accumulation micro-batches skip the reduction, rollouts and
evaluation run under ``no_grad`` with the weights gathered and every rank generating in lock-step
(evaluation shares padded to one length), and checkpoints hold full states in the one-process format.

``trainer.strategy=single`` (the default) gives a :class:`Distributed` whose methods are identities,
so one process runs exactly as before.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from tensordict import TensorDict, TensorDictBase
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from pipeline import fsdp
from pipeline.launch import env_rank, env_world_size, scheduler_env
from pipeline.metrics import UpdateStats
from pipeline.rewards import RewardResult

T = TypeVar("T")

# rollout fields the metrics, histograms and the completions table read (gathered to rank 0)
METRIC_KEYS = ("log_probs", "tokens_response_mask", "lengths", "ended", "reward", "text", "text_response")


def step_seed(seed: int, step: int, rank: int) -> int:
    """The generation seed of ``rank`` at ``step``: a function of the run seed only, so a resumed
    run (on the same number of ranks) samples exactly what an uninterrupted one would."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0])


class _DDP(DistributedDataParallel):
    """DDP whose missing attributes come from the wrapped model (``generate``, ``config``, ...), so the
    TransformersWrapper scores through DDP's forward (the one that prepares the gradient all-reduce)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":
                raise
            return getattr(self.module, name)


def _sum_hook(state, bucket):  # no annotations: DDP checks them, and they are strings here
    """All-reduce SUM of a ``dist.GradBucket`` (DDP's default divides by the world size): each rank's
    loss is already its share of the global loss, normalised by global token/sequence counts."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


class NullLogger:
    """The logger of ranks > 0: they log nothing (rank 0 logs the metrics of all ranks)."""

    def __init__(self, wandb_id: str | None = None) -> None:
        self.wandb_id = wandb_id

    def log(self, *args: Any, **kwargs: Any) -> None: ...

    def log_completions(self, *args: Any, **kwargs: Any) -> None: ...

    def plot(self) -> None: ...

    def close(self) -> None: ...


def _cpu(x: Any) -> Any:
    return x.detach().cpu() if isinstance(x, torch.Tensor) else x


def _cat(parts: list[Any]) -> Any:
    """Concatenate per-rank parts in rank order: tensors (2-D ones right-padded to one width) or lists."""
    if isinstance(parts[0], torch.Tensor):
        if parts[0].ndim == 2:
            width = max(p.shape[1] for p in parts)
            parts = [torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts]
        return torch.cat(parts)
    return [x for p in parts for x in p]


class Distributed:
    """The process group and everything a recipe does differently on more than one rank.

    Built from the config and torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``) or, without it, from srun's or submitit's (:func:`scheduler_env`); the options are
    checked before the process group is joined.
    """

    def __init__(self, cfg: Any) -> None:
        tr = cfg.trainer
        self.strategy = tr.strategy.value
        self.replicate = tr.dist_rollout.value == "replicate"
        self.seed, self.group_size = cfg.seed, cfg.generate.num_samples
        if self.strategy != "single":  # ranks started by srun / submitit: their variables, torchrun's names
            os.environ.update(scheduler_env(os.environ))
        self.world_size, self.rank = env_world_size(), env_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled, self.fsdp = self.strategy != "single", self.strategy == "fsdp"
        self.ddp: _DDP | None = None
        self.sharded: torch.nn.Module | None = None  # fsdp: the policy model, sharded in place
        if not self.enabled:
            if self.world_size > 1:
                raise ValueError(
                    f"launched as {self.world_size} processes (WORLD_SIZE={self.world_size}, torchrun) but "
                    "trainer.strategy=single; set trainer.strategy=ddp (or fsdp) for data parallelism."
                )
            return
        if "MASTER_ADDR" not in os.environ:
            s = self.strategy
            raise ValueError(
                f"trainer.strategy={s} needs the torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR): "
                f"launch with `torchrun --nproc_per_node N train.py trainer.strategy={s} ...`, or under srun / "
                "`-m hydra/launcher=slurm_gpu_node` (SLURM_PROCID, SLURM_NTASKS)."
            )
        w = self.world_size
        if tr.prompts_per_step % w:
            raise ValueError(
                f"trainer.prompts_per_step={tr.prompts_per_step} must be divisible by the number of ranks "
                f"({w}): each rank collects whole prompt groups."
            )
        local = tr.prompts_per_step // w * self.group_size
        if local % tr.num_minibatches:
            raise ValueError(
                f"each of the {w} ranks holds {local} sequences, not divisible by trainer.num_minibatches="
                f"{tr.num_minibatches}; change trainer.prompts_per_step or trainer.num_minibatches."
            )
        use_cuda = cfg.model.device != "cpu" and torch.cuda.is_available()
        self.backend = "nccl" if use_cuda else "gloo"
        self.device = torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        dist.init_process_group(
            self.backend,
            timeout=timedelta(seconds=tr.dist_timeout_s),
            device_id=self.device if use_cuda else None,
        )
        self.mesh = init_device_mesh(self.device.type, (w,)) if self.fsdp else None

    # ------------------------------------------------------------------ roles and sizes
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if not self.enabled:
            return "1 process"
        mode = "replicated generation (test mode)" if self.replicate else "sharded generation"
        return f"{self.strategy} over {self.world_size} ranks ({self.backend}, {mode}; the sizes above are per rank)"

    def local_sizes(self, sizes: dict[str, int], micro_batch_size: int) -> dict[str, int]:
        """``derived_sizes`` per rank: the rollout and minibatches are split over the ranks."""
        if not self.enabled:
            return sizes
        out = dict(sizes, global_rollout=sizes["rollout"])
        out["rollout"] = sizes["rollout"] // self.world_size
        out["minibatch"] = sizes["minibatch"] // self.world_size
        out["micro_batch"] = min(micro_batch_size, out["minibatch"])
        out["grad_accum"] = max(1, out["minibatch"] // out["micro_batch"])
        return out

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's contiguous share of ``items`` (by global index; uneven shares allowed)."""
        n = len(items)
        return list(items[self.rank * n // self.world_size : (self.rank + 1) * n // self.world_size])

    def eval_shard(self, items: Sequence[T]) -> tuple[list[T], int]:
        """(this rank's share, how many of it are real). Under fsdp every generate call is a collective,
        so each share is padded to the longest with copies of ``items[0]`` (to be ignored)."""
        mine = self.shard(items)
        if not self.fsdp or not items:
            return mine, len(mine)
        longest = -(-len(items) // self.world_size)
        return mine + [items[0]] * (longest - len(mine)), len(mine)

    def shared_path(self, path: Path) -> Path:
        """Rank 0's ``path`` on every rank (the run folder: Hydra's on ranks > 0 is a throw-away one)."""
        if not self.enabled:
            return Path(path)
        box = [str(path)]
        dist.broadcast_object_list(box, src=0)
        return Path(box[0])

    # ------------------------------------------------------------------ model
    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module the training forward runs through: DDP (sum all-reduce), or the model itself
        (fsdp: sharded in place, gradients summed; the optimizer must be built after this)."""
        if not self.enabled:
            return model
        if self.fsdp:
            if self.sharded is None:
                self.sharded = fsdp.shard(model, self.mesh)
            return self.sharded
        if self.ddp is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = _DDP(model, device_ids=ids, forward_sync_buffers=False)
            self.ddp.register_comm_hook(None, _sum_hook)
        return self.ddp

    def frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that only runs forward (the KL reference): sharded like the policy under fsdp."""
        if not self.fsdp:
            return model
        return fsdp.shard(model, self.mesh, reshard_root=True)

    def inference(self) -> AbstractContextManager:
        """The no-gradient context of rollouts, reference log-probs and evaluation: ``inference_mode``,
        or under fsdp ``no_grad`` with the policy's weights gathered (:func:`pipeline.fsdp.gathered`)."""
        return fsdp.gathered(self.sharded) if self.fsdp else torch.inference_mode()

    def accumulate(self, micro_batches: Iterable[T]) -> Iterator[T]:
        """Yield the micro-batches of one optimizer step; all but the last run under DDP's ``no_sync``
        (fsdp: ``set_requires_gradient_sync(False)``; forward and backward happen in the loop body,
        inside the context), so gradients are reduced once per optimizer step."""
        items = list(micro_batches)
        for i, item in enumerate(items):
            last = i == len(items) - 1
            if self.sharded is not None:
                self.sharded.set_requires_gradient_sync(last)
            with self.ddp.no_sync() if self.ddp is not None and not last else nullcontext():
                yield item

    def clip_grad_norm_(self, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip to ``max_norm``; the global gradient norm (over every rank's shards under fsdp)."""
        return fsdp.clip_grad_norm_(params, max_norm)

    # ------------------------------------------------------------------ checkpoints
    def full_state(self, model: torch.nn.Module, optimizer: Any = None) -> dict[str, Any]:
        """Under fsdp, ``state_dict`` (and ``optimizer_state``) gathered whole to rank 0 for
        :func:`pipeline.checkpoint.save_checkpoint` / :func:`pipeline.lora.save_pretrained`, which
        then write what one process would; ``{}`` otherwise (the model's own). A collective."""
        if not self.fsdp:
            return {}
        out: dict[str, Any] = {"state_dict": fsdp.full_model_state(model)}
        if optimizer is not None:
            out["optimizer_state"] = fsdp.full_optimizer_state(optimizer, keep=self.is_main)
        return out

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a saved (whole) optimizer state; under fsdp each rank keeps its shards."""
        optimizer.load_state_dict(fsdp.sharded_optimizer_state(optimizer, state) if self.fsdp else state)

    # ------------------------------------------------------------------ rollout
    def collect(
        self, collect: Callable[[list], TensorDict], examples: list, step: int
    ) -> tuple[list, TensorDict]:
        """(this rank's examples, their rollout) from the global batch ``examples``.

        Sharded (default): rank r generates its whole groups, seeded by (run seed, step, r).
        Replicated (``trainer.dist_rollout=replicate``, for tests): every rank generates the global
        batch from the same RNG stream as one process would and keeps its rows, so N ranks
        reproduce a single-process run exactly (N times the generation work).
        """
        if not self.enabled:
            return examples, collect(examples)
        mine = self.shard(examples)
        if not self.replicate:
            torch.manual_seed(step_seed(self.seed, step, self.rank))
            return mine, collect(mine)
        lo = self.rank * len(examples) // self.world_size * self.group_size
        return mine, collect(examples)[lo : lo + len(mine) * self.group_size]

    def permutation(self, n: int) -> torch.Tensor:
        """A shuffle of this rank's ``n`` rows: the rank's rows in the order of one global
        ``randperm`` (the same RNG draws as one process shuffling the global rollout)."""
        if not self.enabled:
            return torch.randperm(n)
        perm = torch.randperm(n * self.world_size)
        return perm[perm // n == self.rank] - self.rank * n

    # ------------------------------------------------------------------ reductions
    def all_sum(self, *values: float) -> list[float]:
        """Sums over ranks (loss normalisers, the loss), in float64."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: object) -> bool:
        """True on every rank when ``flag`` is truthy on any (a stop request reaches ranks at different times)."""
        return bool(self.all_sum(1.0 if flag else 0.0)[0]) if self.enabled else bool(flag)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn`` on rank 0 alone, between barriers: every rank has finished the step before it
        starts (a checkpoint of one consistent state) and none moves on before it is written."""
        self.barrier()
        out = fn(*args, **kwargs) if self.is_main else None
        self.barrier()
        return out

    def gather_all(self, *parts: Any) -> list[Any]:
        """Each part (a tensor or a list) concatenated over ranks in rank order, on every rank."""
        if not self.enabled:
            return list(parts)
        boxes: list[Any] = [None] * self.world_size
        dist.all_gather_object(boxes, [_cpu(p) for p in parts])
        return [_cat([b[i] for b in boxes]) for i in range(len(parts))]

    def _gather_main(self, obj: Any) -> list[Any] | None:
        boxes = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, boxes, dst=0)
        return boxes

    def gather_for_metrics(
        self, rewards: RewardResult, zero_var: torch.Tensor, rollout: TensorDictBase
    ) -> tuple[RewardResult, torch.Tensor, TensorDictBase]:
        """On rank 0, the rewards, zero-variance flags and rollout fields of :data:`METRIC_KEYS` of
        all ranks (rank order = global order); other ranks get their own back (they log nothing)."""
        if not self.enabled:
            return rewards, zero_var, rollout
        texts = ("text", "text_response")
        fields = {
            k: list(rollout[k]) if k in texts else _cpu(rollout[k])
            for k in METRIC_KEYS
            if k in rollout.keys()
        }
        mine = {
            "total": _cpu(rewards.total),
            "valid": _cpu(rewards.valid),
            "per_function": {k: _cpu(v) for k, v in rewards.per_function.items()},
            "failures": dict(rewards.failures),
            "zero_var": _cpu(zero_var),
            "rollout": fields,
        }
        boxes = self._gather_main(mine)
        if boxes is None:
            return rewards, zero_var, rollout
        merged = RewardResult(
            total=_cat([b["total"] for b in boxes]),
            valid=_cat([b["valid"] for b in boxes]),
            per_function={k: _cat([b["per_function"][k] for b in boxes]) for k in mine["per_function"]},
            failures={k: sum(b["failures"][k] for b in boxes) for k in mine["failures"]},
        )
        fields = {k: _cat([b["rollout"][k] for b in boxes]) for k in mine["rollout"]}
        n = len(merged.total)
        return merged, _cat([b["zero_var"] for b in boxes]), TensorDict(fields, batch_size=[n])

    def gather_stats(self, stats: UpdateStats) -> UpdateStats:
        """Rank 0's statistics over every rank's tokens (losses are already global sums, grad norms
        are equal on every rank after the all-reduce)."""
        if not self.enabled:
            return stats
        mine = {k: [_cpu(torch.cat(v))] for k, v in stats.tokens.items()}
        boxes = self._gather_main(
            (mine, [_cpu(torch.cat(stats.gen_train_diff))] if stats.gen_train_diff else [])
        )
        if boxes is None:
            return stats
        stats.tokens = {k: [t for b in boxes for t in b[0][k]] for k in mine}
        stats.gen_train_diff = [t for b in boxes for t in b[1]]
        return stats

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            if self.ddp is not None:
                # Drop DDP's reducer while the group is still registered. Left for the garbage collector,
                # the reducer is the group's last owner and destroys it with the GIL held: the gloo
                # destructor joins its worker thread, which may be releasing a gathered tensor and
                # waits for the GIL (a hang at exit on a rank that finished first).
                self.ddp.logger = None
                self.ddp.reducer = None
            dist.destroy_process_group()
