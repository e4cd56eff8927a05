"""The vLLM extra from the main environment: its lock file covers the project, a missing vllm is a clear error."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.tiny import char_tokenizer, tiny_model
from pipeline.vllm_args import vllm_available
from pipeline.vllm_engine import VLLMWrapper

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_vllm_lock_pins_every_project_dependency():
    """`make install-vllm` installs constraints-vllm.txt with --no-deps: a dependency missing there is never installed."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    needed = {_name(r) for r in [*project["dependencies"], *extras["dev"], *extras["vllm"]]}
    lines = (ROOT / "constraints-vllm.txt").read_text().splitlines()
    pinned = {_name(line) for line in lines if "==" in line and not line.startswith("#")}
    assert needed - pinned == set()
    assert not pinned & {"torchvision", "torchaudio", "torchcodec"}  # they break `import vllm`


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_missing_vllm_names_the_install_command(tmp_path):
    tokenizer = char_tokenizer()
    tiny_model(tokenizer, arch="llama", hidden=64, heads=2).save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="make install-vllm"):
        VLLMWrapper(tmp_path, tokenizer=tokenizer)
