"""GRPO step time and peak memory: our loop (``pipeline.recipe.GRPORecipe``) against TRL's ``GRPOTrainer``.

One invocation runs the same GRPO work through both trainers and prints one table:

    side, median step time, ratio ours/TRL, peak memory MB

then the target (ours/TRL step time <= 0.7 at equal work, our peak memory <= TRL's) with PASS/FAIL, a
phase breakdown of a step on each side, the settings that had to be aligned, and (unless
``--no-scaling``) our step time and peak memory over prompts per step x completion length with a
least-squares fit ``t = a + b * prompts * length``.

Equal work. Both sides load one tiny GPT-2-style model written to a temporary folder (random weights,
the character tokenizer of ``pipeline.tiny``, embedding and LM head padded to ``--vocab`` rows: 32000
by default, a real tokenizer's size, since the vocabulary-sized work is a large part of a small model's
step; ``--vocab 0`` keeps the 101-token toy vocabulary; no download), train on the same in-memory prompts
("ab+cd=", all the same length) with the same reward function, group size G, number of optimizer
steps and KL coefficient, and sample exactly ``--length`` tokens per completion
(``min_new_tokens == max_new_tokens``: EOS is suppressed, every completion has the same length; the
run checks it). One generation batch = one optimizer step on both sides, the whole batch in one
forward/backward. Every TRL default that changes the work or the math is set to ours and listed
under "aligned:" in the output (read from TRL 1.16's ``grpo_trainer.py`` / ``grpo_config.py``).

Time: each side runs in a fresh process, ``--steps`` optimizer steps; the first step (warm-up) is
dropped. The sides alternate (ours, TRL, TRL, ours, ours, TRL, ...: the order flips every repeat)
over ``--repeats`` repetitions so machine drift cancels; the median is over all kept steps of a side.
Ours: ``perf/step_time`` of ``<run_dir>/metrics.jsonl`` (collect + rewards + reference log-probs +
update + LR scheduler). TRL: wall time from ``on_step_begin`` to ``on_step_end`` of a callback
(generation + rewards + reference log-probs + loss + backward + clip + optimizer + scheduler).

Memory: on CPU, the peak RSS during ``train()`` minus the RSS right after setup (model, reference
model and data loaded), from a thread reading ``/proc/self/statm`` every ``--sample-ms`` and the
kernel's high-water mark ``VmHWM`` reset through ``/proc/self/clear_refs`` when available (the larger
of the two). On CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` after setup. The
reported value is the median over the repeats of a side.

Processes: this one only orchestrates (standard library). A fork server imports torch and
transformers once; every measurement is a fresh child forked from it that imports its own side
(``pipeline`` or ``trl``).

    python scripts/bench_grpo.py                      # bench + scaling, the default sizes (< 10 min, 2 cores)
    python scripts/bench_grpo.py --no-scaling         # the side-by-side table only
    python scripts/bench_grpo.py --scaling            # our scaling table only
    python scripts/bench_grpo.py --tiny               # seconds: the smoke preset (tests)
    python scripts/bench_grpo.py --only ours          # without TRL installed (pip install -e '.[bench]')
    python scripts/bench_grpo.py --no-scaling --profile 20   # + torch.profiler top-20 ops of each side
    python scripts/bench_grpo.py --device cuda --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import gc
import io
import json
import multiprocessing
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable without `pip install -e .`

TARGET_TIME = 0.7  # ours / TRL median step time, at equal work
PRELOAD = ["__main__", "torch", "transformers", "transformers.models.gpt2.modeling_gpt2", "tokenizers",
           "safetensors.torch", "numpy"]  # fmt: skip

# vocab 32000 (Llama's): real tokenizers have 32k-150k tokens, and the vocabulary-sized work (LM head,
# log-softmax, sampling) is a large share of a small model's step; --vocab 0 keeps the 101-token toy vocabulary.
FULL = {"hidden": 128, "layers": 4, "heads": 4, "vocab": 32000, "prompts": 8, "group": 8, "length": 32, "steps": 6,
        "repeats": 2, "scaling_prompts": [4, 8, 16], "scaling_lengths": [8, 16, 32], "scaling_steps": 3}  # fmt: skip
TINY = {"hidden": 32, "layers": 2, "heads": 4, "vocab": 0, "prompts": 2, "group": 2, "length": 4, "steps": 3,
        "repeats": 1, "scaling_prompts": [2, 4], "scaling_lengths": [4, 8], "scaling_steps": 2}  # fmt: skip


# ---------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="smoke preset: a few seconds per measurement")
    p.add_argument("--scaling", action="store_true", help="only the scaling table (our loop)")
    p.add_argument("--no-scaling", action="store_true", help="only the side-by-side table")
    p.add_argument("--only", choices=["both", "ours", "trl"], default="both", help="sides to run (both)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--steps", type=int, help="optimizer steps per run, the first one is warm-up (6)")
    p.add_argument("--prompts", type=int, help="prompts per step (8)")
    p.add_argument("--group", type=int, help="completions per prompt, G (8)")
    p.add_argument("--length", type=int, help="tokens per completion, forced (32)")
    p.add_argument("--repeats", type=int, help="runs per side, alternating (2)")
    p.add_argument("--kl", type=float, default=0.02, help="KL coefficient: TRL beta == our algo.kl_coef")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate of both sides")
    p.add_argument("--hidden", type=int, help="GPT-2 hidden size (128)")
    p.add_argument("--layers", type=int, help="GPT-2 layers (4)")
    p.add_argument("--heads", type=int, help="GPT-2 attention heads (4)")
    p.add_argument("--vocab", type=int,
                   help="model vocabulary size (32000; 0: the character tokenizer's 101); larger sizes pad the "
                   "embedding and LM head, as real tokenizers (32k-150k) do")  # fmt: skip
    p.add_argument("--scaling-prompts", type=int, nargs="+", help="prompts per step of the scaling grid")
    p.add_argument("--scaling-lengths", type=int, nargs="+", help="completion lengths of the scaling grid")
    p.add_argument("--scaling-steps", type=int, help="steps per scaling point, the first is warm-up (3)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads in every run (0: default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-ms", type=float, default=2.0, help="RSS sampling period (2 ms)")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="also run each side once under torch.profiler (steps 2..) and print its top ROWS ops",
    )
    p.add_argument("--json", type=Path, help="also write all results to this JSON file")
    args = p.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.scaling and args.no_scaling:
        p.error("--scaling and --no-scaling exclude each other")
    if args.steps < 2 or args.scaling_steps < 2:
        p.error("--steps and --scaling-steps must be >= 2 (the first step is warm-up)")
    if min(args.prompts, args.repeats, args.length, *args.scaling_prompts, *args.scaling_lengths) < 1:
        p.error("sizes must be >= 1")
    if args.group < 2:
        p.error("--group must be >= 2 (group-relative advantages)")
    return args


# ---------------------------------------------------------------------- shared work
def arithmetic_prompts(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` distinct "ab+cd=" prompts (two-digit operands: every prompt has 6 tokens) and answers."""
    import random

    rng = random.Random(seed)
    pairs = rng.sample([(a, b) for a in range(10, 100) for b in range(10, 100)], n)
    return [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in pairs]


def reward_values(completions: list[str], answers: list[str]) -> list[float]:
    """The reward of both sides: 1 for a completion that starts with the answer, plus 0.5 x its digit share.

    The digit share varies even for a random model, so advantages (and gradients) are not zero.
    """
    out = []
    for text, answer in zip(completions, answers, strict=True):
        digits = sum(ch.isdigit() for ch in text) / max(len(text), 1)
        out.append(float(text.strip().startswith(str(answer))) + 0.5 * digits)
    return out


def ours_reward(completions, answers, prompts=None) -> list[float]:
    """Our signature: ``fn(completions, answers, prompts, **params)``."""
    return reward_values(list(completions), list(answers))


def trl_reward(prompts, completions, completion_ids=None, answer=None, **kwargs) -> list[float]:
    """TRL's signature: dataset columns (``answer``) come as keyword arguments."""
    return reward_values(list(completions), list(answer))


def make_model(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """One random tiny GPT-2 + the character tokenizer, saved with ``save_pretrained``; both sides load it."""
    from pipeline.tiny import char_tokenizer, tiny_model

    tok = char_tokenizer()
    model = tiny_model(tok, arch="gpt2", hidden=args.hidden, layers=args.layers, heads=args.heads,
                       max_positions=max(64, 8 + max(args.length, *args.scaling_lengths)), seed=args.seed)  # fmt: skip
    if args.vocab:
        if args.vocab < len(tok):
            raise SystemExit(f"--vocab must be >= the tokenizer's {len(tok)} tokens")
        model.resize_token_embeddings(args.vocab, mean_resizing=False)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return {"params": sum(p.numel() for p in model.parameters()), "vocab": model.config.vocab_size}


def side_spec(
    args: argparse.Namespace, prompts: int, length: int, steps: int, profile: int = 0
) -> dict[str, Any]:
    return {"prompts": prompts, "group": args.group, "length": length, "steps": steps, "kl": args.kl,
            "lr": args.lr, "seed": args.seed, "device": args.device, "threads": args.threads,
            "sample_ms": args.sample_ms, "profile": profile}  # fmt: skip


# ---------------------------------------------------------------------- memory
_HWM = re.compile(r"^VmHWM:\s+(\d+) kB", re.M)


def _rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _libc() -> ctypes.CDLL | None:
    with contextlib.suppress(OSError, TypeError):
        lib = ctypes.CDLL(ctypes.util.find_library("c"))
        if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt"):
            return lib
    return None  # not glibc: measure as is


class _RssSampler(threading.Thread):
    def __init__(self, period_s: float) -> None:
        super().__init__(daemon=True)
        self.period_s, self.peak, self.stop = period_s, _rss_bytes(), threading.Event()

    def run(self) -> None:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        page = os.sysconf("SC_PAGE_SIZE")
        try:
            while not self.stop.is_set():
                self.peak = max(self.peak, int(os.pread(fd, 64, 0).split()[1]) * page)
                time.sleep(self.period_s)
        finally:
            os.close(fd)


class PeakMemory:
    """Peak memory of a block above the memory at its start (CPU: RSS; CUDA: allocated bytes)."""

    def __init__(self, device: str, sample_ms: float) -> None:
        self.device, self.sample_ms = device, sample_ms
        self.how, self.baseline_mb, self.peak_delta_mb = "", 0.0, float("nan")

    def __enter__(self) -> PeakMemory:
        import torch

        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            self.how = "torch.cuda.max_memory_allocated - allocated after setup"
        else:
            libc = _libc()
            if libc is not None:
                libc.malloc_trim(0)  # freed heap pages would hide new allocations
            self.before = _rss_bytes()
            self.exact = False
            with contextlib.suppress(OSError):  # reset the kernel's RSS high-water mark (Linux >= 4.0)
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.exact = self._hwm() <= self.before + 2**20
            self.sampler = _RssSampler(self.sample_ms / 1000)
            self.sampler.start()
            self.how = f"RSS peak - RSS after setup (/proc/self/statm every {self.sample_ms:g} ms" + (
                ", and VmHWM)" if self.exact else ")"
            )
        self.baseline_mb = self.before / 2**20
        return self

    @staticmethod
    def _hwm() -> int:
        with open("/proc/self/status") as f:
            return int(_HWM.search(f.read()).group(1)) * 1024

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            self.sampler.stop.set()
            self.sampler.join()
            peak = max(self.sampler.peak, self._hwm() if self.exact else 0)
        self.peak_delta_mb = max(0, peak - self.before) / 2**20


def _child_setup(spec: dict[str, Any]) -> None:
    # No mallopt(M_MMAP_THRESHOLD) here: a fixed threshold sends every KV-cache torch.cat of generation to
    # mmap/munmap and page faults, which doubles the generation time of both sides on CPU.
    import torch

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])


class StepClock:
    """Step start times (for the loop time per step) and, with ``profile``, torch.profiler from step 2 on."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.starts: list[float] = []
        self.rows, self.device = spec["profile"], spec["device"]
        self.profiler = None

    def step_started(self) -> None:
        self.starts.append(time.perf_counter())
        if self.rows and len(self.starts) == 2:  # the warm-up step is not profiled
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if self.device.startswith("cuda") else []
            )
            self.profiler = profile(activities=acts)
            self.profiler.start()

    def loop_times(self) -> list[float]:
        """Start-to-start intervals from step 2 on: the whole loop, logging and data loading included."""
        return [b - a for a, b in zip(self.starts[1:], self.starts[2:])]

    def profile_table(self) -> str:
        if self.profiler is None:
            return ""
        self.profiler.stop()
        key = "self_cuda_time_total" if self.device.startswith("cuda") else "self_cpu_time_total"
        return self.profiler.key_averages().table(sort_by=key, row_limit=self.rows)


# ---------------------------------------------------------------------- our side
def run_ours(spec: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """One fresh process: our GRPORecipe on the spec; step times from metrics.jsonl, peak memory of train()."""
    _child_setup(spec)
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.config import register_configs, validate
    from pipeline.recipe import GRPORecipe

    n, g, length = spec["prompts"], spec["group"], spec["length"]
    overrides = [
        f"model.name_or_path={model_dir}", f"model.device={spec['device']}", "model.dtype=float32",
        "model.gradient_checkpointing=false", "logger=none", "logger.console=false", "logger.plot=false",
        "task=jsonl", f"task.path={model_dir}/prompts.jsonl", "task.eval_fraction=0.0",
        f"generate.num_samples={g}", f"generate.max_new_tokens={length}", f"generate.min_new_tokens={length}",
        "generate.temperature=1.0", "generate.top_k=0", "generate.top_p=1.0", "generate.do_sample=true",
        "algo=grpo", f"algo.kl_coef={spec['kl']}", "algo.ppo_epochs=1", "algo.loss_agg=token_mean",
        "algo.std_normalize=true", "algo.entropy_coef=0.0", "algo.clip_eps_low=0.2", "algo.clip_eps_high=0.2",
        f"optim.lr={spec['lr']}", "optim.scheduler=constant", "optim.warmup_steps=0", "optim.weight_decay=0.0",
        "optim.max_grad_norm=1.0", f"trainer.steps={spec['steps']}", f"trainer.prompts_per_step={n}",
        "trainer.num_minibatches=1", f"trainer.micro_batch_size={n * g}", "trainer.eval_every=0",
        "trainer.completions_every=0", "trainer.save_every=0", "trainer.log_every=1", f"seed={spec['seed']}",
    ]  # fmt: skip
    if spec["threads"]:
        overrides.append(f"trainer.threads={spec['threads']}")
    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = compose("train", overrides=overrides)
    OmegaConf.set_struct(raw, False)
    raw.reward.functions = {"bench": {"_target_": f"{__name__}.ours_reward", "weight": 1.0}}
    raw.reward.accuracy = None
    cfg = validate(raw)

    class BenchRecipe(GRPORecipe):
        """No checkpoints, final model or evaluation: only the training steps are measured."""

        def setup(self):
            self.ref_times: list[float] = []
            super().setup()

        def save_checkpoint(self):
            return self.ckpt_dir

        def save_final_model(self):
            return self.run_dir

        def evaluate(self):
            return {}

        def _reference_log_probs(self, rollout, batch):
            t0 = time.perf_counter()
            out = super()._reference_log_probs(rollout, batch)
            self.ref_times.append(time.perf_counter() - t0)
            return out

    clock = StepClock(spec)
    with tempfile.TemporaryDirectory(prefix="bench-grpo-ours-") as run_dir:
        recipe = BenchRecipe(cfg, Path(run_dir))
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                recipe.setup()
            sample = recipe.task.sample

            def timed_sample(n):  # the first thing of every step
                clock.step_started()
                return sample(n)

            recipe.task.sample = timed_sample
            with PeakMemory(spec["device"], spec["sample_ms"]) as mem, contextlib.redirect_stdout(log):
                recipe.train()
            table = clock.profile_table()
        finally:
            recipe.cleanup()
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_time" in r]
    ref = recipe.ref_times or [0.0] * len(rows)
    steps = [
        {"step": r["perf/step_time"], "generate": r["perf/collect_time"], "ref": t_ref,
         "update": r["perf/update_time"]}
        for r, t_ref in zip(rows, ref)
    ]  # fmt: skip
    lengths = sorted({r["completions/len_min"] for r in rows} | {r["completions/len_max"] for r in rows})
    sizes = next((line for line in log.getvalue().splitlines() if line.startswith("[sizes]")), "")
    checks = {"dropout active": recipe.model.training, "gradient checkpointing": cfg.model.gradient_checkpointing,
              "dtype": str(next(recipe.model.parameters()).dtype)}  # fmt: skip
    return {"side": "ours", "steps": steps, "loop": clock.loop_times(), "peak_delta_mb": mem.peak_delta_mb,
            "baseline_mb": mem.baseline_mb, "mem_how": mem.how, "completion_lengths": lengths,
            "threads": torch.get_num_threads(), "sizes": sizes, "checks": checks, "profile": table}  # fmt: skip


# ---------------------------------------------------------------------- TRL's side
# Every TRL 1.16 default that changes the work or the math, set to ours (see trl/trainer/grpo_config.py,
# base_config.py and grpo_trainer.py): key -> (value, why).
TRL_ALIGNED = {
    "gradient_checkpointing": (False, "TRL default True (recomputes activations); ours off"),
    "bf16": (False, "TRL default True when fp16 is unset; ours float32"),
    "disable_dropout": (
        True,
        "TRL default False and Trainer calls model.train(), so GPT-2 dropout (0.1) "
        "would be active; ours keeps the model in eval mode (no dropout)",
    ),
    "use_bias_correction_kl": (
        False,
        "TRL default True multiplies the k3 KL by the importance ratio; ours adds the plain k3 KL",
    ),
    "loss_type": (
        "dapo",
        "TRL default 'dapo' = token sum / tokens in the batch = our loss_agg=token_mean (set explicitly)",
    ),
    "scale_rewards": (
        "group",
        "TRL default: (r - group mean) / (group std + 1e-4), unbiased std = our "
        "std_normalize=true, adv_eps=1e-4 (set explicitly)",
    ),
    "mask_truncated_completions": (
        False,
        "TRL default False, like ours (every completion is truncated here)",
    ),
    "num_iterations": (1, "= our algo.ppo_epochs=1"),
    "steps_per_generation": (
        1,
        "with gradient_accumulation_steps=1 and num_iterations=1 TRL skips its "
        "extra old-log-prob forward; ours uses the behaviour log-probs of generation",
    ),
    "gradient_accumulation_steps": (1, "one optimizer step per generation batch, like our num_minibatches=1"),
    "learning_rate": (None, "TRL default 1e-6; set to ours"),
    "lr_scheduler_type": ("constant", "Trainer default 'linear' decay; ours constant"),
    "epsilon": (0.2, "= our clip_eps_low/high (TRL default)"),
    "temperature": (1.0, "TRL default; top_k=0, top_p=1.0, min_p=None, repetition_penalty=1.0 likewise"),
    "use_vllm": (False, "plain transformers generate() on both sides"),
    "report_to": ("none", "no logging backends"),
}


def run_trl(spec: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """One fresh process: TRL's GRPOTrainer on the spec; step times from a callback, peak memory of train()."""
    _child_setup(spec)
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.disable_progress_bar()
    clock = StepClock(spec)

    n, g, length = spec["prompts"], spec["group"], spec["length"]
    rows = [json.loads(line) for line in (Path(model_dir) / "prompts.jsonl").read_text().splitlines()]
    dataset = Dataset.from_list(rows)

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step, and the phase times the wrappers below add to it."""

        def __init__(self) -> None:
            self.steps: list[dict[str, float]] = []
            self.cur: dict[str, float] = {}
            self.lengths: set[int] = set()
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            self.cur = {"generate": 0.0, "ref": 0.0, "score": 0.0, "no_grad_forwards": 0}
            clock.step_started()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            t = time.perf_counter() - self.t0
            c = self.cur
            self.steps.append({"step": t, "generate": c["generate"], "ref": c["ref"], "update": t - c["score"],
                               "no_grad_forwards": c["no_grad_forwards"]})  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench-grpo-trl-") as out_dir:
        aligned = {k: v for k, (v, _) in TRL_ALIGNED.items() if v is not None}
        config = GRPOConfig(
            output_dir=out_dir, **aligned, learning_rate=spec["lr"], beta=spec["kl"], num_generations=g,
            per_device_train_batch_size=n * g, max_completion_length=length,
            generation_kwargs={"min_new_tokens": length}, top_k=0, top_p=1.0, max_steps=spec["steps"],
            use_cpu=not spec["device"].startswith("cuda"), fp16=False, warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, seed=spec["seed"],
            save_strategy="no", eval_strategy="no", logging_steps=10**9, disable_tqdm=True,
            log_completions=False, dataloader_num_workers=0,
        )  # fmt: skip
        timer = StepTimer()
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            trainer = GRPOTrainer(model=model_dir, reward_funcs=trl_reward, args=config, train_dataset=dataset,
                                  processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[timer])  # fmt: skip

        def timed(fn, phase):
            def wrapper(*a, **kw):
                t0 = time.perf_counter()
                out = fn(*a, **kw)
                name = phase(out) if callable(phase) else phase
                if name is not None:
                    timer.cur[name] += time.perf_counter() - t0
                    if name == "ref":
                        timer.cur["no_grad_forwards"] += 1
                    if name == "generate":
                        timer.lengths.update(len(ids) for ids in out[0])
                return out

            return wrapper

        # generation; log-prob forwards without grad (reference; an old-log-prob pass would count twice);
        # the whole generate-and-score phase (the rest of the step is loss, backward and optimizer)
        trainer._generate_single_turn = timed(trainer._generate_single_turn, "generate")
        trainer._get_per_token_logps_and_entropies = timed(
            trainer._get_per_token_logps_and_entropies, lambda out: None if torch.is_grad_enabled() else "ref"
        )
        trainer._generate_and_score_completions = timed(trainer._generate_and_score_completions, "score")
        model = trainer.model
        checks = {"dropout active": any(m.p > 0 for m in model.modules() if isinstance(m, torch.nn.Dropout)),
                  "gradient checkpointing": bool(getattr(model, "gradient_checkpointing", False)
                                                 or any(getattr(m, "gradient_checkpointing", False)
                                                        for m in model.modules())),
                  "dtype": str(next(model.parameters()).dtype)}  # fmt: skip
        with PeakMemory(spec["device"], spec["sample_ms"]) as mem, contextlib.redirect_stdout(log):
            trainer.train()
        table = clock.profile_table()
    steps = timer.steps
    per_step = 1 if spec["kl"] > 0 else 0  # reference forwards expected per step
    extra = any(st.pop("no_grad_forwards") > per_step for st in steps)
    return {"side": "trl", "steps": steps, "loop": clock.loop_times(), "peak_delta_mb": mem.peak_delta_mb,
            "baseline_mb": mem.baseline_mb, "mem_how": mem.how, "completion_lengths": sorted(timer.lengths),
            "threads": torch.get_num_threads(), "optim": getattr(config.optim, "value", str(config.optim)),
            "extra_no_grad_forwards": extra, "checks": checks, "profile": table}  # fmt: skip


# ---------------------------------------------------------------------- orchestration
RUNNERS = {"ours": "run_ours", "trl": "run_trl"}


def _in_child(fn_name: str, *rest: Any) -> Any:
    return globals()[fn_name](*rest)


def _model_in_child(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    info = make_model(args, Path(folder))
    n = max(256, args.steps * args.prompts, args.scaling_steps * max(args.scaling_prompts))
    rows = arithmetic_prompts(n, args.seed)
    (Path(folder) / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return info


class Runner:
    """Fresh child processes forked from a fork server that has imported torch and transformers once."""

    def __init__(self) -> None:
        start = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        self.ctx = multiprocessing.get_context(start)
        if start == "forkserver":
            self.ctx.set_forkserver_preload(PRELOAD)

    def __call__(self, fn_name: str, *rest: Any) -> Any:
        with ProcessPoolExecutor(max_workers=1, mp_context=self.ctx) as pool:  # one task: a fresh process
            return pool.submit(_in_child, fn_name, *rest).result()


def trl_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets", "accelerate"))


def bench(args: argparse.Namespace, run: Runner, model_dir: str, sides: list[str]) -> dict[str, Any]:
    spec = side_spec(args, args.prompts, args.length, args.steps)
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r in range(args.repeats):
        order = sides if r % 2 == 0 else sides[::-1]  # ours, TRL, TRL, ours, ...: drift cancels
        for side in order:
            t0 = time.perf_counter()
            res = run(RUNNERS[side], spec, model_dir)
            res["wall_s"] = time.perf_counter() - t0
            results[side].append(res)
            print(f"  repeat {r + 1}/{args.repeats} {side:4s}: median step "
                  f"{statistics.median(s['step'] for s in res['steps'][1:]):.4f} s, peak +{res['peak_delta_mb']:.1f} MB "
                  f"({res['wall_s']:.0f} s with start-up)", flush=True)  # fmt: skip
    profiles = {}
    if args.profile:
        for side in sides:
            print(f"  profile {side} (torch.profiler, steps 2..{args.steps})", flush=True)
            profiles[side] = run(RUNNERS[side], {**spec, "profile": args.profile}, model_dir)["profile"]
    return {"spec": spec, "results": results, "profiles": profiles}


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    kept = [s for res in runs for s in res["steps"][1:]]  # the first step of every run is warm-up
    out: dict[str, Any] = {"step": _median([s["step"] for s in kept])}
    out["q1"], out["q3"] = _quartiles([s["step"] for s in kept])
    # the breakdown uses means, so that its columns add up to the mean step
    for k in ("step", "generate", "ref", "update"):
        out[f"mean_{k}"] = statistics.fmean(s[k] for s in kept) if kept else float("nan")
    out["mean_other"] = out["mean_step"] - out["mean_generate"] - out["mean_ref"] - out["mean_update"]
    out["loop"] = _median([t for res in runs for t in res.get("loop", [])])
    peaks = [res["peak_delta_mb"] for res in runs]
    out["peak_mb"], out["peak_min"], out["peak_max"] = _median(peaks), min(peaks), max(peaks)
    out["n_steps"] = len(kept)
    out["lengths"] = sorted({n for res in runs for n in res["completion_lengths"]})
    return out


def report_bench(args: argparse.Namespace, data: dict[str, Any], info: dict[str, Any]) -> list[str]:
    res = data["results"]
    summ = {side: summarize(runs) for side, runs in res.items()}
    spec = data["spec"]
    seqs = spec["prompts"] * spec["group"]
    first = {side: runs[0] for side, runs in res.items()}
    any_run = next(iter(first.values()))
    lines = [
        "",
        f"GRPO step, ours vs TRL: GPT-2 {args.layers} layers x {args.hidden} hidden ({info['params']:,} params, "
        f"vocab {info['vocab']}), {spec['prompts']} prompts x G={spec['group']} = {seqs} sequences x "
        f"{spec['length']} tokens/step, kl {spec['kl']:g}, {spec['steps']} steps x {args.repeats} run(s) per side "
        f"(first step of each run dropped), device {args.device}, {any_run['threads']} torch threads",
        "",
        f"{'side':<6}{'median step s':>15}{'ours/TRL':>10}{'peak MB':>10}{'step IQR s':>19}{'peak range MB':>17}"
        f"{'loop s/step':>13}",
    ]  # fmt: skip
    ratio = summ["ours"]["step"] / summ["trl"]["step"] if {"ours", "trl"} <= set(summ) else None
    for side, s in summ.items():
        cell = "1.000" if side == "trl" else (f"{ratio:.3f}" if ratio is not None else "-")
        iqr = f"{s['q1']:.4f}-{s['q3']:.4f}"
        peaks = f"{s['peak_min']:.1f}-{s['peak_max']:.1f}"
        lines.append(
            f"{side:<6}{s['step']:>15.4f}{cell:>10}{s['peak_mb']:>10.1f}{iqr:>19}{peaks:>17}{s['loop']:>13.4f}"
        )
    lines.append(
        "step s: ours perf/step_time (metrics.jsonl); TRL on_step_begin -> on_step_end. loop s/step: step start to "
        "next step start (logging, data loading included). peak MB: "
        + any_run["mem_how"]
        + ", median over runs"
    )
    if ratio is not None:
        t_ok = ratio <= TARGET_TIME
        m_ok = summ["ours"]["peak_mb"] <= summ["trl"]["peak_mb"]
        lines.append(f"target: ours/TRL step time <= {TARGET_TIME}: {'PASS' if t_ok else 'FAIL'} ({ratio:.3f}); "
                     f"our peak memory <= TRL's: {'PASS' if m_ok else 'FAIL'} "
                     f"({summ['ours']['peak_mb']:.1f} vs {summ['trl']['peak_mb']:.1f} MB)")  # fmt: skip
    else:
        lines.append(f"target: ours/TRL step time <= {TARGET_TIME}, our peak memory <= TRL's: not measured "
                     "(one side only)")  # fmt: skip
    lines += ["", "step breakdown (mean s over the kept steps; columns add up to the mean step): generate = "
              "sampling; ref = reference log-probs; update = ours: forward + backward + optimizer; TRL: step - "
              "generate-and-score (loss, backward, clip, optimizer, scheduler); other = the rest (rewards, "
              "advantages, padding, metrics)",
              f"{'side':<6}{'step':>9}{'generate':>10}{'ref':>9}{'update':>9}{'other':>9}{'steps kept':>12}"]  # fmt: skip
    for side, s in summ.items():
        lines.append(f"{side:<6}{s['mean_step']:>9.4f}{s['mean_generate']:>10.4f}{s['mean_ref']:>9.4f}"
                     f"{s['mean_update']:>9.4f}{s['mean_other']:>9.4f}{s['n_steps']:>12d}")  # fmt: skip
    lengths = {side: s["lengths"] for side, s in summ.items()}
    equal = all(v == [spec["length"]] for v in lengths.values())
    lines.append(f"check: every completion has {spec['length']} tokens on every side: "
                 f"{'yes' if equal else 'NO ' + str(lengths)}")  # fmt: skip
    for side, r in first.items():
        lines.append(f"check: {side}: " + ", ".join(f"{k} {v}" for k, v in r["checks"].items()))
    if "trl" in first:
        lines.append("check: TRL extra old-log-prob forwards: "
                     f"{'YES' if first['trl']['extra_no_grad_forwards'] else 'none'}")  # fmt: skip
    lines += aligned_lines(spec, first)
    for side, table in data.get("profiles", {}).items():
        lines += ["", f"profile {side} (torch.profiler, steps 2..{spec['steps']}, one run):", table.rstrip()]
    return lines


def aligned_lines(spec: dict[str, Any], first: dict[str, dict[str, Any]]) -> list[str]:
    seqs, length = spec["prompts"] * spec["group"], spec["length"]
    lines = [
        "aligned: one model folder for both (random GPT-2, character tokenizer, save_pretrained); the same "
        f"'ab+cd=' prompt rows (TRL: datasets.Dataset.from_list; ours: task=jsonl of the same rows), "
        f"{spec['prompts']} prompts per step; the same reward function (reward_values); seed {spec['seed']}",
        f"aligned: completion length: ours generate.min_new_tokens = generate.max_new_tokens = {length}; TRL "
        f"max_completion_length={length}, generation_kwargs={{'min_new_tokens': {length}}}",
        f"aligned: batch: ours trainer.prompts_per_step={spec['prompts']}, generate.num_samples={spec['group']}, "
        f"trainer.num_minibatches=1, trainer.micro_batch_size={seqs}, algo.ppo_epochs=1; TRL "
        f"per_device_train_batch_size={seqs}, num_generations={spec['group']}",
        f"aligned: KL: TRL beta = our algo.kl_coef = {spec['kl']:g}; learning rate {spec['lr']:g} on both sides; "
        "AdamW betas (0.9, 0.999), eps 1e-8, weight decay 0, max grad norm 1.0 on both; ours "
        "optim.scheduler=constant; ours model.gradient_checkpointing=false, model.dtype=float32",
    ]
    if "ours" in first and first["ours"].get("sizes"):
        lines.append(f"aligned: ours {first['ours']['sizes']}")
    if "trl" in first:
        for key, (value, why) in TRL_ALIGNED.items():
            lines.append(f"aligned: TRL {key}={spec['lr'] if value is None else value!r}: {why}")
        lines.append(
            f"not aligned (implementation, not work): TRL optimizer {first['trl']['optim']!r} (Trainer default), "
            "ours torch.optim.AdamW(fused=True) (optim.fused); ours runs GPT-2's gelu_new as the fused "
            "gelu_pytorch_tanh kernel (model.fused_activation, the same function), TRL as eight elementwise ops; "
            "TRL computes the per-token entropy in its training forward "
            "(hard-coded compute_entropy=True, for a metric) and ours does not (algo.entropy_coef=0); TRL's "
            "fused LM head vs our logits_to_keep + chunked log-softmax; ours runs with trainer.deterministic=true "
            "(its default)"
        )
    return lines


def scaling(args: argparse.Namespace, run: Runner, model_dir: str) -> list[dict[str, Any]]:
    points = []
    for n in args.scaling_prompts:
        for length in args.scaling_lengths:
            res = run("run_ours", side_spec(args, n, length, args.scaling_steps), model_dir)
            s = summarize([res])
            points.append({"prompts": n, "length": length, **s})
            print(f"  scaling {n:3d} prompts x {length:3d} tokens: {s['step']:.4f} s, +{s['peak_mb']:.1f} MB",
                  flush=True)  # fmt: skip
    return points


def linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least squares ``y = a + b x``; R^2 and the largest |residual| / y."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((xi - mx) ** 2 for xi in x)
    b = sum((xi - mx) * (yi - my) for xi, yi in zip(x, y)) / sxx if sxx else 0.0
    a = my - b * mx
    pred = [a + b * xi for xi in x]
    ss_res = sum((yi - pi) ** 2 for yi, pi in zip(y, pred))
    ss_tot = sum((yi - my) ** 2 for yi in y)
    rel = [abs(yi - pi) / abs(yi) for yi, pi in zip(y, pred) if yi]
    return {
        "a": a,
        "b": b,
        "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
        "max_rel_residual": max(rel, default=0.0),
    }


def report_scaling(args: argparse.Namespace, points: list[dict[str, Any]]) -> list[str]:
    lines = ["", f"scaling (ours): G={args.group}, {args.scaling_steps} steps per point (first dropped; median "
             f"step), GPT-2 {args.layers} x {args.hidden}, device {args.device}; N = prompts/step, L = tokens/completion",
             f"{'prompts':>8}{'length':>8}{'N*L':>8}{'step s':>10}{'generate':>10}{'ref':>9}{'update':>9}"
             f"{'peak MB':>9}{'s per 1k tok':>14}"]  # fmt: skip
    for p in points:
        nl = p["prompts"] * p["length"]
        per_k = p["step"] / (nl * args.group) * 1000
        lines.append(f"{p['prompts']:>8d}{p['length']:>8d}{nl:>8d}{p['step']:>10.4f}{p['mean_generate']:>10.4f}"
                     f"{p['mean_ref']:>9.4f}{p['mean_update']:>9.4f}{p['peak_mb']:>9.1f}{per_k:>14.4f}")  # fmt: skip
    x = [float(p["prompts"] * p["length"]) for p in points]
    for name, key, unit in (("step time", "step", "s"), ("peak memory", "peak_mb", "MB")):
        fit = linear_fit(x, [p[key] for p in points])
        lines.append(f"fit {name}: {key} = {fit['a']:.4g} + {fit['b']:.4g} {unit} x N*L; R^2 = {fit['r2']:.4f}; "
                     f"max relative residual = {fit['max_rel_residual'] * 100:.1f}%")  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sides = ["ours", "trl"] if args.only == "both" else [args.only]
    if "trl" in sides and not args.scaling and not trl_available():
        print("TRL is not installed: pip install -c constraints.txt -e '.[bench]' (or use --only ours)",
              file=sys.stderr)  # fmt: skip
        return 2
    run = Runner()
    t_start = time.perf_counter()
    out: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-grpo-model-") as model_dir:
        info = run("_model_in_child", args, model_dir)
        out["model"] = info
        if not args.scaling:
            print(f"bench: {' vs '.join(sides)}, {args.repeats} run(s) per side, alternating", flush=True)
            data = bench(args, run, model_dir, sides)
            out["bench"] = data
            lines += report_bench(args, data, info)
        if not args.no_scaling:
            print("scaling: ours", flush=True)
            points = scaling(args, run, model_dir)
            out["scaling"] = points
            lines += report_scaling(args, points)
    lines.append(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
