"""Real Hydra composition: every option of every group composes and validates; bad values are rejected."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from pipeline.config import TrainConfig, derived_sizes, validate
from tests.helpers import CONF, compose_train

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
# Options that need a value the user must supply (??? in the YAML).
REQUIRED = {("task", "jsonl"): ["task.path=data.jsonl"], ("task", "hf_dataset"): ["task.path=data.parquet"]}


def _options():
    for group in GROUPS:
        for path in sorted((CONF / group).glob("*.yaml")):
            yield group, path.stem


def test_every_group_has_options():
    assert {"model", "tokenizer", "chat_template", "generate", "task", "reward", "algo", "optim", "trainer",
            "logger", "experiment", "hparams_search"} <= set(GROUPS)  # fmt: skip
    assert len(list(_options())) >= 20


@pytest.mark.parametrize(("group", "option"), list(_options()), ids=lambda x: str(x))
def test_every_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}", *REQUIRED.get((group, option), [])]
    cfg = compose_train(overrides, return_hydra_config=group == "hparams_search")
    if group == "hparams_search":
        assert cfg.hydra.sweeper.params  # the search space is defined
        assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    typed = validate(cfg)
    assert isinstance(typed, TrainConfig)
    # cheap nodes are instantiated for real: reward functions always, the task unless it reads a file
    for node in cfg.reward.functions.values():
        fn = instantiate({k: v for k, v in node.items() if k != "weight"}, _partial_=True)
        assert callable(fn)
    if typed.task._target_.endswith("ArithmeticTask"):
        task = instantiate(OmegaConf.structured(typed.task))
        assert len(task.eval_examples) == typed.task.num_eval


def test_cli_style_override_reaches_typed_config():
    cfg = validate(compose_train(["model=gpt2", "generate.temperature=0.7"]))
    assert cfg.model.name_or_path == "gpt2"
    assert cfg.generate.temperature == 0.7
    assert cfg.generate.generation_kwargs()["temperature"] == 0.7


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["generate.temprature=0.7"], "temprature"),
        (["trainer.stepz=3"], "stepz"),
        (["trainer.steps=abc"], "trainer.steps"),
        (["algo.loss_agg=mean"], "loss_agg"),
        (["model.dtype=float8"], "dtype"),
        (["task.digitz=3"], "digitz"),
        (["model=gpt3"], "gpt3"),
    ],
)
def test_typos_and_wrong_types_fail_at_composition(overrides, needle):
    with pytest.raises(ConfigCompositionException, match=needle):
        compose_train(overrides)


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["trainer.steps=0"], "trainer.steps"),
        (["trainer.max_minutes=0"], "trainer.max_minutes"),
        (["model.autocast=int8"], "model.autocast"),
        (["model.autocast=bfloat16", "model.dtype=bfloat16"], "model.autocast"),
        (["trainer.prompts_per_step=-1"], "trainer.prompts_per_step"),
        (["generate.temperature=0"], "generate.temperature"),
        (["generate.top_p=1.5"], "generate.top_p"),
        (["generate.max_new_tokens=0"], "generate.max_new_tokens"),
        (["generate.num_samples=1"], "generate.num_samples"),
        (["optim.lr=-1e-4"], "optim.lr"),
        (["optim.scheduler=warmup_cosine_magic"], "optim.scheduler"),
        (["algo.clip_eps_low=1.5"], "algo.clip_eps_low"),
        (["algo.kl_coef=-0.1"], "algo.kl_coef"),
        (["trainer.num_minibatches=3"], "trainer.num_minibatches"),
        (["trainer.micro_batch_size=48"], "trainer.micro_batch_size"),
        (["chat_template=chatml", "chat_template.name=vicuna"], "chat_template.name"),
        (["chat_template.name=qwen"], "use_chat"),
        (["model.device=tpu"], "model.device"),
        (["task.digits=0"], "task.digits"),
        (["task.ops=/"], "task.ops"),
        (["reward.accuracy=nonexistent"], "reward.accuracy"),
        (["+reward.functions.bad.weight=1"], "reward.functions.bad"),
        (["reward.functions.exact.weight=heavy"], "reward.functions.exact.weight"),
        (["task=jsonl"], "task.path"),
    ],
)
def test_bad_ranges_fail_at_validation_naming_the_key(overrides, needle):
    cfg = compose_train(overrides)
    with pytest.raises(Exception, match=needle.replace(".", r"\.")):
        validate(cfg)


def test_reloaded_config_is_revalidated(tmp_path):
    cfg = compose_train(["trainer.steps=7"])
    path = tmp_path / "config.yaml"
    OmegaConf.save(cfg, path)  # what a run folder's .hydra/config.yaml holds: no schema
    reloaded = OmegaConf.load(path)
    assert validate(reloaded).trainer.steps == 7
    reloaded.trainer.steps = 0
    with pytest.raises(ValueError, match=r"trainer\.steps"):
        validate(reloaded)
    reloaded.trainer.steps = 7
    reloaded.generate.temprature = 0.5
    with pytest.raises(Exception, match="temprature"):
        validate(reloaded)


def test_derived_sizes():
    cfg = validate(compose_train(["trainer.prompts_per_step=4", "generate.num_samples=8", "trainer.num_minibatches=2",
                                  "trainer.micro_batch_size=8", "algo.ppo_epochs=2"]))  # fmt: skip
    assert derived_sizes(cfg) == {"rollout": 32, "minibatch": 16, "micro_batch": 8, "grad_accum": 2,
                                  "optimizer_steps_per_step": 4}  # fmt: skip


def test_joblib_launcher_composes():
    cfg = compose_train(["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("JoblibLauncher") and cfg.hydra.launcher.n_jobs == 2
