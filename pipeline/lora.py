"""LoRA adapters through peft (``model.lora.*``): train the adapters only; the reference is the base.

With ``model.lora.enabled=true`` the loaded model is wrapped by ``peft.get_peft_model``: every base
weight is frozen, so the optimizer (which takes the parameters that require grad) holds only the
adapters and their AdamW state. The KL reference needs no second model: it is the same model
scored inside :func:`adapters_disabled` (the initial weights, since the base never changes).

Files: a checkpoint's ``model/`` holds the adapters only (``adapter_config.json`` +
``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes them); loading it
(:func:`attach` with ``adapter``) puts them back on the base model of ``model.name_or_path``. The
final model is saved twice by :func:`save_pretrained`: merged into the base weights as a plain
Hugging Face folder (``final_model/``, loadable without peft) and as the adapters alone
(``final_model_adapter/``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from pipeline.config import LoraConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SUFFIX = "_adapter"  # final_model_adapter/ next to the merged final_model/


def _peft() -> Any:
    try:
        import peft
    except ImportError as err:
        raise ImportError(
            "model.lora.enabled=true (or a checkpoint with LoRA adapters) needs peft: "
            "pip install -c constraints.txt -e '.[lora]'"
        ) from err
    return peft


def is_adapter_folder(path: str | Path | None) -> bool:
    """Whether ``path`` holds peft adapters (a LoRA run's checkpoint ``model/`` or final adapter)."""
    return path is not None and (Path(path) / ADAPTER_CONFIG).is_file()


def is_lora(model: torch.nn.Module) -> bool:
    """Whether ``model`` carries peft adapters (without importing peft when it is not installed)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def attach(model: torch.nn.Module, cfg: LoraConfig, adapter: str | Path | None = None) -> torch.nn.Module:
    """``model`` with LoRA adapters: loaded from ``adapter`` (trainable when ``cfg.enabled``), or new
    ones from ``cfg`` when enabled; otherwise ``model`` unchanged."""
    if adapter is not None:
        return _peft().PeftModel.from_pretrained(model, str(adapter), is_trainable=cfg.enabled)
    if not cfg.enabled:
        return model
    peft = _peft()
    config = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules) or "all-linear",
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def adapters_disabled(model: torch.nn.Module) -> AbstractContextManager:
    """Inside it a LoRA model computes its base model's outputs (the reference); other models are unchanged."""
    return model.disable_adapter() if is_lora(model) else nullcontext()


def reference_model(model: torch.nn.Module, load: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """The KL reference: a LoRA model itself (scored inside :func:`adapters_disabled`), else ``load()``'s
    frozen copy of the initial weights."""
    return model if is_lora(model) else load().requires_grad_(False)


def save_pretrained(
    model: torch.nn.Module, path: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> Path:
    """The model in Hugging Face format at ``path``; a LoRA model merged into its base weights (a copy:
    the live model keeps its adapters), with the adapters alone in ``path`` + ``_adapter``.
    ``state_dict`` replaces a plain model's own (FSDP: the full state gathered from the shards)."""
    if not is_lora(model):
        model.save_pretrained(path, safe_serialization=True, state_dict=state_dict)
        return path
    model.save_pretrained(path.with_name(path.name + ADAPTER_SUFFIX))
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(path, safe_serialization=True)
    return path


def trainable_summary(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
