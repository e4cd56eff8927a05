"""Typed configuration schemas (Hydra structured configs) and start-up validation.

Every YAML option under ``conf/`` merges into one of these dataclasses, so a typo
(``generate.temprature``) or a wrong type (``trainer.steps=abc``) fails at composition. Range
checks live in ``__post_init__`` and run in :func:`validate`, which also accepts a config reloaded
from a run's ``.hydra/config.yaml`` (that has lost its schema): the schema is re-applied first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pipeline.config_algo import AlgoConfig
from pipeline.config_tasks import (
    ArithmeticTaskConfig,
    ChatArithmeticTaskConfig,
    EvalConfig,
    HFDatasetTaskConfig,
    JsonlTaskConfig,
    RewardConfig,
)
from pipeline.config_types import (
    Advantage,
    CriticKind,
    DistRollout,
    DType,
    RolloutEngine,
    Strategy,
    WandbMode,
    _require,
)


@dataclass
class LoraConfig:
    """LoRA adapters through peft (``pip install -e '.[lora]'``): only the adapters train, and the
    reference log-probs come from the same model with the adapters disabled."""

    enabled: bool = False
    r: int = 16
    alpha: float = 32.0  # the adapter output is scaled by alpha / r
    dropout: float = 0.0  # inactive anyway: rollouts and updates run the model in eval mode
    target_modules: list[str] = field(default_factory=list)  # []: every linear layer but the output head

    def __post_init__(self) -> None:
        _require(isinstance(self.r, int) and self.r >= 1, "model.lora.r", "an integer >= 1", self.r)
        _require(self.alpha > 0, "model.lora.alpha", "> 0", self.alpha)
        _require(0.0 <= self.dropout < 1.0, "model.lora.dropout", "in [0, 1)", self.dropout)


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
    compile_activation: bool = False  # tanh-GELU as compiled kernels (pipeline.activations)
    autocast: str | None = None  # bfloat16 | float16: mixed precision over float32 weights (torch.autocast)
    share_prompt_cache: bool = True  # the G samples of a prompt run it once (pipeline.prefix)
    lora: LoraConfig = field(default_factory=LoraConfig)  # peft adapters (pipeline.lora)

    def __post_init__(self) -> None:
        _require(
            bool(self.name_or_path),
            "model.name_or_path",
            "a hub id, local folder, builtin://NAME or gguf://PACKAGE/FILE.gguf",
            self.name_or_path,
        )
        _require(self.autocast in (None, "bfloat16", "float16"), "model.autocast",
                 "null, bfloat16 or float16", self.autocast)  # fmt: skip
        _require(self.autocast is None or self.dtype is DType.float32, "model.autocast",
                 "float32 weights (model.dtype=float32): autocast computes in low precision over them",
                 f"{self.autocast} with model.dtype={self.dtype.value}")  # fmt: skip
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
    """Fields map 1:1 to ``transformers.GenerationConfig``; ``num_samples`` is the group size G, ``sampler``
    how sampled tokens are drawn (:mod:`pipeline.sampling`)."""

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
    sampler: str = "inverse_cdf"  # or multinomial: how sampled tokens are drawn (pipeline.sampling)
    compile: bool = False  # decode with a static cache and a torch.compile'd step (pipeline.decode)

    def __post_init__(self) -> None:
        from transformers import GenerationConfig

        from pipeline.policy_args import updated_generation_config
        from pipeline.sampling import SAMPLERS

        _require(self.num_samples >= 1, "generate.num_samples", "an int >= 1", self.num_samples)
        _require(self.sampler in SAMPLERS, "generate.sampler", f"one of {SAMPLERS}", self.sampler)
        # the wrapper's own checks, so a bad value fails here, at composition, with the same rule
        named = {k: v for k, v in self.generation_kwargs().items() if k not in self.extra}
        updated_generation_config(GenerationConfig(), dict(self.extra), "generate.extra", log_probs=True)
        updated_generation_config(GenerationConfig(), named, "generate.", log_probs=True)
        if self.compile:
            from pipeline.decode import check_generation

            check_generation(GenerationConfig(**self.generation_kwargs()), {}, "the generate group")

    def generation_kwargs(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("max_new_tokens", "min_new_tokens", "do_sample", "temperature",
                                             "top_k", "top_p", "min_p", "repetition_penalty")}  # fmt: skip
        out.update(self.extra)
        return {k: v for k, v in out.items() if v is not None}


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
    max_minutes: float | None = None  # wall-clock budget: stop after the step that reaches it, then save
    strategy: Strategy = Strategy.single  # ddp/fsdp: data parallel over torchrun ranks (pipeline.distributed)
    dist_timeout_s: float = 1800.0  # process-group timeout: a collective stuck this long ends the job
    dist_rollout: DistRollout = DistRollout.shard

    def __post_init__(self) -> None:
        _require(self.dist_timeout_s > 0, "trainer.dist_timeout_s", "a number > 0", self.dist_timeout_s)
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
        _require(
            self.max_minutes is None or self.max_minutes > 0,
            "trainer.max_minutes",
            "null or a number of minutes > 0",
            self.max_minutes,
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
class RolloutConfig:
    """Which engine samples the rollouts (``rollout=hf|vllm``); scoring, training and evaluation stay on HF."""

    engine: RolloutEngine = RolloutEngine.hf
    dtype: DType = DType.float32  # the vLLM engine's dtype (bfloat16: faster, larger gen/train gap)
    enforce_eager: bool = True  # no torch.compile (CPU start-up about 5 s; compiled about 80 s)
    kv_cache_gib: float = 2.0  # CPU KV cache size
    gpu_memory_utilization: float | None = None  # CUDA: fraction of the GPU the engine takes (null: vLLM's)
    sync_every: int = 1  # push the trainer's weights into the engine every N steps
    verify_sync_atol: float | None = None  # start-up check of the engine's log-probs (null: log the gap only)
    tis_cap: float | None = None  # truncated importance sampling cap C (null: off); typical 2

    def __post_init__(self) -> None:
        _require(self.sync_every >= 1, "rollout.sync_every", ">= 1", self.sync_every)
        _require(self.kv_cache_gib > 0, "rollout.kv_cache_gib", "> 0", self.kv_cache_gib)
        gpu = self.gpu_memory_utilization
        _require(gpu is None or 0 < gpu <= 1, "rollout.gpu_memory_utilization", "null or in (0, 1]", gpu)
        cap = self.tis_cap
        _require(cap is None or cap > 0, "rollout.tis_cap", "null or > 0", cap)


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
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluate.py's options
    rollout: RolloutConfig = field(default_factory=RolloutConfig)  # the sampling engine (rollout=hf|vllm)
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
        _require(
            self.algo.overlong_buffer <= self.generate.max_new_tokens,
            "algo.overlong_buffer",
            f"<= generate.max_new_tokens ({self.generate.max_new_tokens})",
            self.algo.overlong_buffer,
        )
        one_process = self.algo.advantage == Advantage.gae or self.algo.dynamic_sampling
        if one_process and self.trainer.strategy.value != "single":
            raise ValueError("algo.advantage=gae and algo.dynamic_sampling need trainer.strategy=single.")
        if self.generate.compile and self.trainer.strategy == Strategy.fsdp:
            raise ValueError("generate.compile=true is not supported with trainer.strategy=fsdp; use ddp.")
        if self.model.lora.enabled and self.trainer.strategy == Strategy.fsdp:
            raise ValueError("model.lora.enabled=true is not supported with trainer.strategy=fsdp; use ddp.")
        shared_head = self.algo.advantage == Advantage.gae and self.algo.critic == CriticKind.shared
        if shared_head and self.rollout.engine.value != "hf":  # its values come from HF generate's passes
            raise ValueError("algo.critic=shared needs rollout=hf (else use algo.critic=separate).")
        if shared_head and self.generate.compile:  # its values are read by hooks in generate's passes
            raise ValueError(
                "algo.critic=shared needs generate.compile=false (else use algo.critic=separate)."
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


def describe_sizes(cfg: TrainConfig, sizes: dict[str, int]) -> str:
    """The derived sizes in one line, printed once at start-up."""
    t, g = cfg.trainer, cfg.generate.num_samples
    return (
        f"[sizes] {t.prompts_per_step} prompts x {g} samples = {sizes['rollout']} sequences/step; "
        f"{t.num_minibatches} minibatch(es) of {sizes['minibatch']} x {cfg.algo.ppo_epochs} epoch(s) = "
        f"{sizes['optimizer_steps_per_step']} optimizer step(s)/step; micro-batch {sizes['micro_batch']}, "
        f"grad accumulation {sizes['grad_accum']}"
    )
