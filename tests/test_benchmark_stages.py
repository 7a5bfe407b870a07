"""benchmarks/stages.py runs every stage on the default architecture and prints a row for each."""

import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = ("sampling", "bbti-blackbox", "bbti-whitebox", "elijah", "purediffusion", "terd",
          "importance", "finetune", "fid")
DIFFERENTIATE = ("bbti-whitebox", "elijah", "purediffusion", "terd", "importance", "finetune")


def test_every_stage_prints_a_rate_and_finite_ratios():
    """The tiniest settings (batch 2, 2-step chains, one iteration, one repetition): every stage's
    row has a positive rate and a finite ratio to the forward, and the stages that differentiate a
    finite ratio to the forward+backward (no timing thresholds: this machine may be busy)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "benchmarks/stages.py", "--arch", "default", "--batch", "2",
         "--steps", "2", "--iters", "1", "--finetune-steps", "1", "--importance-steps", "1",
         "--reps", "1", "--ref-calls", "1", "--markdown"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for ln in lines[2:]:
        row = dict(zip(head, (c.strip() for c in ln.strip("|").split("|")), strict=True))
        rows[row["stage"]] = row
    assert sorted(rows) == sorted(STAGES), proc.stdout
    for stage, row in rows.items():
        assert row["architecture"] == "default" and row["batch"] == "2"
        assert float(row["evaluations/s"].replace(",", "")) > 0, row
        assert math.isfinite(float(row["x forward"])) and float(row["x forward"]) > 0, row
        if stage in DIFFERENTIATE:
            assert math.isfinite(float(row["x fwd+bwd"])) and float(row["x fwd+bwd"]) > 0, row
        else:
            assert row["x fwd+bwd"] == "-", row
        assert row["met"] in ("yes", "NO", "-")
    assert "DDPM chains of 2 strided steps" in proc.stdout
