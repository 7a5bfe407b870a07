"""records.scratch_dir and atomic_path: what a killed job left does not survive its rerun."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from diffcleanse.records import atomic_path, scratch_dir

CHILD = """
import sys, time
from diffcleanse.records import scratch_dir
with scratch_dir(sys.argv[1], "job") as d:
    (d / "half-written.bin").write_bytes(b"x" * 1024)
    print(d, flush=True)
    time.sleep(60)
"""


def test_a_killed_jobs_scratch_is_cleared_by_the_rerun_and_gone_after_it(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True)
    left = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)  # nothing runs the context manager's cleanup
    proc.wait(timeout=30)
    assert (left / "half-written.bin").exists()  # the kill left it, as a preempted job does
    assert left.name.startswith(".")  # hidden: never listed among a stage's outputs
    with scratch_dir(tmp_path, "job") as d:
        assert d == left and list(d.iterdir()) == []  # the rerun starts empty
        (d / "new.bin").write_bytes(b"y")
    assert not d.exists() and list(tmp_path.iterdir()) == []


def test_scratch_is_removed_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), scratch_dir(tmp_path, "job") as d:
        (d / "f").write_text("x")
        raise RuntimeError("stage failed")
    assert not d.exists()


KILLED_WRITER = """
import sys, time
from diffcleanse.records import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.mkdir()
    (tmp / "weights.bin").write_bytes(b"x" * 4096)
    print(tmp, flush=True)
    time.sleep(60)
"""


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path: Path) -> None:
    final = tmp_path / "pruned"
    other = tmp_path / ".pruned_other.abcdefgh.tmp"  # another output's temporary: not touched
    other.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(final)],
                            stdout=subprocess.PIPE, text=True)
    left = Path(proc.stdout.readline().strip()).parent
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert left.name.startswith(".pruned.") and (left / "pruned/weights.bin").exists()
    with atomic_path(final) as tmp:
        assert not left.exists()  # the dead attempt's model is gone before the new one is written
        tmp.write_text("done")
    assert final.read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "pruned"]
