"""The vLLM rollout engine (pipeline.vllm_engine) against the TransformersWrapper contract and log-probs.

Needs vLLM: skipped in the main venv; run with ``.venv-vllm/bin/python -m pytest -q tests/test_vllm.py``
(``make test-vllm``). The model is a random Llama saved to a folder; vLLM's CPU attention needs a head
size that is a multiple of 32, hence ``hidden=64, heads=2``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tensordict import LazyStackedTensorDict, TensorDict, lazy_stack
from torchrl.data.llm import History

from pipeline.policy import TransformersWrapper
from pipeline.tiny import CHATML_TEMPLATE, char_tokenizer, tiny_model
from pipeline.vllm_engine import VLLMWrapper

pytest.importorskip("vllm")

PROMPTS = ["12+35=", "7*8=", "a much longer prompt: 123+456=", "x"]
TOL = 1e-4  # fp32 engine vs fp32 trainer
# Engines started by a test stay alive to the end: a vLLM engine that is garbage collected tears down the
# process-wide parallel state that the other in-process engines (the module's `engine`) still use.
KEEP_ALIVE: list[VLLMWrapper] = []
MAX_NEW = 8


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer(chat_template=CHATML_TEMPLATE)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer, arch="llama", hidden=64, heads=2)


@pytest.fixture(scope="module")
def folder(model, tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(folder, tokenizer):
    kwargs = {"max_new_tokens": MAX_NEW, "do_sample": True}  # top_k unset: transformers' default 50
    return VLLMWrapper(folder, tokenizer=tokenizer, generate_kwargs=kwargs, kv_cache_gib=0.25)


def stop_ids(tokenizer) -> list[int]:
    """EOS plus the ids of every digit and a-j: a random model stops within a few tokens."""
    return [tokenizer.eos_token_id, *tokenizer.convert_tokens_to_ids(list("0123456789abcdefghij"))]


def lazy(texts: list[str]):
    """Prompts as a lazy stack: the wrappers answer with per-sample rows."""
    return lazy_stack([TensorDict(text=t) for t in texts])


MASKS = {"tokens": "attention_mask", "tokens_response": "tokens_response_mask", "log_probs": "log_probs_mask"}


def per_sample(out, key: str) -> list[torch.Tensor]:
    """``key`` of every sample, unpadded: per-sample rows of a lazy stack, or the dense rows under their mask."""
    flat = out.reshape(-1)
    if isinstance(flat, LazyStackedTensorDict):
        return flat.get(key, as_list=True)
    return [row[m.bool()] for row, m in zip(flat[key], flat[MASKS[key]])]


def hf_log_probs(model, out, temperature: float = 1.0) -> list[torch.Tensor]:
    scorer = TransformersWrapper(model, from_text=False, generate=False, log_probs_temperature=temperature)
    pairs = zip(per_sample(out, "tokens"), per_sample(out, "tokens_response"))
    flat = lazy_stack([TensorDict(tokens=t, tokens_response=r) for t, r in pairs])
    with torch.no_grad():
        return scorer(flat).get("log_probs", as_list=True)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b) if x.numel())


def test_contract_text_input_with_samples(engine, tokenizer):
    out = engine(lazy(PROMPTS[:3]), num_samples=4)
    assert out.shape == (3, 4) and isinstance(out, LazyStackedTensorDict)
    assert set(engine.out_keys) <= set(out.keys())
    flat = out.reshape(-1)
    prompts = [torch.tensor(tokenizer(t)["input_ids"]) for t in PROMPTS[:3] for _ in range(4)]
    assert all(torch.equal(p, q) for p, q in zip(flat.get("tokens", as_list=True), prompts))
    assert flat.get("text").tolist() == [t for t in PROMPTS[:3] for _ in range(4)]
    for mask, tokens in zip(flat.get("attention_mask", as_list=True), flat.get("tokens", as_list=True)):
        assert mask.shape == tokens.shape and bool(mask.all())
    responses, log_probs = flat.get("tokens_response", as_list=True), flat.get("log_probs", as_list=True)
    texts = flat.get("text_response").tolist()
    for ids, lp, text in zip(responses, log_probs, texts):
        assert 1 <= len(ids) <= MAX_NEW and lp.shape == ids.shape and lp.dtype == torch.float32
        assert bool((lp <= 0).all()) and text == tokenizer.decode(ids)
    padded = flat.get("log_probs", as_padded_tensor=True, padding_side="right")
    assert padded.shape == (12, max(len(r) for r in responses))


def test_eos_ids_end_responses_and_are_kept(engine, tokenizer, model):
    stops = stop_ids(tokenizer)
    out = engine(lazy(PROMPTS), num_samples=4, eos_token_id=stops)
    responses = out.reshape(-1).get("tokens_response", as_list=True)
    ended = [r for r in responses if int(r[-1]) in stops]
    assert len(ended) >= 8  # about 19/20 stop within 8 tokens
    for r in responses:
        inside = [int(t) in stops for t in r[:-1]]
        assert not any(inside)  # nothing after the first stop id, the stop id itself kept last
    assert max_diff(out.reshape(-1).get("log_probs", as_list=True), hf_log_probs(model, out)) <= TOL
    assert engine.generation_config.eos_token_id == tokenizer.eos_token_id  # runtime override only


def test_log_probs_equal_hf_score_mode(engine, model):
    out = engine(lazy(PROMPTS), num_samples=3)
    assert max_diff(out.reshape(-1).get("log_probs", as_list=True), hf_log_probs(model, out)) <= TOL


def test_runtime_overrides_and_greedy_matches_hf(engine, model, tokenizer):
    td = lazy(PROMPTS)
    out = engine(td, num_samples=2, max_new_tokens=3, do_sample=False)
    responses = out.get("tokens_response", as_list=True)
    assert all(len(r) <= 3 for row in responses for r in row)
    assert all(torch.equal(row[0], row[1]) for row in responses)  # greedy: the G samples agree
    hf = TransformersWrapper(
        model, tokenizer=tokenizer, generate_kwargs={"max_new_tokens": 3, "do_sample": False}
    )
    rows = lazy(PROMPTS)  # per-sample rows from the HF wrapper too
    expected = hf(rows).get("tokens_response", as_list=True)
    assert all(torch.equal(row[0], e) for row, e in zip(responses, expected))
    later = engine(td).get("tokens_response", as_list=True)  # the configured max_new_tokens again
    assert max(len(r) for r in later) > 3 and engine.num_samples is None


def test_history_zero_dim_and_token_input(engine, folder, tokenizer, model):
    history = History.from_chats([[{"role": "user", "content": "2+2?"}], [{"role": "user", "content": "hi"}]])
    out = engine(TensorDict(history=history, batch_size=[2]), num_samples=2)
    assert out.shape == (2, 2)
    assert out[0, 0]["text"].endswith("<|im_start|>assistant\n")  # the generation prompt is added
    single = engine(TensorDict(text="7*8=", batch_size=[]))
    assert single.batch_size == () and single["tokens_response"].ndim == 1
    tokens_engine = VLLMWrapper(folder, tokenizer=tokenizer, from_text=False, llm=engine.llm)
    ids = [torch.tensor(tokenizer(t)["input_ids"]) for t in PROMPTS[:2]]
    padded = torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_side="left")
    mask = torch.nn.utils.rnn.pad_sequence(
        [torch.ones_like(i) for i in ids], batch_first=True, padding_side="left"
    )
    out = tokens_engine(TensorDict(tokens=padded, attention_mask=mask, batch_size=[2]), num_samples=3)
    assert out.shape == (2, 3) and "text_response" not in out.keys()
    assert all(torch.equal(t, ids[i // 3]) for i, t in enumerate(per_sample(out, "tokens")))
    assert max_diff(per_sample(out, "log_probs"), hf_log_probs(model, out)) <= TOL


def test_engine_keeps_the_callers_rng(engine):
    state = torch.get_rng_state()
    engine(TensorDict(text=PROMPTS[:2], batch_size=[2]))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.set_num_threads.__module__.startswith("torch")  # vLLM's CPU worker no-op is undone


def test_unsupported_arguments_raise(engine, folder, tokenizer):
    td = TensorDict(text=PROMPTS[:1], batch_size=[1])
    with pytest.raises(ValueError, match="num_beams"):
        engine(td, num_beams=2)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        engine(td, no_repeat_ngram_size=2)
    with pytest.raises(ValueError, match="num_return_sequences"):
        engine(td, num_return_sequences=2)
    with pytest.raises(ValueError, match="generate\\(\\) hooks"):
        VLLMWrapper(folder, tokenizer=tokenizer, generate_kwargs={"logits_processor": []}, llm=engine.llm)
    with pytest.raises(ValueError, match="shared engine"):
        VLLMWrapper(folder, tokenizer=tokenizer, log_probs_temperature=0.5, llm=engine.llm)
    with pytest.raises(ValueError, match=r"config\.json"):
        VLLMWrapper(folder / "missing", tokenizer=tokenizer)


def test_sync_weights_tracks_the_trained_model(engine, model):
    td = TensorDict(text=PROMPTS, batch_size=[4])
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.05 * torch.randn_like(p))
    try:
        seconds = engine.sync_weights(trained)
        assert 0 < seconds < 10 and engine.syncs == 1
        out = engine(td, num_samples=3)
        engine_lp = per_sample(out, "log_probs")
        assert max_diff(engine_lp, hf_log_probs(trained, out)) <= TOL
        assert max_diff(engine_lp, hf_log_probs(model, out)) > 1e-2  # the old weights are gone
        stats = engine.verify_sync(trained)
        assert stats["max_abs_diff"] <= TOL and stats["tokens"] > 0
        with pytest.raises(RuntimeError, match="differ"):
            engine.verify_sync(model)
    finally:
        engine.sync_weights(model)


def test_log_probs_temperature_matches_hf(folder, tokenizer, model):
    """T != 1: the engine's log-probs are log_softmax(logits / T), top-p truncation not included."""
    kwargs = {"max_new_tokens": MAX_NEW, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 0}
    hot = VLLMWrapper(
        folder, tokenizer=tokenizer, generate_kwargs=kwargs, log_probs_temperature=0.7, kv_cache_gib=0.25
    )
    KEEP_ALIVE.append(hot)
    out = hot(TensorDict(text=PROMPTS, batch_size=[4]), num_samples=3)
    engine_lp = per_sample(out, "log_probs")
    assert max_diff(engine_lp, hf_log_probs(model, out, temperature=0.7)) <= TOL
    assert max_diff(engine_lp, hf_log_probs(model, out, temperature=1.0)) > 1e-2
    unset = {"temperature": None, "top_p": None, "top_k": None}  # transformers rejects them when greedy
    greedy = hot(TensorDict(text=PROMPTS, batch_size=[4]), do_sample=False, **unset)
    assert max_diff(per_sample(greedy, "log_probs"), hf_log_probs(model, greedy, temperature=0.7)) <= TOL


# ----------------------------------------------------------------------------- the dense layout
def test_dense_output_equals_lazy_output(engine, tokenizer):
    """A dense TensorDict gets the HF wrapper's padded layout, holding exactly the lazy-stack outputs."""
    state = engine._rng_state
    rows = engine(lazy(PROMPTS[:3]), num_samples=4)
    engine._rng_state = state  # the same engine RNG stream: the same samples
    dense = engine(TensorDict(text=PROMPTS[:3], batch_size=[3]), num_samples=4)
    assert not isinstance(dense, LazyStackedTensorDict) and dense.shape == (3, 4)
    for key in ("tokens", "tokens_response", "log_probs"):
        assert all(torch.equal(a, b) for a, b in zip(per_sample(dense, key), per_sample(rows, key)))
    flat = dense.reshape(-1)
    assert flat["attention_mask"].dtype == torch.long and flat["tokens_response_mask"].dtype == torch.bool
    assert torch.equal(flat["tokens_response_mask"], flat["log_probs_mask"])
    assert bool(flat["attention_mask"][:, -1].all())  # prompts left-padded
    assert bool((flat["tokens"][flat["attention_mask"] == 0] == engine.pad_token_id).all())
    assert bool((flat["log_probs"][~flat["log_probs_mask"]] == 0).all())
    assert list(flat["text_response"]) == rows.reshape(-1).get("text_response").tolist()
    assert list(flat["text"]) == [t for t in PROMPTS[:3] for _ in range(4)]
    out = TensorDict(batch_size=[3, 4])  # a dense tensordict_out is filled the same way
    assert engine(TensorDict(text=PROMPTS[:3], batch_size=[3]), out, num_samples=4) is out
    assert out["tokens_response"].ndim == 3 and "tokens_response_mask" in out.keys()


# ----------------------------------------------------------------------------- GRPO with rollout=vllm
def grpo_rows(folder, tmp_path, *extra: str, steps: int = 3) -> tuple[object, list[dict]]:
    """A GRPO run on the tiny Llama folder with ``rollout=vllm``; the recipe and its metrics rows."""
    from tests.helpers import SMALL_RUN, run_recipe

    args = [
        *SMALL_RUN,
        f"trainer.steps={steps}",
        "trainer.eval_every=0",
        "logger=none",
        f"model.name_or_path={folder}",
        "rollout=vllm",
        "rollout.kv_cache_gib=0.25",
        "optim.lr=1e-2",  # visible weight changes: a missed sync would show in the gap
        *extra,
    ]
    recipe, _ = run_recipe(args, tmp_path)
    KEEP_ALIVE.append(recipe.policy)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return recipe, [r for r in rows if "rollout/sync_time" in r]


def test_grpo_with_vllm_rollouts_fp32(folder, model, tmp_path):
    """fp32 engine, synced every step, TIS on: the engine's behaviour log-probs equal the trainer's to 1e-4
    at every step (the weights that sampled are the trainer's), so the TIS ratio is 1 and nothing is capped."""
    recipe, rows = grpo_rows(folder, tmp_path, "rollout.verify_sync_atol=1e-4", "rollout.tis_cap=2.0")
    assert isinstance(recipe.policy, VLLMWrapper) and recipe.step == 3 and len(rows) == 3
    for row in rows:
        assert 0 < row["rollout/sync_time"] < 10 and row["rollout/staleness"] == 0
        assert row["logprobs/gen_train_absdiff_max"] <= TOL
        assert row["logprobs/tis_mean_ratio"] == pytest.approx(1.0, abs=1e-3)
        assert row["logprobs/tis_capped_frac"] == 0.0
    assert recipe.policy.syncs == 4  # start-up + one per step
    assert recipe.policy.verify_sync(recipe.model, atol=TOL)["max_abs_diff"] <= TOL
    with pytest.raises(RuntimeError, match="differ"):  # the trained weights moved away from the folder's
        recipe.policy.verify_sync(model)
    # resume: the engine starts from the checkpoint's model folder, verified against the restored trainer
    resumed, rows = grpo_rows(
        folder, tmp_path, "rollout.verify_sync_atol=1e-4", "trainer.resume=auto", steps=4
    )
    assert resumed.policy.model_path == resumed.resume_from / "model" and resumed.step == 4
    assert rows[-1]["logprobs/gen_train_absdiff_max"] <= TOL


def test_grpo_sync_every_two_steps_logs_staleness(folder, tmp_path):
    """``sync_every=2``: the step-2 rollout comes from weights one step old, which the gap shows."""
    _, rows = grpo_rows(folder, tmp_path, "rollout.sync_every=2", "rollout.tis_cap=2.0")
    assert [r["rollout/staleness"] for r in rows] == [0, 1, 0]
    assert [r["rollout/sync_time"] > 0 for r in rows] == [False, True, False]
    assert rows[0]["logprobs/gen_train_absdiff_max"] <= TOL < rows[1]["logprobs/gen_train_absdiff_max"]
    assert rows[1]["logprobs/tis_mean_ratio"] != pytest.approx(1.0, abs=1e-4)
