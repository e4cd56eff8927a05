"""Make the embedded default model: a tiny GPT-2 pretrained, on purpose only part-way, on arithmetic.

``python train.py`` fine-tunes this model with GRPO on a laptop CPU, so it must start well below
perfect (RL has room) yet sample the right answer often enough that groups of G samples carry a
learning signal. This script trains it by supervised next-token prediction on
``prompt + answer + EOS`` (loss on the answer and EOS only) over the ArithmeticTask TRAINING
examples, for a fixed number of steps, seeded and deterministic on CPU, printing held-out eval
stats every ``--eval-every`` steps, then saves it with ``save_pretrained``.

    python scripts/make_tiny_model.py                      # writes pipeline/assets/arith-tiny/
    python scripts/make_tiny_model.py --steps 2000 --eval-every 100 --out /tmp/arith  # explore
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from tensordict import TensorDict

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without `pip install -e .`

from pipeline.policy import TransformersWrapper
from pipeline.tasks import ArithmeticTask, Example
from pipeline.tiny import char_tokenizer, tiny_model

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "pipeline" / "assets" / "arith-tiny"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--digits", type=int, default=2)
    p.add_argument("--ops", default="+")
    p.add_argument("--num-eval", type=int, default=200)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--max-positions", type=int, default=32)
    p.add_argument("--steps", type=int, default=260)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=0, help="eval every N steps (0: only at the end)")
    p.add_argument("--samples", type=int, default=8, help="samples per eval prompt for sampled acc/pass@k")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed: results depend on it)")
    p.add_argument("--no-save", action="store_true")
    return p.parse_args()


def batch_tensors(examples: list[Example], tokenizer, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``prompt + answer + EOS`` ids and labels that are -100 except on answer + EOS."""
    rows, labels = [], []
    for ex in examples:
        p = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(ex.answer, add_special_tokens=False)["input_ids"] + [eos_id]
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), eos_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
    return ids, lab


@torch.no_grad()
def evaluate(
    model, tokenizer, examples: list[Example], *, samples: int = 8, seed: int = 0
) -> dict[str, float]:
    """Held-out greedy accuracy, sampled (T=1) accuracy per sample, and pass@``samples``."""
    max_new = max(len(ex.answer) for ex in examples) + 2
    td = TensorDict({"text": [ex.prompt for ex in examples]}, batch_size=[len(examples)])
    greedy = TransformersWrapper(
        model,
        tokenizer=tokenizer,
        inplace=False,
        generate_kwargs={"max_new_tokens": max_new, "do_sample": False},
    )
    sampler = TransformersWrapper(
        model,
        tokenizer=tokenizer,
        inplace=False,
        num_samples=samples,
        generate_kwargs={"max_new_tokens": max_new, "do_sample": True, "temperature": 1.0, "top_k": 0},
    )
    eos = tokenizer.eos_token

    def correct(text: str, answer: str) -> bool:
        return text.split(eos, 1)[0].strip() == answer

    was_training = model.training
    model.eval()
    g = greedy(td.clone()).get("text_response").tolist()  # [N]
    with torch.random.fork_rng():  # eval must not change the training run's random stream
        torch.manual_seed(seed)
        s = sampler(td.clone()).get("text_response").tolist()  # [N][samples]
    model.train(was_training)
    g_ok = [correct(t, ex.answer) for t, ex in zip(g, examples)]
    s_ok = [[correct(t, ex.answer) for t in row] for row, ex in zip(s, examples)]
    n = len(examples)
    return {
        "greedy_acc": sum(g_ok) / n,
        "sampled_acc": sum(map(sum, s_ok)) / (n * samples),
        f"pass@{samples}": sum(any(r) for r in s_ok) / n,
    }


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    task = ArithmeticTask(digits=args.digits, ops=args.ops, num_eval=args.num_eval, seed=args.seed)
    tokenizer = char_tokenizer()  # GPT-2 style: pad_token unset, the wrapper pads with EOS
    model = tiny_model(
        tokenizer,
        arch="gpt2",
        hidden=args.hidden,
        layers=args.layers,
        heads=args.heads,
        max_positions=args.max_positions,
        seed=args.seed,
    )
    # No dropout: RL scores log-probs in train mode and they must match the sampling pass.
    model.config.update({"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0})
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    eos_id = tokenizer.eos_token_id
    params = sum(p.numel() for p in model.parameters())
    print(f"task: digits={args.digits} ops={args.ops!r} train={len(task.train_examples)} "
          f"eval={len(task.eval_examples)}; model: {params} parameters")  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    history = []
    t0 = time.perf_counter()
    model.train()
    for step in range(1, args.steps + 1):
        ids, labels = batch_tensors(task.sample(args.batch_size), tokenizer, eos_id)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (args.eval_every and step % args.eval_every == 0) or step == args.steps:
            stats = evaluate(model, tokenizer, task.eval_examples, samples=args.samples, seed=args.seed)
            stats = {
                "step": step,
                "loss": round(loss.item(), 4),
                **{k: round(v, 4) for k, v in stats.items()},
            }
            history.append(stats)
            print(json.dumps(stats), f"({time.perf_counter() - t0:.1f}s)", flush=True)
    model.eval()
    final = history[-1]
    print(f"final held-out eval ({len(task.eval_examples)} prompts): greedy acc {final['greedy_acc']:.3f}, "
          f"sampled acc (T=1) {final['sampled_acc']:.3f}, pass@{args.samples} {final[f'pass@{args.samples}']:.3f}")  # fmt: skip
    if args.no_save:
        return
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.generation_config.max_new_tokens = 2 * args.digits + 2
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    print(f"saved to {args.out}")


if __name__ == "__main__":
    main()
