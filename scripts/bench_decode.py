"""Where the time of a rollout goes: the model's forward calls, Hugging Face's decoding loop around
them, and our wrapper around ``generate``; and the floor of a decoding step (its matrix products).

One run, one process, the measurements interleaved over ``--repeats`` (medians). It times our
``TransformersWrapper`` generating ``--prompts x --group`` samples of exactly ``--length`` tokens the
way the recipe does (fused GELU, shared prompt cache, inverse-CDF sampling, log-probs), and splits
each call with hooks:

- model forward: the model's own forward calls inside ``generate`` (``register_forward_pre_hook`` /
  ``register_forward_hook``), one per new token;
- of which linear layers: every ``nn.Linear`` / GPT-2 ``Conv1D`` of one decoding step run on its own,
  on inputs of the step's shape: the matrix-product floor of a step, times the number of steps;
- generate's loop: ``model.generate`` minus its forward calls (inputs and cache bookkeeping, logits
  processors, the sampler, stopping criteria);
- wrapper: the wrapper call minus ``generate`` (tokenizing, the shared prompt prefill, the outputs).

``--compile`` adds Hugging Face's static cache with ``torch.compile`` of the decoding step
(``cache_implementation="static"`` and a ``CompileConfig``, on CPU too) against its default
``DynamicCache`` in eager mode, both greedy so they emit the same tokens; and our wrapper with
``generate.compile=true`` (:mod:`pipeline.decode`) against its ``generate`` path, sampling as the recipe
does. It needs a C++ compiler.

    python scripts/bench_decode.py                    # toy GPT-2 (4 x 128, 101-token vocabulary), 8 x 8 x 32
    python scripts/bench_decode.py --compile          # + static cache and torch.compile (about 1 min more)
    python scripts/bench_decode.py --model smollm2 --prompts 2 --length 64   # SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from benchlib import alternating, format_table, median, offline, set_threads

offline()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--group", type=int, default=8, help="samples per prompt, G")
    p.add_argument("--length", type=int, default=32, help="tokens per sample (forced)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also Hugging Face's static cache + torch.compile")
    return p.parse_args(argv)


def load(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """The model (eval mode, as the recipe loads it), its tokenizer, and ``--prompts`` prompt texts."""
    from transformers.activations import ACT2FN

    if args.model == "smollm2":
        from omegaconf import OmegaConf
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from pipeline.models import resolve_path

        conf = OmegaConf.load("conf/model/smollm2_135m.yaml")
        path = resolve_path(conf.name_or_path)
        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        chat = [
            [{"role": "user", "content": f"What is {10 + i} plus {27 + 3 * i}?"}] for i in range(args.prompts)
        ]
        texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chat]
        return model.eval(), tok, texts
    from pipeline.tiny import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model = tiny_model(
        tok, arch="gpt2", hidden=128, layers=4, heads=4, max_positions=64 + args.length, seed=0
    )
    for block in model.transformer.h:  # model.fused_activation: gelu_new as one kernel, as the recipe runs it
        block.mlp.act = ACT2FN["gelu_pytorch_tanh"]
    return model.eval(), tok, [f"{10 + i}+{27 + 3 * i}=" for i in range(args.prompts)]


def linear_floor(model: Any, step: Callable[[], Any], repeats: int) -> float:
    """Seconds of one decoding step's linear layers run on their own (inputs of the step's shapes)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    calls: list[tuple[Any, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda mod, a, out: calls.append((mod, a[0].detach().clone())))
             for m in model.modules() if isinstance(m, (torch.nn.Linear, Conv1D))]  # fmt: skip
    try:
        step()
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():

        def run() -> None:
            for mod, x in calls:
                mod(x)

        run()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
    return median(times)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from tensordict import TensorDict

    from pipeline import TransformersWrapper
    from pipeline.logprobs import pad_left

    set_threads(args.threads)
    model, tok, texts = load(args)
    n = args.length
    kwargs = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": True, "top_k": 0}
    policy = TransformersWrapper(model, tokenizer=tok, return_log_probs=True, num_samples=args.group,
                                 generate_kwargs=kwargs, chat_template_name=None)  # fmt: skip
    batch = TensorDict(text=texts, batch_size=[len(texts)])

    forward: list[float] = []
    starts: list[float] = []
    hooks = [model.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter())),
             model.register_forward_hook(lambda m, a, out: forward.append(time.perf_counter() - starts[-1]))]  # fmt: skip
    generate = model.generate
    spans: dict[str, list[float]] = {"wrapper": [], "generate": [], "forward": []}

    def timed_generate(*a: Any, **kw: Any) -> Any:
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        spans["generate"].append(time.perf_counter() - t0)
        return out

    model.generate = timed_generate
    policy(batch.clone())  # warm-up
    for _ in range(args.repeats):
        forward.clear()
        t0 = time.perf_counter()
        policy(batch.clone())
        spans["wrapper"].append(time.perf_counter() - t0)
        spans["forward"].append(sum(forward))
        calls = len(forward)
    del model.generate
    for hook in hooks:
        hook.remove()

    prompts = [torch.tensor(tok(t)["input_ids"]) for t in texts for _ in range(args.group)]
    ids, mask = pad_left(prompts, 0)

    def decode_step() -> None:  # the linear layers of a decoding step see [rows, 1, features]
        with torch.no_grad():
            model(ids[:, -1:])

    floor = linear_floor(model, decode_step, args.repeats) * calls
    m = {k: median(v) for k, v in spans.items()}
    rows = [
        ("wrapper call (what the recipe's collect phase runs)", m["wrapper"]),
        ("  model forward calls", m["forward"]),
        ("    of which linear layers alone (the matrix-product floor)", floor),
        ("    rest of the model call (attention, norms, activation, Python)", m["forward"] - floor),
        ("  generate's loop (inputs, cache, processors, sampler, stopping)", m["generate"] - m["forward"]),
        ("  wrapper around generate (tokens, shared prefix, outputs)", m["wrapper"] - m["generate"]),
    ]
    header = ("part", "ms / generation", "ms / token step", "share")
    cells = [
        (name, f"{t * 1e3:.1f}", f"{t / calls * 1e3:.3f}", f"{t / m['wrapper']:.2f}") for name, t in rows
    ]
    print(f"{args.model}: {len(texts)} prompts x G={args.group} = {len(prompts)} rows x {n} tokens, "
          f"{calls} forward calls per generation, {torch.get_num_threads()} threads, median of {args.repeats}\n")  # fmt: skip
    print("\n".join(format_table([header, *cells], "<>>>")))
    if args.compile:
        print("\n" + "\n".join(compiled(model, ids, mask, n, args.repeats)))
        print(ours_compiled(model, tok, batch, args.group, kwargs, args.repeats))
    return 0


def ours_compiled(model: Any, tok: Any, batch: Any, group: int, kwargs: dict[str, Any], repeats: int) -> str:
    """Our wrapper, sampling with log-probs as the recipe does: ``model.generate`` against the compiled
    decoding loop of ``generate.compile=true`` (:mod:`pipeline.decode`); a seed gives both the same tokens."""
    import torch

    from pipeline import TransformersWrapper

    args = {"tokenizer": tok, "return_log_probs": True, "num_samples": group, "generate_kwargs": kwargs,
            "chat_template_name": None}  # fmt: skip
    policies = {"generate": TransformersWrapper(model, **args),
                "compiled": TransformersWrapper(model, compile_decode=True, **args)}  # fmt: skip
    outs = {}
    t0 = time.perf_counter()
    for name, policy in policies.items():
        torch.manual_seed(0)
        outs[name] = policy(batch.clone())["tokens_response"]
    first = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in policies}
    for _, name in alternating(list(policies), repeats):
        t0 = time.perf_counter()
        policies[name](batch.clone())
        times[name].append(time.perf_counter() - t0)
    g, c = median(times["generate"]), median(times["compiled"])
    rows = (outs["generate"] == outs["compiled"]).reshape(-1, outs["generate"].shape[-1]).all(-1)
    same = int(rows.sum())
    return (
        f"our wrapper, sampled with log-probs: generate {g * 1e3:.1f} ms; compiled decoding (generate.compile) "
        f"{c * 1e3:.1f} ms ({c / g:.3f}x); first calls with compilation {first:.1f} s; rows with the same tokens "
        f"for a seed: {same} of {len(rows)} (a float-rounding difference at a bin edge changes a draw)"
    )


def compiled(model: Any, ids: Any, mask: Any, n: int, repeats: int) -> list[str]:
    """Hugging Face ``generate`` (greedy) with its default cache in eager mode against its static cache
    with a compiled decoding step; the same tokens from both."""
    import torch
    from transformers import StaticCache
    from transformers.generation.configuration_utils import CompileConfig

    from pipeline.prefix import cache_kwarg

    config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
    config._compile_all_devices = True  # transformers compiles on CUDA only unless told
    common = {"attention_mask": mask.long(), "do_sample": False, "max_new_tokens": n,
              "min_new_tokens": n, "pad_token_id": 0}  # fmt: skip

    def eager() -> Any:
        return model.generate(ids, **common)

    def static() -> Any:
        cache = StaticCache(config=model.config, max_cache_len=ids.shape[1] + n)
        return model.generate(ids, **common, **{cache_kwarg(model): cache}, compile_config=config)

    t0 = time.perf_counter()
    same = torch.equal(eager(), static())
    first = time.perf_counter() - t0
    times: dict[str, list[float]] = {"eager": [], "static": []}
    runs = {"eager": eager, "static": static}
    for _, name in alternating(list(runs), repeats):
        t0 = time.perf_counter()
        runs[name]()
        times[name].append(time.perf_counter() - t0)
    e, s = median(times["eager"]), median(times["static"])
    return [
        f"Hugging Face generate, greedy: DynamicCache eager {e * 1e3:.1f} ms; static cache + torch.compile "
        f"{s * 1e3:.1f} ms ({s / e:.3f}x); first calls with compilation {first:.1f} s; same tokens: {same}",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
