"""Rollout speed and log-prob agreement: Hugging Face generate vs the vLLM engine, on one model folder.

Run in the vLLM environment (``make install-vllm``)::

    .venv-vllm/bin/python scripts/bench_vllm.py --model PATH [--prompts 32] [--new-tokens 64]

``PATH`` is a Hugging Face folder, e.g. SmolLM2-135M-Instruct converted from its GGUF (``make smollm2``;
the folder is under ``~/.cache/hf-rl-pipeline/models``). Every response has exactly ``--new-tokens``
tokens (``min_new_tokens``), so tokens/s compare like for like. Log-prob differences are the engine's
behaviour log-probs minus the fp32 Hugging Face model's score-mode log-probs of the same tokens.
"""

from __future__ import annotations

import argparse
import time

import torch
from tensordict import TensorDict, lazy_stack
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.policy import TransformersWrapper
from pipeline.vllm_engine import VLLMWrapper


def chat_prompts(tokenizer, n: int) -> list[str]:
    questions = [
        f"What is {a} + {b}? Answer with a number."
        for a, b in zip(range(11, 11 + n), range(40, 40 + 3 * n, 3))
    ]
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
        )
        for q in questions
    ]


def timed(policy, td) -> tuple[float, TensorDict]:
    """One timed call, after a short warm-up call (the first call of an engine pays one-off costs)."""
    policy(td[:2].clone(), max_new_tokens=4, min_new_tokens=4)
    start = time.perf_counter()
    out = policy(td.clone())
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="a Hugging Face model folder")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", default="hf-float32,hf-bfloat16,vllm-float32,vllm-bfloat16")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # a lazy stack: both engines then return per-sample (unpadded) rows
    td = lazy_stack([TensorDict(text=t) for t in chat_prompts(tokenizer, args.prompts)])
    gen = {
        "max_new_tokens": args.new_tokens,
        "min_new_tokens": args.new_tokens,
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
    }
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    scorer = TransformersWrapper(reference, from_text=False, generate=False)
    n_tokens = args.prompts * args.new_tokens
    rows, base = [], None
    for name in args.engines.split(","):
        kind, dtype_name = name.split("-")
        dtype = getattr(torch, dtype_name)
        start = time.perf_counter()
        if kind == "hf":
            model = (
                reference
                if dtype == torch.float32
                else AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
            )
            policy = TransformersWrapper(
                model, tokenizer=tokenizer, generate_kwargs=gen, return_log_probs=True
            )
        else:
            policy = VLLMWrapper(args.model, tokenizer=tokenizer, generate_kwargs=gen, dtype=dtype)
        load = time.perf_counter() - start
        with torch.inference_mode():
            seconds, out = timed(policy, td)
            scored = scorer(out.select("tokens", "tokens_response")).get("log_probs", as_list=True)
        diff = torch.cat([(a - b).abs() for a, b in zip(out.get("log_probs", as_list=True), scored)])
        sync, after = float("nan"), float("nan")
        if kind == "vllm":  # the trainer's (unchanged) weights pushed back: the sync path itself is exact
            sync = policy.sync_weights(reference)
            after = policy.verify_sync(reference, atol=None)["max_abs_diff"]
        rate = n_tokens / seconds
        base = base or rate
        rows.append((name, rate, rate / base, float(diff.max()), float(diff.mean()), load, sync, after))
        del policy
    print(f"{args.prompts} prompts x {args.new_tokens} tokens, {args.threads} threads, model {args.model}")
    print(
        f"{'engine':<16}{'tokens/s':>10}{'vs first':>10}{'max|dlp|':>11}{'mean|dlp|':>11}{'start s':>9}{'sync s':>8}"
    )
    for name, rate, rel, mx, mean, load, sync, after in rows:
        print(
            f"{name:<16}{rate:>10.0f}{rel:>10.2f}{mx:>11.2e}{mean:>11.2e}{load:>9.1f}{sync:>8.2f}{after:>21.2e}"
        )


if __name__ == "__main__":
    main()
