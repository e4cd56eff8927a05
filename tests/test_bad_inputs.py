"""Bad-input catalogue for the CLI/config + data + run level (the wrapper API has its own file).

Every case asserts the error type, that the message names the offending key (or file/line), and
that it is raised before the model weights are loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import validate
from pipeline.recipe import GRPORecipe
from tests.helpers import SMALL_RUN, compose_train


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


GOOD = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(20)]

# (id, overrides or a function of tmp_path returning them, error type, regex the message must match)
CASES = [
    ("jsonl-missing-file", lambda t: ["task=jsonl", f"task.path={t / 'nope.jsonl'}"], FileNotFoundError, "nope.jsonl"),
    ("jsonl-missing-answer", lambda t: ["task=jsonl", f"task.path={_jsonl(t / 'd.jsonl', [*GOOD, {'prompt': 'x'}])}"],
     ValueError, r"d\.jsonl:21: missing key 'answer'"),
    ("jsonl-empty-prompt", lambda t: ["task=jsonl", f"task.path={_jsonl(t / 'd.jsonl', [{'prompt': ' ', 'answer': '1'}, *GOOD])}"],
     ValueError, r"d\.jsonl:1: 'prompt' is empty"),
    ("jsonl-invalid-json", lambda t: ["task=jsonl", f"task.path={_jsonl(t / 'd.jsonl', [*GOOD[:3], '{oops'])}"],
     ValueError, r"d\.jsonl:4: invalid JSON"),
    ("jsonl-prompt-not-string", lambda t: ["task=jsonl", f"task.path={_jsonl(t / 'd.jsonl', [{'prompt': [1], 'answer': '1'}])}"],
     ValueError, r"'prompt' must be a string"),
    ("jsonl-empty-file", lambda t: ["task=jsonl", f"task.path={_jsonl(t / 'd.jsonl', [])}"], ValueError, "no examples"),
    ("jsonl-wrong-prompt-key", lambda t: ["task=jsonl", f"task.path={_jsonl(t / 'd.jsonl', GOOD)}", "task.prompt_key=question"],
     ValueError, "missing key 'question'"),
    ("jsonl-missing-eval-file", lambda t: ["task=jsonl", f"task.path={_jsonl(t / 'd.jsonl', GOOD)}", f"task.eval_path={t / 'ev.jsonl'}"],
     FileNotFoundError, "ev.jsonl"),
    ("jsonl-eval-takes-all", lambda t: ["task=jsonl", f"task.path={_jsonl(t / 'd.jsonl', GOOD[:1])}"], ValueError, "eval_fraction"),
    ("prompt-longer-than-context", lambda t: ["task=jsonl", f"task.path={_jsonl(t / 'd.jsonl', [{'prompt': 'x' * 300, 'answer': '1'}, *GOOD])}"],
     ValueError, r"generate\.max_new_tokens=4 .* context of 256"),
    ("model-path-missing", ["model.name_or_path=/no/such/model"], ValueError, r"model\.name_or_path='/no/such/model'"),
    ("model-builtin-unknown", ["model.name_or_path=builtin://nope"], ValueError, r"model\.name_or_path='builtin://nope'"),
    ("tokenizer-path-missing", ["tokenizer.name_or_path=/no/such/tokenizer"], ValueError, r"tokenizer\.name_or_path"),
    ("reward-target-unknown", ["reward.functions.exact._target_=pipeline.rewards.nope"], ValueError, r"reward\.functions\.exact"),
    ("reward-param-typo", ["+reward.functions.format.patern=x"], ValueError, r"reward\.functions\.format.*patern"),
    ("resume-path-missing", lambda t: [f"trainer.resume={t / 'checkpoints' / 'step_000009'}"], ValueError, r"trainer\.resume"),
    ("resume-not-a-checkpoint", lambda t: [f"trainer.resume={t}"], ValueError, r"trainer\.resume=.* not a complete checkpoint"),
    ("cuda-on-cpu-machine", ["model.device=cuda"], ValueError, r"model\.device='cuda'"),
    ("chat-template-missing", ["chat_template=tokenizer"], ValueError, r"chat_template=tokenizer"),
    ("generate-extra-typo", ["+generate.extra.no_repeat_ngram=3"], ValueError, r"generate\.extra"),
]  # fmt: skip


@pytest.mark.parametrize(("overrides", "err", "needle"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_run_input(saved_tiny, tmp_path, overrides, err, needle):
    import torch

    if "cuda" in str(overrides) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    extra = overrides(tmp_path) if callable(overrides) else overrides
    base = [*SMALL_RUN, f"model.name_or_path={saved_tiny}", "logger=none"]
    recipe = None
    with pytest.raises(err, match=needle):
        recipe = GRPORecipe(validate(compose_train([*base, *extra])), tmp_path / "run")
        recipe.setup()
    assert recipe is None or not hasattr(recipe, "model")  # raised before the weights were loaded
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_catalogue_size():
    from tests.test_bad_inputs_wrapper import CASES as WRAPPER
    from tests.test_config import test_bad_ranges_fail_at_validation_naming_the_key as ranges
    from tests.test_config import test_typos_and_wrong_types_fail_at_composition as typos

    config_cases = sum(
        len(m.args[1]) for t in (ranges, typos) for m in t.pytestmark if m.name == "parametrize"
    )
    assert len(CASES) + len(WRAPPER) + config_cases >= 30
