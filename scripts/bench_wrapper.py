"""Time and peak memory of generation with per-token log-probs: our wrapper vs the alternatives.

One run prints one table comparing, on the same batch of left-padded token prompts:

  (a) raw      ``model.generate`` (sampling, no log-probs, ``return_dict_in_generate=False``)
  (b) logits   ``model.generate(output_logits=True, return_dict_in_generate=True)`` then
               ``stack -> log_softmax -> gather``: the naive way to get log-probs
  (c) ours     ``pipeline.TransformersWrapper(from_text=False, return_log_probs=True)``
  (d) torchrl  ``torchrl.modules.llm.TransformersWrapper(input_mode="tokens", return_log_probs=True)``

The default shape is the issue's: a GPT-2-shaped model (12 layers, 768 hidden, 12 heads, vocabulary
50257) built from its config with random weights (no download), B=32 prompts of random lengths,
exactly N=64 sampled tokens each (``min_new_tokens = max_new_tokens = N``, so every method does the
same work), ``do_sample=True`` from the full distribution, the same seed before every call. All four
methods sample the same tokens; the run checks it and compares their log-probs.

Time: median over ``--repeats`` timed calls per method after one warm-up call each; the methods are
interleaved in every repeat and their order rotates between repeats, so machine drift cancels.

Memory: each method is measured in a fresh process that builds the model and the batch, makes one
warm-up call, frees it, then measures one call: ``extra peak = peak during the call - memory just
before it``. On CPU the peak is the kernel's resident-set high-water mark (``VmHWM``), reset right
before the call through ``/proc/self/clear_refs`` (exact, nothing sampled; a thread sampling
``/proc/self/statm`` every ``--sample-ms`` is the fallback), with ``malloc_trim`` before the
baseline (freed heap pages would hide new allocations) and glibc's mmap threshold fixed at its
128 KiB default (the dynamic threshold depends on the warm-up's frees). On CUDA it is
``torch.cuda.max_memory_allocated`` minus ``torch.cuda.memory_allocated`` before the call.

Processes: this one only orchestrates (standard library only). A fork server imports torch and
friends once; the timing run and each memory measurement are fresh children forked from it (they
inherit no heap, thread pool or CUDA state from a previous measurement). ``--mem-isolation
subprocess`` measures memory with new interpreters instead: ``python scripts/bench_wrapper.py
--measure-one METHOD ...`` (usable by hand; it prints one JSON line).

    python scripts/bench_wrapper.py                  # the issue's shape (about 9 minutes on 2 CPU cores)
    python scripts/bench_wrapper.py --tiny           # seconds: tiny model, B=4, 8 tokens, 1 repeat
    python scripts/bench_wrapper.py --device cuda --dtype bfloat16 --repeats 5
    python scripts/bench_wrapper.py --measure-one ours   # one memory measurement, as JSON
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from benchlib import (
    PeakMemory,
    Runner,
    alternating,
    fix_mmap_threshold,
    format_table,
    has_proc,
    median,
    offline,
    paired_ratio,
)

offline()

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerFast

METHODS = {
    "raw": "(a) raw generate",
    "logits": "(b) generate+output_logits+log_softmax",
    "ours": "(c) ours pipeline.TransformersWrapper",
    "torchrl": "(d) torchrl TransformersWrapper",
}
TARGETS = {"time": 1.05, "mem": 1.30}  # ours / raw, from the issue
EOS = "<|endoftext|>"
PRELOAD = ["__main__", "torch", "transformers", "transformers.models.gpt2.modeling_gpt2", "tokenizers",
           "tensordict", "torchrl.modules.llm", "pipeline.policy"]  # fmt: skip

FULL = {"layers": 12, "hidden": 768, "heads": 12, "vocab": 50257, "batch": 32, "new_tokens": 64,
        "prompt_len": [8, 32], "repeats": 3, "threads": 0}  # fmt: skip
TINY = {"layers": 2, "hidden": 32, "heads": 4, "vocab": 50257, "batch": 4, "new_tokens": 8,
        "prompt_len": [3, 8], "repeats": 1, "threads": 1}  # fmt: skip


# ---------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--tiny", action="store_true", help="tiny model, B=4, 8 tokens, 1 repeat, 1 thread (seconds)"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--layers", type=int, help="GPT-2 layers (12)")
    p.add_argument("--hidden", type=int, help="GPT-2 hidden size (768)")
    p.add_argument("--heads", type=int, help="GPT-2 attention heads (12)")
    p.add_argument("--vocab", type=int, help="vocabulary size (50257, GPT-2's)")
    p.add_argument("--batch", type=int, help="prompts per batch (32)")
    p.add_argument("--new-tokens", type=int, help="sampled tokens per prompt, forced (64)")
    p.add_argument("--prompt-len", type=int, nargs=2, metavar=("MIN", "MAX"), help="prompt lengths (8 32)")
    p.add_argument("--repeats", type=int, help="timed calls per method (3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op threads (0: torch's default; --tiny: 1)")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    p.add_argument("--mem-isolation", choices=["forkserver", "subprocess"], default="forkserver",
                   help="fresh process per memory measurement: fork-server child (default) or new interpreter")  # fmt: skip
    p.add_argument("--sample-ms", type=float, default=1.0, help="RSS sampling period of the fallback")
    p.add_argument("--json", type=Path, help="also write the results to this JSON file")
    p.add_argument(
        "--measure-one", choices=list(METHODS), help="measure one method's memory here, print JSON"
    )
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if not 1 <= args.prompt_len[0] <= args.prompt_len[1]:
        p.error("--prompt-len needs 1 <= MIN <= MAX")
    if min(args.repeats, args.batch, args.new_tokens, args.layers, args.hidden, args.heads) < 1:
        p.error("sizes and --repeats must be positive")
    if args.vocab < 2 or args.hidden % args.heads:
        p.error("--vocab must be >= 2 and --hidden a multiple of --heads")
    args.methods = list(dict.fromkeys(args.methods))
    return args


def to_argv(args: argparse.Namespace) -> list[str]:
    """The resolved settings as command-line arguments (re-parsed by the measuring processes)."""
    out = ["--device", args.device, "--dtype", args.dtype, "--seed", str(args.seed)]
    keys = ("layers", "hidden", "heads", "vocab", "batch", "new_tokens", "repeats", "threads", "sample_ms")
    for key in keys:
        out += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    return [*out, "--prompt-len", *map(str, args.prompt_len), "--methods", *args.methods]


# ---------------------------------------------------------------------- setup (in the measuring processes)
def gpt2_like_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``vocab_size`` ids, EOS last and padding with EOS (as GPT-2).

    Every id decodes (torchrl decodes the responses even in tokens mode), which a small BPE
    tokenizer such as ``pipeline.tiny.bpe_tokenizer()`` does not do for ids past its vocabulary.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size - 1)}
    vocab[EOS] = vocab_size - 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)


@dataclass
class Setup:
    args: argparse.Namespace
    device: torch.device
    model: torch.nn.Module
    prompts: list[torch.Tensor]  # unpadded 1-D prompts
    input_ids: torch.Tensor  # [B, L] left-padded with EOS
    attention_mask: torch.Tensor  # [B, L] long
    gen_kwargs: dict[str, Any]
    wrappers: dict[str, torch.nn.Module]


def build(args: argparse.Namespace, methods: list[str]) -> Setup:
    import warnings

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    # torchrl's _log_probs_generate calls cross_entropy(reduce=False): silence its deprecation warning.
    warnings.filterwarnings("ignore", message="size_average and reduce args will be deprecated")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch.cuda.is_available() is False")
    tokenizer = gpt2_like_tokenizer(args.vocab)
    eos = tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    config = GPT2Config(vocab_size=args.vocab, n_layer=args.layers, n_embd=args.hidden, n_head=args.heads,
                        n_positions=max(1024, args.prompt_len[1] + args.new_tokens),
                        bos_token_id=eos, eos_token_id=eos)  # fmt: skip
    model = GPT2LMHeadModel(config).to(device=device, dtype=getattr(torch, args.dtype)).eval()
    n = args.new_tokens
    # Set on the model, so that every method samples alike (torchrl drops generate kwargs it does
    # not know, such as min_new_tokens, and rejects top_k=0): the full distribution, N tokens.
    model.generation_config.update(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=n,
                                   max_new_tokens=n, pad_token_id=eos, eos_token_id=eos)  # fmt: skip
    gen_kwargs = {"do_sample": True, "max_new_tokens": n}

    g = torch.Generator().manual_seed(args.seed + 1)
    lengths = torch.randint(args.prompt_len[0], args.prompt_len[1] + 1, (args.batch,), generator=g).tolist()
    # Prompt ids avoid EOS (= pad): torchrl rebuilds masks from token values.
    prompts = [torch.randint(0, args.vocab - 1, (k,), generator=g).to(device) for k in lengths]
    width = max(lengths)
    input_ids = torch.full((args.batch, width), eos, dtype=torch.long, device=device)
    attention_mask = torch.zeros(args.batch, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p) :] = p
        attention_mask[i, width - len(p) :] = 1

    wrappers: dict[str, torch.nn.Module] = {}
    if "ours" in methods:
        from pipeline import TransformersWrapper

        # HF's own draw, so that all methods sample the same tokens (the default inverse-CDF draw is faster)
        wrappers["ours"] = TransformersWrapper(model, tokenizer=tokenizer, from_text=False, return_log_probs=True,
                                               sampler="multinomial",
                                               generate_kwargs=dict(gen_kwargs, min_new_tokens=n))  # fmt: skip
    if "torchrl" in methods:
        from torchrl.modules.llm import TransformersWrapper as TorchRLWrapper

        wrappers["torchrl"] = TorchRLWrapper(model, tokenizer=tokenizer, input_mode="tokens", generate=True,
                                             return_log_probs=True, pad_output=True,
                                             generate_kwargs=dict(gen_kwargs))  # fmt: skip
    return Setup(args, device, model, prompts, input_ids, attention_mask, gen_kwargs, wrappers)


# ---------------------------------------------------------------------- the methods
def make_input(s: Setup, method: str) -> Any:
    """A fresh input for one call (the wrappers write into theirs); built outside the measured region."""
    from tensordict import TensorDict, lazy_stack

    if method == "ours":  # the natural RL format: a lazy stack of unpadded prompts
        return lazy_stack([TensorDict({"tokens": p}, batch_size=[]) for p in s.prompts])
    if method == "torchrl":
        return TensorDict({("tokens", "prompt"): s.input_ids, "attention_mask": s.attention_mask.bool()},
                          batch_size=[len(s.prompts)])  # fmt: skip
    return None


def call(s: Setup, method: str, inp: Any) -> Any:
    """One generation of B x N tokens by ``method``: what is timed and memory-measured."""
    import torch

    with torch.no_grad():
        if method == "raw":
            return s.model.generate(input_ids=s.input_ids, attention_mask=s.attention_mask,
                                    return_dict_in_generate=False, **s.gen_kwargs)  # fmt: skip
        if method == "logits":
            out = s.model.generate(input_ids=s.input_ids, attention_mask=s.attention_mask,
                                   output_logits=True, return_dict_in_generate=True, **s.gen_kwargs)  # fmt: skip
            tokens = out.sequences[:, s.input_ids.shape[1] :]
            logits = torch.stack(out.logits, 1)  # [B, N, V]
            log_probs = logits.float().log_softmax(-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            return tokens, log_probs
        return s.wrappers[method](inp)


def tokens_and_log_probs(s: Setup, method: str, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``[B, N]`` sampled tokens and their log-probs (``None`` for raw) from a method's output."""
    if method == "raw":
        return out[:, s.input_ids.shape[1] :], None
    if method == "logits":
        return out
    if method == "ours":
        return (out.get("tokens_response", as_padded_tensor=True, padding_side="right"),
                out.get("log_probs", as_padded_tensor=True, padding_side="right"))  # fmt: skip
    return (out.get(("tokens", "response"), as_padded_tensor=True),
            out.get(("log_probs", "response"), as_padded_tensor=True))  # fmt: skip


def sync(s: Setup) -> None:
    import torch

    if s.device.type == "cuda":
        torch.cuda.synchronize(s.device)


def seeded(s: Setup) -> None:
    import torch

    torch.manual_seed(s.args.seed)  # also seeds every CUDA device


# ---------------------------------------------------------------------- memory
def measure_one(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """Extra peak memory of one call of ``method``, measured in this process (a fresh one)."""
    fix_mmap_threshold()  # before any allocation of the model: every tensor is allocated alike
    s = build(args, [method])
    seeded(s)
    out = call(s, method, make_input(s, method))  # warm-up: one-time allocations happen here
    sync(s)
    del out
    inp = make_input(s, method)
    seeded(s)
    result: dict[str, Any] = {"method": method}
    if s.device.type != "cuda" and not has_proc():
        return {**result, "how": "not measured (no /proc)", "extra_peak_mb": None, "kept_after_mb": None}
    with PeakMemory(args.device, args.sample_ms) as mem:
        out = call(s, method, inp)
    result.update(how=mem.describe(), before_mb=mem.baseline_mb, extra_peak_mb=mem.peak_delta_mb,
                  kept_after_mb=mem.held_mb())  # fmt: skip
    del out
    return result


# ---------------------------------------------------------------------- timing
def time_all(args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up and interleaved timed calls of every method in this process; correctness checks."""
    import torch

    methods = args.methods
    s = build(args, methods)
    warm = {}
    for m in methods:  # warm-up, kept for the correctness check
        seeded(s)
        out = call(s, m, make_input(s, m))
        sync(s)
        warm[m] = tokens_and_log_probs(s, m, out)
        del out
    times: dict[str, list[float]] = {m: [] for m in methods}
    for _, m in alternating(methods, args.repeats):  # the order rotates every repeat: drift cancels
        inp = make_input(s, m)
        seeded(s)
        sync(s)
        t0 = time.perf_counter()
        out = call(s, m, inp)
        sync(s)
        times[m].append(time.perf_counter() - t0)
        del out, inp
    return {"times": times, "checks": check(warm, args.new_tokens), "threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in s.model.parameters())}  # fmt: skip


def check(warm: dict[str, Any], n: int) -> list[str]:
    """Do all methods sample the same tokens, and do their log-probs agree with (b)'s?"""
    import torch

    ref = next(iter(warm.values()))[0].cpu()
    same = all(t.shape == ref.shape and torch.equal(t.cpu(), ref) for t, _ in warm.values())
    shapes = sorted({tuple(t.shape) for t, _ in warm.values()})
    lines = [f"same sampled tokens in all methods: {'yes' if same else 'NO'} (shapes {shapes}, N={n})"]
    if "logits" not in warm or not same:
        return lines
    ref_lp = warm["logits"][1].float().cpu()
    for m in ("ours", "torchrl"):
        if m in warm:
            lp = warm[m][1].float().cpu()
            diff = (lp - ref_lp).abs()
            line = f"max |log_prob({m}) - log_prob(logits)| = {diff.max().item():.2e}"
            if m == "torchrl" and lp.shape[1] > 1:
                line += (f" (tokens 2..N: {diff[:, 1:].max().item():.2e}; torchrl returns "
                         f"{lp[:, 0].abs().max().item():g} for every first response token: "
                         "`td['log_probs'][:, 0] = 0` in its _log_probs_generate)")  # fmt: skip
            lines.append(line)
    return lines


# ---------------------------------------------------------------------- orchestration
def _measure_subprocess(argv: list[str], method: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--measure-one", method],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"--measure-one {method} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Memory measurements (one fresh process each), then the timing run (a fresh process)."""
    runner = Runner(PRELOAD)
    mem: dict[str, dict[str, Any]] = {}
    for m in [] if args.no_memory else args.methods:
        if args.mem_isolation == "subprocess":
            mem[m] = _measure_subprocess(to_argv(args), m)
        else:
            mem[m] = runner(measure_one, args, m)
    return runner(time_all, args), mem


def report(
    args: argparse.Namespace, timing: dict[str, Any], mem: dict[str, dict[str, Any]]
) -> tuple[str, dict]:
    times = timing["times"]
    med = {m: median(v) for m, v in times.items()}
    base_t = med.get("raw")
    base_m = mem["raw"]["extra_peak_mb"] if "raw" in mem else None
    # Paired: median over repeats of (this method's time / raw's time in the same repeat), which
    # cancels drift slower than one repeat; shown next to the ratio of medians.
    paired = {m: paired_ratio(v, times["raw"]) if "raw" in times else None for m, v in times.items()}
    rows = [("method", "median s", "time/raw", "paired", "extra peak MB", "mem/raw",
             "issue targets for ours (ratio to raw)")]  # fmt: skip
    verdict: dict[str, bool] = {}
    for m in times:
        t_ratio = med[m] / base_t if base_t else None
        extra = mem[m]["extra_peak_mb"] if m in mem else None
        m_ratio = extra / base_m if extra is not None and base_m else None
        note = []
        if m == "ours" and t_ratio is not None:
            verdict["time"] = t_ratio <= TARGETS["time"]
            note.append(f"time <= {TARGETS['time']:.2f}x: {'PASS' if verdict['time'] else 'FAIL'}")
        if m == "ours" and m_ratio is not None:
            verdict["mem"] = m_ratio <= TARGETS["mem"]
            note.append(f"mem <= {TARGETS['mem']:.2f}x: {'PASS' if verdict['mem'] else 'FAIL'}")
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        rows.append((METHODS[m], f"{med[m]:.3f}", fmt(t_ratio, ".3f"), fmt(paired[m], ".3f"), fmt(extra, ".1f"), fmt(m_ratio, ".3f"),
                     "; ".join(note)))  # fmt: skip
    lines = [
        f"bench_wrapper: GPT-2-shaped model ({args.layers} layers, {args.hidden} hidden, {args.heads} heads, "
        f"vocab {args.vocab}, {timing['params'] / 1e6:.1f}M params, random weights), {args.dtype} on "
        f"{args.device}, torch threads {timing['threads']}",
        f"B={args.batch} prompts (lengths {args.prompt_len[0]}..{args.prompt_len[1]}, left-padded), "
        f"N={args.new_tokens} sampled tokens each (forced), do_sample from the full distribution, seed "
        f"{args.seed}; time: median of {args.repeats} interleaved calls after a warm-up "
        "(paired: median over repeats of time / raw's time in the same repeat)",
    ]
    if mem:
        how = ", ".join(sorted({r["how"] for r in mem.values()}))
        lines.append(f"extra peak memory: peak during one call - memory just before it (after a warm-up), "
                     f"a fresh process per method ({args.mem_isolation}), {how}")  # fmt: skip
    lines.append("")
    lines += format_table(rows, "<>>>>><")
    lines.append("")
    lines += timing["checks"]
    lines.append(
        "per-call times (s): "
        + "; ".join(f"{m}: " + ", ".join(f"{t:.3f}" for t in v) for m, v in times.items())
    )
    if mem:
        lines.append("memory still held after the call, output alive (MB): "
                     + ", ".join(f"{m}: {r['kept_after_mb']:.1f}" for m, r in mem.items() if r["kept_after_mb"] is not None))  # fmt: skip
    if verdict:
        lines.append(
            "ours vs the issue's targets: "
            + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in verdict.items())
        )
    return "\n".join(lines), {"median_s": med, "verdict": verdict}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.measure_one:
        print(json.dumps(measure_one(args, args.measure_one)))
        return 0
    t0 = time.perf_counter()
    timing, mem = run(args)
    text, summary = report(args, timing, mem)
    print(text)
    print(f"total wall time {time.perf_counter() - t0:.0f} s")
    if args.json:
        payload = {
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "memory": mem,
            **timing,
            **summary,
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
