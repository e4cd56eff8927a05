"""Loading models and tokenizers from config: the embedded model, local folders or the hub.

``builtin://NAME`` resolves to ``pipeline/assets/NAME`` (shipped with the package);
``gguf://PACKAGE/FILE.gguf`` (or ``gguf:///path/FILE.gguf``) to a Hugging Face folder converted once
into the cache (:mod:`pipeline.gguf`). Anything else goes to ``from_pretrained``: a local folder is
read directly; a hub id needs the network or a populated cache, and failing that the error says how
to point ``model.name_or_path`` at a local copy.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipeline.activations import TANH_GELU_NAMES, compile_gelu_tanh
from pipeline.config import DType, ModelConfig, TokenizerConfig
from pipeline.runtime import check_cpp_compiler

ASSETS = Path(__file__).parent / "assets"
BUILTIN = "builtin://"
GGUF = "gguf://"


class ModelLoadError(ValueError):
    """A model or tokenizer could not be found or loaded; the message says how to fix it."""


def resolve_path(name_or_path: str, key: str = "model.name_or_path") -> str:
    """Map ``builtin://NAME`` to the packaged folder and ``gguf://...`` to its converted cache
    folder (converting on first use); other values (hub ids, local folders) pass through."""
    if name_or_path.startswith(GGUF):
        from pipeline import gguf  # imports this module: load it only for GGUF sources

        return gguf.resolve(name_or_path, key)
    if name_or_path.startswith(BUILTIN):
        name = name_or_path[len(BUILTIN) :]
        path = ASSETS / name
        if not (path / "config.json").is_file():
            available = (
                sorted(p.name for p in ASSETS.iterdir() if (p / "config.json").is_file())
                if ASSETS.is_dir()
                else []
            )
            raise ModelLoadError(
                f"{key}={name_or_path!r}: no embedded model {name!r}; available: {available}."
            )
        return str(path)
    return name_or_path


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; ``auto``/``cuda`` under torchrun mean this rank's GPU (``LOCAL_RANK``)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available() and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"model.device={device!r} but CUDA is not available on this machine; use model.device=cpu."
        )
    return torch.device(device)


def resolve_dtype(dtype: DType, device: torch.device) -> torch.dtype:
    if dtype is DType.auto:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return getattr(torch, dtype.value)


def _explain(key: str, path: str, err: Exception) -> ModelLoadError:
    local = Path(path).expanduser()
    if local.exists():
        hint = f"the folder {str(local)!r} exists but is not a loadable Hugging Face model/tokenizer: {err}"
    else:
        where = (
            "it is not in the local cache and the hub is unreachable"
            if not hub_reachable()
            else (f"the hub could not serve it ({type(err).__name__}: {str(err).splitlines()[0][:200]})")
        )
        name = Path(path).name
        hint = (
            f"it is not a local folder; {where}. Download it once where you have network "
            f"(e.g. `hf download {path} --local-dir ./models/{name}`) and set {key}=./models/{name} "
            "(a folder with config.json and weights, as save_pretrained writes)."
        )
    return ModelLoadError(f"could not load {key}={path!r}: {hint}")


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection quickly (False when HF_HUB_OFFLINE is set)."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _local_only(path: str) -> bool:
    """Read a hub id from the local cache only when the hub is unreachable (no slow retries)."""
    return not Path(path).expanduser().exists() and not hub_reachable()


def check_model_source(cfg: ModelConfig) -> tuple[str, PretrainedConfig]:
    """Resolve and check the model location cheaply (config only), before any weight loading."""
    path = resolve_path(cfg.name_or_path)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                   local_files_only=_local_only(path))  # fmt: skip
    except (OSError, ValueError) as err:
        raise _explain("model.name_or_path", path, err) from err
    return path, config


def context_length(config: PretrainedConfig) -> int | None:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_prompts_fit(prompts: list[str], tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig,
                      max_new_tokens: int, *, source: str = "task") -> None:  # fmt: skip
    """Every prompt plus ``max_new_tokens`` must fit the model's context (checked before loading weights)."""
    limit = context_length(config)
    if limit is None or not prompts:
        return
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    worst = max(range(len(lengths)), key=lengths.__getitem__)
    if lengths[worst] + max_new_tokens > limit:
        raise ValueError(
            f"{source} prompt #{worst} has {lengths[worst]} tokens; with generate.max_new_tokens={max_new_tokens} "
            f"that exceeds the model context of {limit} tokens. Shorten the prompts or lower generate.max_new_tokens."
        )


def load_tokenizer(cfg: TokenizerConfig, model_path: str) -> PreTrainedTokenizerBase:
    key = "tokenizer.name_or_path" if cfg.name_or_path else "model.name_or_path"
    path = resolve_path(cfg.name_or_path, key) if cfg.name_or_path else model_path
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code,
                                             local_files_only=_local_only(path))  # fmt: skip
    except (OSError, ValueError) as err:
        raise _explain(key, path, err) from err


# config.activation_function -> the fused kernel of the same function
_FUSED_ACTIVATIONS = {"gelu_new": "gelu_pytorch_tanh"}


def load_model(
    cfg: ModelConfig,
    path: str,
    device: torch.device,
    dtype: torch.dtype,
    config: PretrainedConfig | None = None,
) -> PreTrainedModel:
    """``from_pretrained`` with the run's dtype and device; errors name ``model.name_or_path``.

    With ``cfg.fused_activation`` a model whose config says ``gelu_new`` (GPT-2 and kin) runs it as
    ``gelu_pytorch_tanh``: the same tanh approximation of GELU, but one fused kernel instead of
    eight elementwise ops, each saved for backward (about 40% less time in a training forward and
    backward of a small GPT-2 on CPU). The saved model keeps the original name. With
    ``cfg.compile_activation`` its tanh GELU runs as two compiled kernels (:mod:`pipeline.activations`).
    """
    kwargs = {"dtype": dtype, "revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code,
              "local_files_only": _local_only(path)}  # fmt: skip
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if cfg.compile_activation:
        _check_compile_activation(config, device)
    fused = cfg.fused_activation and getattr(config, "activation_function", None) in _FUSED_ACTIVATIONS
    if fused:
        kwargs["activation_function"] = _FUSED_ACTIVATIONS[config.activation_function]
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise _explain("model.name_or_path", path, err) from err
    if fused:
        model.config.activation_function = config.activation_function  # runtime kernel only
    # its tanh-GELU modules as compiled kernels (pipeline.activations); none: an activation the config hid
    if cfg.compile_activation and compile_gelu_tanh(model) == 0:
        raise _not_tanh_gelu(_activation_name(model.config))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device)


def _activation_name(config: PretrainedConfig | None) -> str | None:
    return getattr(config, "activation_function", None) or getattr(config, "hidden_act", None)


def _check_compile_activation(config: PretrainedConfig | None, device: torch.device) -> None:
    """``model.compile_activation`` before loading: a model whose config names another activation, or a
    CPU without the C++ compiler that builds the kernels, is an error that names the key."""
    act = _activation_name(config)
    if isinstance(act, str) and act not in TANH_GELU_NAMES:
        raise _not_tanh_gelu(act)
    if device.type == "cpu":
        check_cpp_compiler("model.compile_activation", "model.compile_activation=false")


def _not_tanh_gelu(act: object) -> ValueError:
    return ValueError(
        f"model.compile_activation=true compiles the tanh approximation of GELU ({', '.join(TANH_GELU_NAMES)}); "
        f"this model's activation is {act!r}. Set model.compile_activation=false."
    )
