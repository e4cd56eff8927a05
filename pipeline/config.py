"""Typed configuration schemas (Hydra structured configs) and start-up validation.

Every YAML option under ``conf/`` merges into one of these dataclasses, so a typo
(``generate.temprature``) or a wrong type (``trainer.steps=abc``) fails at composition. Range
checks live in ``__post_init__`` and run in :func:`validate`, which also accepts a config reloaded
from a run's ``.hydra/config.yaml`` (that has lost its schema): the schema is re-applied first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class DType(Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float64 = "float64"


class Advantage(Enum):
    grpo = "grpo"  # (r - mean) / (std + eps) within each group; std_normalize=false is Dr. GRPO
    rloo = "rloo"  # leave-one-out baseline


class LossAgg(Enum):
    token_mean = "token_mean"
    seq_mean = "seq_mean"
    seq_sum_norm = "seq_sum_norm"


class OnError(Enum):
    zero = "zero"  # a failed reward scores 0
    drop = "drop"  # the sample is left out of the loss
    fail = "fail"  # stop the run


class WandbMode(Enum):
    offline = "offline"
    online = "online"
    disabled = "disabled"


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{key} must be {expected}, got {value!r}.")


@dataclass
class ModelConfig:
    name_or_path: str = "builtin://arith-tiny"
    revision: str | None = None
    dtype: DType = DType.float32
    device: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None
    gradient_checkpointing: bool = False
    fused_activation: bool = True  # run GPT-2's gelu_new as the same function's fused kernel

    def __post_init__(self) -> None:
        _require(
            bool(self.name_or_path),
            "model.name_or_path",
            "a hub id, local folder, builtin://NAME or gguf://PACKAGE/FILE.gguf",
            self.name_or_path,
        )
        dev = self.device
        _require(dev in ("auto", "cpu", "mps") or dev == "cuda" or dev.startswith("cuda:"),
                 "model.device", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'", dev)  # fmt: skip


@dataclass
class TokenizerConfig:
    name_or_path: str | None = None  # None: the model's own
    trust_remote_code: bool = False


@dataclass
class ChatTemplateConfig:
    use_chat: bool = False
    name: str | None = None
    template: str | None = None
    system_prompt: str | None = None

    def __post_init__(self) -> None:
        from pipeline.chat import check_template_args

        check_template_args(self.name, self.template, keys=("chat_template.name", "chat_template.template"))
        if not self.use_chat and (self.name or self.template or self.system_prompt):
            raise ValueError("chat_template.name/template/system_prompt need chat_template.use_chat=true.")


@dataclass
class GenerateConfig:
    """Fields map 1:1 to ``transformers.GenerationConfig``; ``num_samples`` is the group size G."""

    num_samples: int = 8
    max_new_tokens: int = 8
    min_new_tokens: int | None = None
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float | None = None
    repetition_penalty: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from transformers import GenerationConfig

        from pipeline.policy_args import updated_generation_config

        _require(self.num_samples >= 1, "generate.num_samples", "an int >= 1", self.num_samples)
        # the wrapper's own checks, so a bad value fails here, at composition, with the same rule
        named = {k: v for k, v in self.generation_kwargs().items() if k not in self.extra}
        updated_generation_config(GenerationConfig(), dict(self.extra), "generate.extra", log_probs=True)
        updated_generation_config(GenerationConfig(), named, "generate.", log_probs=True)

    def generation_kwargs(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature",
                                             "top_k", "top_p", "min_p", "repetition_penalty")}  # fmt: skip
        out.update(self.extra)
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class ArithmeticTaskConfig:
    _target_: str = "pipeline.tasks.ArithmeticTask"
    digits: int = 2
    ops: str = "+"
    num_eval: int = 200
    num_train: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        from pipeline.tasks import ArithmeticTask

        ArithmeticTask.check_args(
            digits=self.digits,
            ops=self.ops,
            num_eval=self.num_eval,
            num_train=self.num_train,
            seed=self.seed,
            prefix="task.",
        )


@dataclass
class JsonlTaskConfig:
    _target_: str = "pipeline.tasks.JsonlTask"
    path: str = MISSING
    eval_path: str | None = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    eval_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        from pipeline.tasks import check_fraction

        check_fraction("task.eval_fraction", self.eval_fraction)


class AnswerExtractor(Enum):
    none = "none"  # the answer field as it is
    gsm8k = "gsm8k"  # the text after "#### ", commas removed
    regex = "regex"  # task.answer_regex's first group, or its whole match


@dataclass
class HFDatasetTaskConfig:
    """Types only: ``HFDatasetTask`` checks the values, the splits and the fields when it is built
    (one home for every check; the recipe builds the task before it loads a model)."""

    _target_: str = "pipeline.hf_dataset.HFDatasetTask"
    path: str = MISSING
    name: str | None = None
    revision: str | None = None
    split: str = "train"
    eval_split: str | None = None
    eval_fraction: float = 0.1
    prompt_field: str | None = "prompt"
    messages_field: str | None = None
    answer_field: str = "answer"
    answer_extractor: AnswerExtractor = AnswerExtractor.none
    answer_regex: str | None = None
    max_examples: int | None = None
    streaming: bool = False
    cache_dir: str | None = None
    seed: int = 0


@dataclass
class ChatArithmeticTaskConfig:
    _target_: str = "pipeline.tasks.ChatArithmeticTask"
    num_terms: int = 2
    digits: int = 2
    ops: str = "+"
    template: str = "What is {expr}? Reply with only the number."  # the user message; {expr}: "23 + 58"
    num_eval: int = 200
    num_train: int | None = None  # None: every problem not held out (small problem spaces only)
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.num_terms >= 2, "task.num_terms", "an int >= 2", self.num_terms)
        _require(self.digits >= 1, "task.digits", "an int >= 1", self.digits)
        _require(self.num_eval >= 1, "task.num_eval", "an int >= 1", self.num_eval)
        ok_train = self.num_train is None or self.num_train >= 1
        _require(ok_train, "task.num_train", "null or an int >= 1", self.num_train)
        ok_ops = bool(self.ops) and set(self.ops) <= set("+-*")
        _require(ok_ops, "task.ops", "a non-empty subset of '+-*'", self.ops)
        _require("{expr}" in self.template, "task.template", "a string containing {expr}", self.template)


@dataclass
class RewardConfig:
    functions: dict[str, Any] = field(default_factory=dict)
    accuracy: str | None = None  # the reward function whose value 1.0 means "correct"
    on_error: OnError = OnError.zero

    def __post_init__(self) -> None:
        for name, fn in self.functions.items():
            if not isinstance(fn, dict) or "_target_" not in fn:
                raise ValueError(f"reward.functions.{name} must be a node with a _target_, got {fn!r}.")
            weight = fn.get("weight", 1.0)
            _require(isinstance(weight, (int, float)) and not isinstance(weight, bool),
                     f"reward.functions.{name}.weight", "a number", weight)  # fmt: skip
        if self.accuracy is not None:
            _require(
                self.accuracy in self.functions,
                "reward.accuracy",
                f"one of {sorted(self.functions)}",
                self.accuracy,
            )


@dataclass
class AlgoConfig:
    name: str = "grpo"  # a label for runs and tables; behaviour comes from the fields below
    recipe: str = "pipeline.recipe.GRPORecipe"  # the recipe class train.py runs
    advantage: Advantage = Advantage.grpo
    std_normalize: bool = True
    adv_eps: float = 1e-4
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    kl_coef: float = 0.02
    entropy_coef: float = 0.0
    loss_agg: LossAgg = LossAgg.token_mean
    ppo_epochs: int = 1

    def __post_init__(self) -> None:
        _require(0 <= self.clip_eps_low < 1, "algo.clip_eps_low", "in [0, 1)", self.clip_eps_low)
        _require(self.clip_eps_high >= 0, "algo.clip_eps_high", ">= 0", self.clip_eps_high)
        _require(self.kl_coef >= 0, "algo.kl_coef", ">= 0", self.kl_coef)
        _require(self.entropy_coef >= 0, "algo.entropy_coef", ">= 0", self.entropy_coef)
        _require(self.adv_eps > 0, "algo.adv_eps", "> 0", self.adv_eps)
        _require(self.ppo_epochs >= 1, "algo.ppo_epochs", "an int >= 1", self.ppo_epochs)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    scheduler: str = "constant_with_warmup"
    warmup_steps: int = 0
    fused: bool = True  # torch's fused AdamW kernel on CPU and CUDA (same update, one kernel)

    def __post_init__(self) -> None:
        _require(self.lr > 0, "optim.lr", "> 0", self.lr)
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            "optim.betas",
            "two numbers in [0, 1)",
            self.betas,
        )
        _require(self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay)
        _require(self.max_grad_norm > 0, "optim.max_grad_norm", "> 0", self.max_grad_norm)
        _require(self.warmup_steps >= 0, "optim.warmup_steps", ">= 0", self.warmup_steps)
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        _require(self.scheduler in names, "optim.scheduler", f"one of {names}", self.scheduler)


@dataclass
class TrainerConfig:
    steps: int = 300
    prompts_per_step: int = 16
    num_minibatches: int = 1
    micro_batch_size: int = 32
    eval_every: int = 50
    eval_size: int | None = None
    log_every: int = 1
    completions_every: int = 50
    save_every: int = 100
    keep_last: int = 2
    resume: str | None = None
    max_nonfinite: int = 3
    deterministic: bool = True
    threads: int | None = None

    def __post_init__(self) -> None:
        for key in (
            "steps",
            "prompts_per_step",
            "num_minibatches",
            "micro_batch_size",
            "log_every",
            "keep_last",
            "max_nonfinite",
        ):
            value = getattr(self, key)
            _require(value >= 1, f"trainer.{key}", "an int >= 1", value)
        for key in ("eval_every", "completions_every", "save_every"):
            value = getattr(self, key)
            _require(value >= 0, f"trainer.{key}", "an int >= 0 (0 disables it)", value)
        _require(
            self.eval_size is None or self.eval_size >= 1,
            "trainer.eval_size",
            "null or an int >= 1",
            self.eval_size,
        )
        _require(
            self.threads is None or self.threads >= 1, "trainer.threads", "null or an int >= 1", self.threads
        )


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "hf-rl-pipeline"
    entity: str | None = None
    mode: WandbMode = WandbMode.offline
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    console: bool = True
    plot: bool = True


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    chat_template: ChatTemplateConfig = field(default_factory=ChatTemplateConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    task: Any = MISSING
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    name: str | None = None

    def __post_init__(self) -> None:
        _require(
            len(self.reward.functions) > 0,
            "reward.functions",
            "at least one reward function",
            self.reward.functions,
        )
        sizes = derived_sizes(self)
        g = self.generate.num_samples
        if self.algo.advantage in (Advantage.grpo, Advantage.rloo) and g < 2:
            raise ValueError(
                f"generate.num_samples must be >= 2 for algo.advantage={self.algo.advantage.value} "
                f"(group-relative advantages), got {g}."
            )
        if sizes["rollout"] % self.trainer.num_minibatches:
            raise ValueError(
                f"trainer.num_minibatches ({self.trainer.num_minibatches}) must divide the rollout batch "
                f"trainer.prompts_per_step x generate.num_samples = {sizes['rollout']}."
            )
        if sizes["minibatch"] % sizes["micro_batch"]:
            raise ValueError(
                f"trainer.micro_batch_size ({self.trainer.micro_batch_size}) must divide the minibatch of "
                f"{sizes['minibatch']} sequences (rollout {sizes['rollout']} / trainer.num_minibatches)."
            )


def derived_sizes(cfg: TrainConfig) -> dict[str, int]:
    """Sequences per step, per optimizer step, per forward/backward, and accumulation steps."""
    rollout = cfg.trainer.prompts_per_step * cfg.generate.num_samples
    minibatch = rollout // cfg.trainer.num_minibatches
    micro = min(cfg.trainer.micro_batch_size, minibatch)
    return {
        "rollout": rollout,
        "minibatch": minibatch,
        "micro_batch": micro,
        "grad_accum": max(1, minibatch // micro),
        "optimizer_steps_per_step": cfg.trainer.num_minibatches * cfg.algo.ppo_epochs,
    }


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(group="task", name="base_arithmetic", node=ArithmeticTaskConfig)
    cs.store(group="task", name="base_jsonl", node=JsonlTaskConfig)
    cs.store(group="task", name="base_hf_dataset", node=HFDatasetTaskConfig)
    cs.store(group="task", name="base_chat_arithmetic", node=ChatArithmeticTaskConfig)


def instantiate_node(node: Any, key: str, **kwargs: Any) -> Any:
    """Hydra ``instantiate`` for every ``_target_`` node, with errors that name ``key``.

    A constructor's own ``ValueError``/``TypeError``/``FileNotFoundError`` (bad data, bad argument)
    is re-raised as is; a target that cannot be imported or called becomes a ``ValueError``.
    """
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    if not isinstance(node, (dict, DictConfig)):
        node = OmegaConf.structured(node)
    try:
        return instantiate(node, _convert_="all", **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError, FileNotFoundError)) and not isinstance(
            cause, ImportError
        ):
            raise cause from None
        raise ValueError(f"{key}: cannot instantiate {node.get('_target_')!r}: {err}") from err


def validate(cfg: DictConfig | dict) -> TrainConfig:
    """Re-apply the schema and the range checks; returns the typed config object.

    Works on a freshly composed config and on one reloaded from ``.hydra/config.yaml``.
    """
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.to_container(raw, resolve=True)
    task = raw.get("task") or {}
    task_schemas = {
        ArithmeticTaskConfig._target_: ArithmeticTaskConfig,
        JsonlTaskConfig._target_: JsonlTaskConfig,
        HFDatasetTaskConfig._target_: HFDatasetTaskConfig,
        ChatArithmeticTaskConfig._target_: ChatArithmeticTaskConfig,
    }
    schema = OmegaConf.structured(TrainConfig)
    if task.get("_target_") in task_schemas:
        schema.task = OmegaConf.structured(task_schemas[task["_target_"]])
    merged = OmegaConf.merge(schema, raw)
    return OmegaConf.to_object(merged)
