"""README stays true: its Python example runs, its set-up commands are the ones CI uses."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_wrapper_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    example = next(b for b in blocks if "TransformersWrapper(" in b)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["out"].batch_size == (2, 4)
    assert namespace["log_probs"].shape[0] == 8


def test_readme_starts_with_the_two_commands_ci_runs():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.DOTALL).group(1).splitlines()
    assert first[0].startswith("make run") and first[1].startswith("make test")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nmake test\n" in ci
    makefile = (ROOT / "Makefile").read_text()
    assert "python train.py" in makefile and "pytest -q" in makefile


def test_readme_build_policy_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    example = next(b for b in blocks if "build_policy(" in b).replace("/abs/path/to/conf", str(ROOT / "conf"))
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    out, scorer = namespace["out"], namespace["scorer"]
    assert out.batch_size == (2, 4) and scorer.generate is False
    flat = out.reshape(-1)
    scored = scorer(flat.select("tokens", "attention_mask", "tokens_response", "tokens_response_mask"))
    assert scorer.log_probs_temperature == namespace["policy"].log_probs_temperature == 0.7
    assert (scored["log_probs"] - flat["log_probs"]).abs().max() < 1e-4
