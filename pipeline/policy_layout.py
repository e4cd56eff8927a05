"""Input and output containers of the TransformersWrapper (pipeline/policy.py).

The wrapper computes per-sample outputs; these functions put them in the container that receives
them. The layout follows that container: a lazy stack gets per-sample, variable-length entries; a
dense ``TensorDict`` or tensorclass (any batch shape) gets padded tensors, each right-padded output
with a boolean mask of its real positions. A tensorclass is handled through the tensordict
underneath it and comes back as the same class.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tensordict import TensorDict, TensorDictBase, is_tensorclass, lazy_stack

from pipeline.logprobs import pad_left, pad_right


def unwrap_container(obj: Any, what: str) -> tuple[TensorDictBase, type | None]:
    """The tensordict to work on and, for a tensorclass, its class (the wrapper runs on the tensordict
    underneath and returns the same class)."""
    if is_tensorclass(obj) and not isinstance(obj, type):
        return obj._tensordict, type(obj)
    if isinstance(obj, TensorDictBase):
        return obj, None
    raise TypeError(f"{what} must be a TensorDict or a tensorclass, got {type(obj).__name__}.")


def check_tensorclass_fields(cls: type | None, keys: Sequence[str]) -> None:
    """A tensorclass holds its declared fields only: every key the wrapper writes must be one."""
    if cls is None:
        return
    missing = [k for k in keys if k not in cls.__expected_keys__]
    if missing:
        raise ValueError(
            f"tensorclass {cls.__name__} does not declare the fields the wrapper writes: {missing}. "
            "Add them to the class, or pass a TensorDict."
        )


def padded_batch(
    values: Sequence[torch.Tensor], pad_value: float, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``values`` as one right-padded tensor and its boolean mask (True = real).

    With ``positions`` (a boolean ``[B, L]`` layout holding ``len(values[b])`` True entries in row
    ``b``), the values fill those positions instead, in order: outputs line up with an input that
    was unpadded with the same mask.
    """
    if positions is None:
        return pad_right(values, pad_value)
    positions = positions.to(device=values[0].device, dtype=torch.bool)
    out = values[0].new_full((*positions.shape, *values[0].shape[1:]), pad_value)
    where = positions.reshape(*positions.shape, *[1] * (out.ndim - 2)).expand_as(out)
    return out.masked_scatter_(where, torch.cat(list(values))), positions.clone()


def dense_outputs(
    outputs: dict[str, list],
    wrapper: Any,
    device: torch.device | str | None,
    positions: torch.Tensor | None = None,
) -> TensorDict:
    """Per-sample outputs as a flat dense batch: prompts (``wrapper.token_key``) left-padded with the
    pad id and ``attention_mask``; the outputs of ``wrapper.mask_keys`` right-padded (``tokens_response``
    with the pad id, the others with 0) each with its boolean mask; text as strings. ``positions``:
    where the non-token right-padded outputs go (score mode, see :func:`padded_batch`)."""
    data: dict[str, Any] = {}
    pad_id, response_key = wrapper.pad_token_id, wrapper.token_response_key
    for key, values in outputs.items():
        if key == wrapper.token_key:
            ids, mask = pad_left(values, pad_id)
            data[key], data[wrapper.attention_mask_key] = ids, mask.long()
        elif key in wrapper.mask_keys:
            pad, where = (pad_id, None) if key == response_key else (0.0, positions)
            data[key], data[wrapper.mask_keys[key]] = padded_batch(values, pad, where)
        elif key != wrapper.attention_mask_key:
            data[key] = values
    return TensorDict(data, batch_size=[len(next(iter(outputs.values())))], device=device)


def place_dense(
    out: TensorDictBase,
    td: TensorDictBase,
    container: Any,
    container_out: Any,
    inplace: bool | str,
    out_shape: tuple[int, ...],
    num_samples: int | None,
) -> TensorDictBase:
    """Dense layout: the flat padded outputs ``out`` in the container that ``inplace`` asks for.

    ``td`` is the input tensordict, ``container`` the caller's object (``td`` or the tensorclass
    around it), ``container_out`` the caller's ``tensordict_out`` if any.
    """
    if container_out is not None:  # its size is checked before any model work
        return container_out.update(reshaped(out, tuple(container_out.shape)))
    out = reshaped(out, out_shape)
    if inplace is False:
        return out
    if inplace == "empty":
        return td.empty(batch_size=out_shape).update(out)
    if num_samples is None:
        return container.update(out)  # the caller's object (a tensorclass updates its fields)
    # [*batch] cannot hold [*batch, G] samples: a new batch, the input entries repeated per sample.
    # the entries that ``out`` replaces are not copied first (``text``: one object per string)
    return td.exclude(*out.keys()).unsqueeze(-1).expand(out_shape).clone().update(out)


def assemble_rows(
    flat: TensorDictBase, rows: list[TensorDictBase], group: int, inplace: bool | str, target: Any
) -> TensorDictBase:
    """Lazy-stack layout: one tensordict of per-sample entries per output (``flat`` is the input
    batch, ``target`` the caller's ``tensordict_out`` if any)."""
    if target is not None:
        target = target.reshape(-1) if target.ndim > 1 else target
        for dst, row in zip(target.tensordicts, rows):
            dst.update(row)
        return target
    if inplace is False:
        return lazy_stack(rows)
    if inplace == "empty":
        return lazy_stack([flat[j // group].empty().update(row) for j, row in enumerate(rows)])
    if group == 1 and flat.stack_dim == 0:
        for dst, row in zip(flat.tensordicts, rows):
            dst.update(row)
        return flat
    # G samples per prompt: new rows that share the input entries.
    return lazy_stack([flat[j // group].copy().update(row) for j, row in enumerate(rows)])


def reshaped(td: TensorDictBase, shape: tuple[int, ...]) -> TensorDictBase:
    """``td`` with batch shape ``shape`` (0-dim by indexing: reshape to () drops non-tensor entries)."""
    shape = tuple(shape)
    if tuple(td.batch_size) == shape:
        return td
    if shape == ():
        return td[0]
    return td.reshape(shape)


def wrapper_keys(policy: Any, *, from_text: bool, generate: bool) -> tuple[list[str], list[str]]:
    """The ``in_keys`` and ``out_keys`` of a ``TransformersWrapper`` (its key names are class attributes)."""
    p = policy
    if from_text:
        in_keys = [p.text_key] if generate else [p.text_key, p.text_response_key]
    else:
        in_keys = [p.token_key, p.attention_mask_key] + ([] if generate else [p.token_response_key])
    out = [p.token_key, p.attention_mask_key, p.token_response_key] if generate or from_text else []
    if generate and from_text:
        out += [p.text_key, p.text_response_key]
    out += [p.log_prob_key] if p.return_log_probs else []
    out += [p.logits_key] if p.return_logits else []
    return in_keys, out
