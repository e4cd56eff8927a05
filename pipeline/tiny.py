"""Tiny models and tokenizers built offline, from code.

Tests, benchmarks and the embedded default run must not touch a hub. Everything here is made
from a config and a seed: a character-level tokenizer (exact round trip, used by the built-in
arithmetic task), a byte-level BPE tokenizer trained on a small embedded corpus (it merges across
word boundaries, like GPT-2's), and GPT-2-style (absolute positions) or Llama-style (rotary)
models of a few hundred thousand parameters.
"""

from __future__ import annotations

import string

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
UNK = "<unk>"

# A small ChatML template that uses the tokenizer's own special tokens.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHARS = string.ascii_letters + string.digits + string.punctuation + " \n"

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! This is another text.",
    "What is 12 + 35? The answer is 47.",
    "Reinforcement learning fine-tunes language models with rewards.",
    "A policy generates responses; a scorer computes their log-probabilities.",
    "hello hello world world the the and and is is",
    "Question: how many apples? Answer: there are 3 apples.",
    "user: hi there assistant: hello, how can I help you today?",
] * 4


def _wrap(tok: Tokenizer, *, pad: bool, chat_template: str | None, bos: bool) -> PreTrainedTokenizerFast:
    kwargs = {"eos_token": EOS, "unk_token": UNK if UNK in tok.get_vocab() else None}
    if bos:
        kwargs["bos_token"] = EOS
    if pad:
        kwargs["pad_token"] = PAD
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    out.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    if chat_template is not None:
        out.chat_template = chat_template
    return out


def char_tokenizer(
    *, pad: bool = False, chat_template: str | None = None, bos: bool = False
) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: one token per character, lossless decode.

    ``pad=False`` leaves ``pad_token`` unset, as GPT-2 does (the wrapper then pads with EOS);
    ``pad=True`` adds a distinct ``<|pad|>`` token.
    """
    specials = [EOS, PAD, IM_START, IM_END, UNK]
    vocab = {t: i for i, t in enumerate(specials + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return _wrap(tok, pad=pad, chat_template=chat_template, bos=bos)


def bpe_tokenizer(
    *, vocab_size: int = 400, pad: bool = False, chat_template: str | None = None, bos: bool = False
) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style) trained on an embedded corpus; deterministic."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return _wrap(tok, pad=pad, chat_template=chat_template, bos=bos)


def tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    *,
    arch: str = "gpt2",
    hidden: int = 32,
    layers: int = 2,
    heads: int = 4,
    max_positions: int = 256,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A randomly initialised causal LM sized for ``tokenizer``, in eval mode.

    ``arch="gpt2"`` uses learned absolute positions (sensitive to ``position_ids``);
    ``arch="llama"`` uses rotary embeddings and grouped-query attention.
    """
    special = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id
        if tokenizer.bos_token_id is not None
        else tokenizer.eos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=max_positions, **special)
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        config = LlamaConfig(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=max(1, heads // 2),
            max_position_embeddings=max_positions,
            tie_word_embeddings=False,
            **special,
        )
        model = LlamaForCausalLM(config)
    else:
        raise ValueError(f"arch must be 'gpt2' or 'llama', got {arch!r}")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.to(dtype).eval()
