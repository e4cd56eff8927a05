"""scripts/bench_grpo.py runs end to end on its tiny preset (numbers are printed, never asserted).

Our side and the scaling table always run; the side-by-side comparison with TRL runs only where TRL is
installed (the `bench` extra), since CI installs `.[dev]` only.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUM = r"\d+\.\d+"


def run_bench(*args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled"}  # fmt: skip
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_grpo.py"), "--tiny", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def row(out: str, side: str) -> re.Match:
    rows = [line for line in out.splitlines() if re.match(rf"{side}\s+{NUM}\s", line)]
    assert len(rows) == 2, f"{side!r}: expected a table row and a breakdown row:\n{out}"  # table + breakdown
    # side, median step s, ours/TRL, peak MB, step IQR, peak range, loop s/step
    cells = re.match(
        rf"{side}\s+({NUM})\s+(-|{NUM})\s+({NUM})\s+{NUM}-{NUM}\s+{NUM}-{NUM}\s+({NUM})$", rows[0]
    )
    assert cells, f"non-numeric cells in {rows[0]!r}"
    return cells


def test_ours_and_scaling_without_trl():
    out = run_bench("--only", "ours")
    assert re.search(r"^side\s+median step s\s+ours/TRL\s+peak MB", out, re.M), out
    cells = row(out, "ours")
    assert cells[2] == "-" and float(cells[1]) > 0
    assert "not measured (one side only)" in out
    assert "check: every completion has 4 tokens on every side: yes" in out
    assert "aligned: ours [sizes] 2 prompts x 2 samples = 4 sequences/step" in out
    # scaling: 2 x 2 points of the tiny grid, then the two least-squares fits
    points = re.findall(
        rf"^\s+(\d+)\s+(\d+)\s+(\d+)\s+({NUM})\s+{NUM}\s+{NUM}\s+{NUM}\s+({NUM})\s+{NUM}$", out, re.M
    )
    assert [(int(n), int(length)) for n, length, *_ in points] == [(2, 4), (2, 8), (4, 4), (4, 8)], out
    assert all(int(nl) == int(n) * int(length) for n, length, nl, *_ in points)
    for name in ("step time", "peak memory"):
        assert re.search(rf"fit {name}: .* R\^2 = -?{NUM}; max relative residual = {NUM}%", out), out


def test_ours_vs_trl_side_by_side():
    pytest.importorskip("trl")
    for module in ("datasets", "accelerate"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed")
    out = run_bench("--no-scaling")
    ours, trl = row(out, "ours"), row(out, "trl")
    assert float(trl[2]) == 1.0
    # the printed medians are rounded to 1e-4 s: the ratio agrees within that rounding
    o, t = float(ours[1]), float(trl[1])
    assert (o - 5e-5) / (t + 5e-5) - 5e-4 <= float(ours[2]) <= (o + 5e-5) / (t - 5e-5) + 5e-4
    assert re.search(r"target: ours/TRL step time <= 0\.7: (PASS|FAIL) \(" + NUM + r"\); our peak memory <= "
                     r"TRL's: (PASS|FAIL)", out), out  # fmt: skip
    assert "check: every completion has 4 tokens on every side: yes" in out
    assert "check: trl: dropout active False, gradient checkpointing False, dtype torch.float32" in out
    assert "check: TRL extra old-log-prob forwards: none" in out
    for key in ("gradient_checkpointing=False", "bf16=False", "disable_dropout=True", "use_bias_correction_kl=False",
                "loss_type='dapo'", "beta = our algo.kl_coef"):  # fmt: skip
        assert key in out, key
    assert "scaling (ours)" not in out


def test_profile_prints_the_ops_of_the_profiled_steps():
    """``--profile`` once printed an empty table: the profiler was stopped twice, which discards it."""
    out = run_bench("--only", "ours", "--no-scaling", "--profile", "5")
    table = out[out.index("profile ours (torch.profiler") :]
    # rows: ops, and the phase ranges of the recipe (their self time: Python and untraced work)
    ops = re.findall(r"^\s*(\S.*?)\s+\d+\.\d+%\s", table, re.M)
    assert len(ops) == 5, table
    assert any(op.startswith("aten::") for op in ops), table
    # our self time per phase, each with its top ops: the model's matrix products among them
    phases = re.findall(r"^  (\w+): (\d+\.\d) ms$", table, re.M)
    assert {"collect", "ref", "update"} <= {name for name, _ in phases}, table
    assert re.search(r"^  update: [\d.]+ ms\n\s+\d+\.\d\d  \S", table, re.M), table
    assert re.search(r"^\s+\d+\.\d\d  aten::(addmm|mm|linear)$", table, re.M), table
