"""FSDP2 (``trainer.strategy=fsdp``): parameters, gradients and AdamW state sharded over the ranks.

:class:`pipeline.distributed.Distributed` calls these; the rest of the data-parallel path (prompt
groups per rank, all-reduced loss normalisers, metrics gathered to rank 0) is the one DDP uses.

- **Wrapping.** ``fully_shard`` on every decoder block (the classes in the model's
  ``_no_split_modules``), then on the root (embeddings, final norm, head). Gradients are
  reduce-scattered as a *sum* (divide factor 1): each rank's loss is already its share of the global
  loss, so N ranks compute the single-process gradient, as DDP's sum hook does.
- **Generation.** FSDP2 does not run under ``torch.inference_mode`` (its unsharded buffers would become
  inference tensors), so rollouts and evaluation run under ``no_grad``; inside :func:`gathered` the
  blocks stay unsharded after their first forward (one all-gather per ``generate`` call, not one per
  token) and are resharded on exit. ``generate(synced_gpus=True)`` keeps ranks that finish early in
  step with the others.
- **Checkpoints.** Full (unsharded) model and optimizer states are gathered to rank 0 in the format
  one process writes (:mod:`pipeline.checkpoint`), so a checkpoint resumes on any number of ranks and
  any strategy; on resume every rank loads the whole model (sharded by ``fully_shard``) and the
  optimizer file, keeping its own shard of each state tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor


def decoder_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks: modules whose class is in ``_no_split_modules`` (every HF
    decoder declares it), else the children of the longest ``ModuleList``."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def fsdp_modules(model: torch.nn.Module) -> list[FSDPModule]:
    """``model``'s modules that ``fully_shard`` wrapped (the root first)."""
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def shard(model: torch.nn.Module, mesh: DeviceMesh, *, reshard_root: bool = False) -> torch.nn.Module:
    """``model`` sharded in place (blocks, then the root), gradients summed over ranks.

    ``reshard_root``: free the root's gathered parameters after each forward too (FSDP keeps them
    for the backward by default); for a model that never runs backward (the KL reference).
    """
    for block in reversed(decoder_blocks(model)):  # inner modules before the ones holding them
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=True if reshard_root else None)
    for m in fsdp_modules(model):
        m.set_gradient_divide_factor(1.0)  # a sum, like DDP's sum hook
        m.set_force_sum_reduction_for_comms(True)  # ReduceOp.SUM: gloo has no PREMUL_SUM
    return model


def reshard(model: torch.nn.Module) -> None:
    """Free every gathered parameter (the root keeps its own after a forward without backward)."""
    for m in fsdp_modules(model):
        m.reshard()


@contextmanager
def gathered(model: torch.nn.Module | None) -> Iterator[None]:
    """``no_grad``, with ``model``'s blocks kept unsharded after their first all-gather (generation
    runs one forward per token; the root keeps its parameters anyway), all resharded on exit."""
    blocks = [m for m in fsdp_modules(model) if m is not model] if model is not None else []
    for m in blocks:
        m.set_reshard_after_forward(False, recurse=False)
    try:
        with torch.no_grad():
            yield
    finally:
        for m in blocks:
            m.set_reshard_after_forward(True, recurse=False)
        if model is not None:
            reshard(model)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on rank 0 (CPU), empty on the others; a collective. Tied weights
    (GPT-2's ``lm_head.weight``) are left out, as ``save_pretrained`` leaves them out of a plain model."""
    reshard(model)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    tied = dict(model.named_parameters(remove_duplicate=False)).keys() - dict(model.named_parameters()).keys()
    return {k: v for k, v in state.items() if k not in tied}


def _full(value: Any) -> Any:
    return value.full_tensor().cpu() if isinstance(value, DTensor) else value


def full_optimizer_state(optimizer: torch.optim.Optimizer, keep: bool) -> dict[str, Any]:
    """``optimizer.state_dict()`` with every DTensor gathered to a whole CPU tensor: the file one
    process writes. A collective; ``keep=False`` (ranks > 0) returns an empty dict."""
    sd = optimizer.state_dict()
    state = {i: {k: _full(v) for k, v in s.items()} for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]} if keep else {}


def sharded_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> dict[str, Any]:
    """A whole optimizer state (as :func:`full_optimizer_state` or one process saved it) cut to this
    rank's shards of its parameters, ready for ``optimizer.load_state_dict``. No communication."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def cut(p: torch.Tensor, v: Any) -> Any:
        if not (isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() and v.shape == p.shape):
            return v
        whole = v.to(p.device)  # cut locally, then cloned: the shard must not keep the whole tensor alive
        return distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).clone()

    per_param = {i: {k: cut(params[i], v) for k, v in s.items()} for i, s in state["state"].items()}
    return {"state": per_param, "param_groups": state["param_groups"]}


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded gradients; the global norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
