"""The configured policy as a component: composed with Hydra's API outside train.py, built with
``build_policy``, used in a torchrl collector, and identical to the policy the recipe trains with."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from hydra import compose, initialize_config_dir
from tensordict import TensorDict

from pipeline.build import build_policy, load_model_and_tokenizer
from pipeline.config import register_configs, validate
from pipeline.recipe import GRPORecipe
from pipeline.tiny import CHATML_TEMPLATE
from tests.helpers import CONF, SMALL_RUN, read_metrics, run_recipe


def _user_config(overrides: list[str]):
    """What a user's own script or notebook does: Hydra's compose API on the project's conf/."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides)


def test_compose_build_generate_and_collect_with_torchrl(saved_tiny):
    from torchrl.collectors.llm import LLMCollector
    from torchrl.envs.llm import LLMEnv

    cfg = _user_config(
        [f"model.name_or_path={saved_tiny}", "generate.num_samples=4", "generate.max_new_tokens=5"]
    )
    policy = build_policy(cfg, mode="generate")
    out = policy(TensorDict(text=["12+35=", "7+8="], batch_size=[2]))
    assert out.batch_size == (2, 4)
    flat = out.reshape(-1)
    assert (flat["tokens_response_mask"].sum(-1) <= 5).all() and flat["log_probs"].shape[0] == 8
    assert (flat["log_probs"][flat["tokens_response_mask"]] < 0).all()
    greedy = build_policy(cfg, mode="greedy", model=policy.model, tokenizer=policy.tokenizer)
    a, b = (greedy(TensorDict(text=["12+35="], batch_size=[1]))["tokens_response"] for _ in range(2))
    assert torch.equal(a, b)  # greedy is deterministic

    class Prompts:  # torchrl's LLMEnv reads one batch of prompts per reset
        batch_size = 2

        def __iter__(self):
            return self

        def __next__(self):
            return {"text": ["1+2=", "30+4="]}

    one = build_policy(cfg, mode="generate", num_samples=None, model=policy.model, tokenizer=policy.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LLMEnv's deprecation notice and the InitTracker hint
        env = LLMEnv.from_dataloader(Prompts(), from_text=True, batch_size=2,
                                     eos_token_id=policy.tokenizer.eos_token_id)  # fmt: skip
        collector = LLMCollector(env, policy=one, dialog_turns_per_batch=4, total_dialog_turns=8)
    batches = list(collector)
    assert len(batches) == 2
    scorer = build_policy(cfg, mode="score", model=policy.model, tokenizer=policy.tokenizer)
    for data in batches:
        flat = data.reshape(-1)
        scored = scorer(flat.select("tokens", "tokens_response"))
        for lp, s in zip(flat.get("log_probs", as_list=True), scored.get("log_probs", as_list=True)):
            assert len(lp) and (lp - s).abs().max() < 1e-4


def test_recipe_policy_equals_the_built_policy(saved_tiny, tmp_path):
    overrides = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none", "generate.temperature=0.7",
                 "chat_template=custom", f"chat_template.template={CHATML_TEMPLATE!r}"]  # fmt: skip
    cfg = validate(_user_config(overrides))
    recipe = GRPORecipe(cfg, tmp_path)
    recipe.setup()
    try:
        examples = recipe.task.sample(2)
        torch.manual_seed(123)
        ours = recipe.collect(examples)
        model, tokenizer = load_model_and_tokenizer(cfg)
        built = build_policy(cfg, "generate", model=model, tokenizer=tokenizer)
        torch.manual_seed(123)
        theirs = built(recipe._prompt_batch(examples)).reshape(-1)
    finally:
        recipe.cleanup()
    assert list(ours["text"]) == list(theirs["text"]) and "<|im_start|>assistant" in ours["text"][0]
    assert torch.equal(ours["tokens_response"], theirs["tokens_response"])
    assert torch.equal(ours["log_probs"], theirs["log_probs"])
    assert built.log_probs_temperature == recipe.policy.log_probs_temperature == 0.7


def test_conversations_from_a_messages_column_train(saved_tiny, tmp_path):
    """task=hf_dataset with a messages column: conversations of different lengths render through the
    chat template (system prompt added only where the conversation has none) and train."""

    rows = []
    for i in range(12):
        turns = [{"role": "user", "content": f"{i}+1="}]
        if i % 2:
            turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                     {"role": "assistant", "content": "hello"}, *turns]  # fmt: skip
        rows.append({"messages": turns, "answer": str(i + 1)})
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    overrides = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none", "task=hf_dataset",
                 f"task.path={data}", "task.prompt_field=null", "task.messages_field=messages",
                 "chat_template=custom", f"chat_template.template={CHATML_TEMPLATE!r}",
                 "chat_template.system_prompt=Answer with a number."]  # fmt: skip
    recipe, _ = run_recipe(validate(_user_config(overrides)), tmp_path / "run")
    examples = recipe.task.train_examples + recipe.task.eval_examples
    short = next(e for e in examples if len(e.messages) == 1)
    long = next(e for e in examples if len(e.messages) > 1)
    texts = sorted(set(recipe.policy(recipe._prompt_batch([short, long])).reshape(-1)["text"]))
    assert [t.count("<|im_start|>system") for t in texts] == [1, 1]
    assert {"Answer with a number." in t for t in texts} == {True, False}  # added only where none was given
    assert any("<|im_start|>assistant\nhello" in t for t in texts)
    assert read_metrics(tmp_path / "run")[-1]["step"] == 2
    plain = [o for o in overrides if not o.startswith("chat_template")]
    with pytest.raises(ValueError, match="chat template"):
        GRPORecipe(validate(_user_config(plain)), tmp_path / "plain")
