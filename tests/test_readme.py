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
