"""benchmarks/run_cost.py: the per-rule sums and the occupancy of the cores, from benchmark files
whose modification times are the jobs' ends."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import run_cost  # noqa: E402

HEAD = "s\th:m:s\tmax_rss\tcpu_time\n"


def _bench(path: Path, seconds: float, cpu: float, end: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(HEAD + f"{seconds}\t0\t10\t{cpu}\n")
    os.utime(path, (end, end))


def test_occupancy_counts_the_core_seconds_no_job_held(tmp_path):
    # on 2 cores: train 0-100, invert 50-150 beside it, then a gap, then tables 200-210
    _bench(tmp_path / "train_model/a.tsv", 100, 95, 1100)
    _bench(tmp_path / "invert_trigger/a.tsv", 100, 90, 1150)
    _bench(tmp_path / "tables.tsv", 10, 9, 1210)
    costs = run_cost.read_costs(tmp_path)
    assert costs["train_model"].cpu == 95 and costs["tables"].jobs == 1
    spans = run_cost.spans(run_cost.last_rows(tmp_path))
    assert sorted(round(s) for s, _, _ in spans) == [1000, 1050, 1200]
    text = run_cost.occupancy(spans, cores=2)
    # idle: 0-50 one core (50), 100-150 one core (50), 150-200 both (100), 200-210 one (10)
    assert "span 3.5 minutes" in text and "210 core-seconds" in text
    # the longest stretch with a core free: from 100 s to 210 s (110 s), its first job listed
    assert "a core free for 110 s from minute 1.7" in text
    assert "a core free for 50 s from minute 0.0; running: train_model/a.tsv" in text
