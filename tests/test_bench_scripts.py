"""The benchmark scripts run end to end on tiny settings (their numbers are not asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"\d+\.\d+"


def test_bench_wrapper_tiny_prints_one_table():
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_wrapper.py"), "--tiny"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    header = [line for line in out.splitlines() if line.startswith("method")]
    assert len(header) == 1, out
    for label in ("(a) raw generate", "(b) generate+output_logits+log_softmax",
                  "(c) ours pipeline.TransformersWrapper", "(d) torchrl TransformersWrapper"):  # fmt: skip
        rows = [line for line in out.splitlines() if line.startswith(label)]
        assert len(rows) == 1, f"{label!r} not in the table:\n{out}"
        # median s, time/raw, paired time/raw, extra peak MB, mem/raw: all numeric
        cells = re.match(rf"{re.escape(label)}" + rf"\s+({NUMBER})" * 5, rows[0])
        assert cells, f"non-numeric cells in {rows[0]!r}"
        if label.startswith("(a)"):
            assert float(cells[2]) == float(cells[3]) == float(cells[5]) == 1.0
        if label.startswith("(c)"):
            assert re.search(r"time <= 1\.05x: (PASS|FAIL); mem <= 1\.30x: (PASS|FAIL)", rows[0]), rows[0]
    assert "same sampled tokens in all methods: yes" in out, out
    assert re.search(r"max \|log_prob\(ours\) - log_prob\(logits\)\| = (\S+)", out), out


def test_benchlib_order_statistics_and_table():
    """The shared measuring helpers: rotating order, warm-up drop, paired ratio, aligned columns."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchlib", ROOT / "scripts" / "benchlib.py")
    lib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(lib)
    order = " ".join(side for _, side in lib.alternating(["ours", "trl"], 3))
    assert order == "ours trl trl ours ours trl"
    runs = [{"steps": [{"t": 9.0}, {"t": 1.0}, {"t": 2.0}]}, {"steps": [{"t": 9.0}, {"t": 3.0}]}]
    assert [s["t"] for s in lib.kept_steps(runs)] == [1.0, 2.0, 3.0]
    assert lib.paired_ratio([2.0, 3.0, 8.0], [1.0, 3.0, 2.0]) == 2.0
    assert lib.quartiles([1.0]) == (1.0, 1.0)
    table = lib.format_table([("side", "s"), ("ours", "1.5"), ("trl", "10.25")], "<>")
    assert table == ["side      s", "ours    1.5", "trl   10.25"]


def test_bench_decode_splits_a_generation():
    """scripts/bench_decode.py: one forward call per new token (the shared prompt prefill is not one of
    the model's), and the matrix products alone take less than the model calls that contain them;
    ``--compile`` times both compiled paths against their eager ones."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    args = ["--prompts", "2", "--group", "2", "--length", "5", "--repeats", "2", "--compile"]
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_decode.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "2 prompts x G=2 = 4 rows x 5 tokens, 5 forward calls per generation" in out, out
    times = {}
    for label in ("wrapper call", "model forward calls", "of which linear layers alone", "rest of the model call",
                  "generate's loop", "wrapper around generate"):  # fmt: skip
        cells = re.search(rf"{re.escape(label)}.*?\s(-?{NUMBER})\s+(-?{NUMBER})\s+(-?{NUMBER})$", out, re.M)
        assert cells, f"{label!r} not in the table:\n{out}"
        times[label] = float(cells[1])
    assert 0 < times["of which linear layers alone"] < times["model forward calls"] < times["wrapper call"]
    # --compile: Hugging Face's static cache and our compiled decoding, each against its eager path
    assert re.search(rf"static cache \+ torch.compile {NUMBER} ms .*same tokens: True", out), out
    assert re.search(
        rf"compiled decoding \(generate.compile\) {NUMBER} ms .*same tokens for a seed: 4 of 4", out
    ), out
