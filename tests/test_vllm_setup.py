"""The vLLM extra from the main environment: its lock file covers the project, a missing vllm is a clear error."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.tiny import char_tokenizer, tiny_model
from pipeline.vllm_args import vllm_available
from pipeline.vllm_engine import VLLMWrapper

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[ ;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_vllm_lock_pins_every_project_dependency():
    """`make install-vllm` installs constraints-vllm.txt with --no-deps: a dependency missing there is never installed."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    needed = {_name(r) for r in [*project["dependencies"], *extras["dev"], *extras["vllm"]]}
    lines = (ROOT / "constraints-vllm.txt").read_text().splitlines()
    pinned = {_name(line) for line in lines if "==" in line and not line.startswith("#")}
    assert needed - pinned == set()
    assert not pinned & {"torchvision", "torchaudio", "torchcodec"}  # they break `import vllm`


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_missing_vllm_names_the_install_command(tmp_path):
    tokenizer = char_tokenizer()
    tiny_model(tokenizer, arch="llama", hidden=64, heads=2).save_pretrained(tmp_path)
    with pytest.raises(ImportError, match="make install-vllm"):
        VLLMWrapper(tmp_path, tokenizer=tokenizer)


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_rollout_vllm_without_vllm_fails_before_loading_a_model(tmp_path, monkeypatch):
    """rollout=vllm in an environment without vLLM: the recipe's constructor says how to install it."""
    from pipeline import build
    from pipeline.config import validate
    from pipeline.recipe import GRPORecipe
    from tests.helpers import SMALL_RUN, compose_train

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(build, "load_model", no_loading)
    cfg = validate(compose_train([*SMALL_RUN, "logger=none", "rollout=vllm"]))
    with pytest.raises(ImportError, match="make install-vllm"):
        GRPORecipe(cfg, tmp_path).setup()


def test_hf_rollout_with_tis_trains(tmp_path):
    """rollout=hf (the default) with rollout.tis_cap: the HF sampler's weights equal the trainer's, so
    the TIS ratio is 1 and nothing is capped; two optimizer steps per rollout use the no-grad pass."""
    from tests.helpers import SMALL_RUN, run_recipe

    args = [*SMALL_RUN, "logger=none", "rollout.tis_cap=2.0", "algo.ppo_epochs=2", "trainer.eval_every=0"]
    recipe, _ = run_recipe(args, tmp_path)
    assert recipe.step == 2 and recipe.algorithm.tis_pass
    assert recipe.weight_sync.sync(3) == {}  # nothing to push for the HF engine
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "logprobs/tis_mean_ratio" in r]
    assert len(steps) == 2 and "rollout/sync_time" not in steps[0]
    for row in steps:  # HF sampled with the trainer's weights: ratio 1 up to batching noise
        assert row["logprobs/tis_mean_ratio"] == pytest.approx(1.0, abs=1e-3)
        assert row["logprobs/tis_capped_frac"] == 0.0 and row["logprobs/gen_train_absdiff_max"] < 1e-3
