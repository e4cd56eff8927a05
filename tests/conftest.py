"""Shared fixtures: tiny offline models and tokenizers; no network anywhere in the suite."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipeline.tiny import CHATML_TEMPLATE, bpe_tokenizer, char_tokenizer, tiny_model
from tests.helpers import save_tiny_model

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def char_tok():
    """Character-level tokenizer without a pad token (pads with EOS, as GPT-2 does)."""
    return char_tokenizer()


@pytest.fixture(scope="session")
def chat_tok():
    return char_tokenizer(chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def bpe_tok():
    return bpe_tokenizer()


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def arch(request):
    return request.param


@pytest.fixture(scope="session")
def models(char_tok):
    """Tiny random models keyed by (arch, dtype), built once per session."""
    cache = {}

    def get(arch: str = "gpt2", dtype: torch.dtype = torch.float32, tokenizer=None):
        tok = tokenizer or char_tok
        key = (arch, dtype, id(tok))
        if key not in cache:
            cache[key] = tiny_model(tok, arch=arch, dtype=dtype, seed=0)
        return cache[key]

    return get


@pytest.fixture(scope="session")
def saved_tiny(tmp_path_factory):
    """A random tiny GPT-2 + char tokenizer saved in Hugging Face format (a local model folder)."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), arch="gpt2", hidden=32, layers=2)
