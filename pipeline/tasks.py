"""Tasks: prompts with verifiable answers, a held-out eval set, and a resumable sampler.

A task owns its training and eval examples and draws training prompts by walking a seeded
permutation of the training set epoch by epoch. The sampler state is three ints, so a checkpoint
can store it and a resumed run draws exactly the examples an uninterrupted run would.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_MAX_SPACE = 2_000_000  # problems enumerated by ArithmeticTask without an explicit num_train


class Message(NamedTuple):
    """One chat turn; a tuple, so an :class:`Example` holding messages stays hashable."""

    role: str
    content: str


@dataclass(frozen=True)
class Example:
    """One prompt and the exact answer string a correct response must produce.

    ``messages`` is set only by tasks that read whole conversations (``HFDatasetTask`` with
    ``messages_field``): the turns up to and including the last user message, the one ``prompt``
    holds. With a chat template those turns are the prompt; ``None`` means a single user turn.
    """

    prompt: str
    answer: str
    messages: tuple[Message, ...] | None = None


class Task:
    """Training and held-out examples plus a deterministic, resumable training sampler."""

    def __init__(self, train_examples: list[Example], eval_examples: list[Example], *, seed: int = 0) -> None:
        if not train_examples:
            raise ValueError("a task needs at least one training example.")
        check_int("seed", seed, minimum=0)
        self.train_examples = list(train_examples)
        self.eval_examples = list(eval_examples)
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None

    def _permutation(self) -> np.ndarray:
        if self._order is None:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._order = rng.permutation(len(self.train_examples))
        return self._order

    def sample(self, n: int) -> list[Example]:
        """The next ``n`` training examples; every example is seen once per epoch."""
        check_int("n", n, minimum=1)
        out = []
        for _ in range(n):
            if self.position == len(self.train_examples):
                self.epoch, self.position, self._order = self.epoch + 1, 0, None
            out.append(self.train_examples[int(self._permutation()[self.position])])
            self.position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        """Sampler state as plain ints (stored in checkpoints)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_train": len(self.train_examples),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the sampler so the next ``sample`` continues where the saved run stopped."""
        missing = {"seed", "epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"task state_dict is missing keys {sorted(missing)}.")
        num_train = state.get("num_train", len(self.train_examples))
        if num_train != len(self.train_examples):
            raise ValueError(
                f"task state_dict was saved with {num_train} training examples, this task has "
                f"{len(self.train_examples)}: the task configuration changed."
            )
        check_int("state_dict['seed']", state["seed"], minimum=0)
        check_int("state_dict['epoch']", state["epoch"], minimum=0)
        check_int("state_dict['position']", state["position"], minimum=0)
        if state["position"] > len(self.train_examples):
            raise ValueError(f"state_dict['position']={state['position']} exceeds the training set size.")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
        self._order = None


class ArithmeticTask(Task):
    """Integer arithmetic in plain text: prompt ``"12+35="``, answer ``"47"``.

    Operands have up to ``digits`` digits (0 to 10**digits - 1); ``ops`` is a string of ``+``, ``-``,
    ``*``. For ``-`` the larger operand comes first, so answers are never negative. The space of
    all problems is split by a seeded permutation: the first ``num_eval`` are held out, the rest
    (or ``num_train`` of them) are for training, so eval and train never share a prompt.
    """

    def __init__(
        self,
        *,
        digits: int = 2,
        ops: str = "+",
        num_eval: int = 200,
        num_train: int | None = None,
        seed: int = 0,
    ) -> None:
        self.check_args(digits=digits, ops=ops, num_eval=num_eval, num_train=num_train, seed=seed)
        self.digits, self.ops = digits, ops
        base = 10**digits
        space = len(ops) * base * base
        if num_train is None and space > _MAX_SPACE:
            raise ValueError(
                f"digits={digits} with ops={ops!r} has {space} problems; set num_train to sample a subset."
            )
        wanted = num_eval + (space - num_eval if num_train is None else num_train)
        if num_eval >= space or wanted > space:
            raise ValueError(
                f"num_eval={num_eval} and num_train={num_train} need {wanted} distinct problems, "
                f"digits={digits} with ops={ops!r} has only {space}."
            )
        picks = random.Random(seed).sample(range(space), wanted)  # without replacement, any size

        def example(i: int) -> Example:
            op, rest = divmod(i, base * base)
            a, b = divmod(rest, base)
            sym = ops[op]
            if sym == "-" and a < b:
                a, b = b, a
            return Example(f"{a}{sym}{b}=", str(_OPS[sym](a, b)))

        # (a, b) and (b, a) give the same "-" prompt: keep the first occurrence, eval first.
        seen: set[str] = set()
        split = []
        for i in picks:
            ex = example(i)
            if ex.prompt not in seen:
                seen.add(ex.prompt)
                split.append(ex)
        eval_examples = split[:num_eval]
        super().__init__(split[num_eval:], eval_examples, seed=seed)

    @staticmethod
    def check_args(
        *, digits: int, ops: str, num_eval: int, num_train: int | None, seed: int, prefix: str = ""
    ) -> None:
        """The one home of the argument checks (the ``task`` config schema calls it with ``prefix="task."``)."""
        check_int(f"{prefix}digits", digits, minimum=1)
        check_int(f"{prefix}num_eval", num_eval, minimum=1)
        if num_train is not None:
            check_int(f"{prefix}num_train", num_train, minimum=1)
        if not isinstance(ops, str) or not ops or set(ops) - set(_OPS) or len(set(ops)) != len(ops):
            raise ValueError(f"{prefix}ops must be distinct characters from {''.join(_OPS)!r}, got {ops!r}.")
        check_int(f"{prefix}seed", seed, minimum=0)


class ChatArithmeticTask(Task):
    """Arithmetic questions for chat models: ``"What is 23 + 58? Reply with only the number."`` -> ``"81"``.

    ``num_terms`` operands of exactly ``digits`` digits (0-9 for one digit) joined by operators
    drawn from ``ops`` and evaluated with the usual precedence (``*`` before ``+``/``-``; answers
    are negative when the sum is). ``template`` is the user message, with ``{expr}`` where the
    expression goes: ask for the bare number, or for ``<answer>...</answer>`` tags. Problems are
    drawn without replacement from all of them by a seeded sample: the first ``num_eval`` are held
    out, the next ``num_train`` (``None``: all the rest) are for training.
    """

    def __init__(
        self,
        *,
        num_terms: int = 2,
        digits: int = 2,
        ops: str = "+",
        template: str = "What is {expr}? Reply with only the number.",
        num_eval: int = 200,
        num_train: int | None = None,
        seed: int = 0,
    ) -> None:
        check_int("num_terms", num_terms, minimum=2)
        check_int("digits", digits, minimum=1)
        check_int("num_eval", num_eval, minimum=1)
        if num_train is not None:
            check_int("num_train", num_train, minimum=1)
        check_int("seed", seed, minimum=0)
        if not isinstance(ops, str) or not ops or set(ops) - set(_OPS) or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be distinct characters from {''.join(_OPS)!r}, got {ops!r}.")
        if not isinstance(template, str) or "{expr}" not in template:
            raise ValueError(f"template must be a string containing {{expr}}, got {template!r}.")
        self.num_terms, self.digits, self.ops, self.template = num_terms, digits, ops, template
        low = 10 ** (digits - 1) if digits > 1 else 0
        count = 10**digits - low  # operands per position
        space = len(ops) ** (num_terms - 1) * count**num_terms
        if num_train is None and space > _MAX_SPACE:
            raise ValueError(
                f"num_terms={num_terms}, digits={digits}, ops={ops!r} give {space} problems; "
                "set num_train to sample a subset."
            )
        wanted = num_eval + (space - num_eval if num_train is None else num_train)
        if num_eval >= space or wanted > space:
            raise ValueError(
                f"num_eval={num_eval} and num_train={num_train} need {wanted} distinct problems, "
                f"num_terms={num_terms}, digits={digits}, ops={ops!r} give only {space}."
            )

        def example(i: int) -> Example:
            operands, symbols = [], []
            for k in range(num_terms):
                i, x = divmod(i, count)
                operands.append(low + x)
                if k:
                    i, o = divmod(i, len(ops))
                    symbols.append(ops[o])
            expr = " ".join([str(operands[0])] + [f"{o} {x}" for o, x in zip(symbols, operands[1:])])
            return Example(template.replace("{expr}", expr), str(_evaluate(operands, symbols)))

        picks = random.Random(seed).sample(range(space), wanted)  # distinct indices, distinct prompts
        examples = [example(i) for i in picks]
        super().__init__(examples[num_eval:], examples[:num_eval], seed=seed)


def _evaluate(operands: list[int], symbols: list[str]) -> int:
    """``operands[0] symbols[0] operands[1] ...`` with ``*`` binding tighter than ``+`` and ``-``."""
    terms, signs = [operands[0]], [1]
    for sym, x in zip(symbols, operands[1:]):
        if sym == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if sym == "+" else -1)
    return sum(s * t for s, t in zip(signs, terms))


class JsonlTask(Task):
    """Prompts and answers from a JSONL file, one object per line.

    ``eval_path`` gives a separate held-out file; otherwise a seeded ``eval_fraction`` of
    ``path`` is held out (at least one example when the fraction is positive). Numeric answers
    are converted to strings.
    """

    def __init__(
        self,
        *,
        path: str | Path,
        eval_path: str | Path | None = None,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        eval_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        check_fraction("eval_fraction", eval_fraction)
        check_int("seed", seed, minimum=0)
        examples = read_jsonl(path, prompt_key=prompt_key, answer_key=answer_key)
        if eval_path is not None:
            train, held_out = examples, read_jsonl(eval_path, prompt_key=prompt_key, answer_key=answer_key)
        else:
            train, held_out = hold_out(examples, eval_fraction, seed, where=str(path), instead="eval_path")
        super().__init__(train, held_out, seed=seed)


def hold_out(
    examples: list[Example], eval_fraction: float, seed: int, *, where: str, instead: str
) -> tuple[list[Example], list[Example]]:
    """Split off a seeded ``eval_fraction`` (at least one example when positive); both parts keep file order.

    ``where`` names the data in errors, ``instead`` the option that gives a separate eval set.
    """
    k = max(1, round(len(examples) * eval_fraction)) if eval_fraction > 0 else 0
    if k >= len(examples):
        raise ValueError(
            f"{where}: eval_fraction={eval_fraction} holds out {k} of {len(examples)} examples, "
            f"leaving none for training; lower eval_fraction or give {instead}."
        )
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in sorted(order[k:])], [examples[i] for i in sorted(order[:k])]


def read_jsonl(path: str | Path, *, prompt_key: str = "prompt", answer_key: str = "answer") -> list[Example]:
    """Examples from a JSONL file; errors name the file, the line and the key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"task data file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: invalid JSON ({err.msg}).") from err
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
            for key in (prompt_key, answer_key):
                if key not in row:
                    raise ValueError(f"{where}: missing key {key!r} (has {sorted(row)}).")
            prompt = checked_text(row[prompt_key], where, prompt_key)
            answer = checked_text(row[answer_key], where, answer_key, numbers=True)
            out.append(Example(prompt, answer))
    if not out:
        raise ValueError(f"{path}: no examples (the file is empty).")
    return out


def checked_text(value: object, where: str, key: str, *, numbers: bool = False) -> str:
    """A non-empty text field of a data row (numbers become strings where allowed); errors name the row and key."""
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        kind = "a string or number" if numbers else "a string"
        raise ValueError(f"{where}: {key!r} must be {kind}, got {type(value).__name__}.")
    if not value.strip():
        raise ValueError(f"{where}: {key!r} is empty.")
    return value


def check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
    if not 0 <= value < 1:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}.")


def check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
