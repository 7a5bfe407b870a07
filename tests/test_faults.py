"""Faults (issue 15, item 1), each through the real workflow on config/smoke.yaml.

* SIGKILL in the middle of one job of every heavy rule (the rules that request a GPU, read from
  the DAG; every inversion method separately), then reruns: nothing of a killed job is left
  looking complete, checkpointed jobs resume from their checkpoint, and the final records equal
  those of the uninterrupted reference run (``smoke_run``). One fresh run of one job of every
  stage and what it needs serves all kills (``fault_helpers.killed_and_resumed_run``, shared
  with test_determinism.py).
* A second ``snakemake`` on the same directory while the first runs: refused, nothing corrupted.
* A full disk (a tmpfs of a few KB mounted over one job's output folder) while the job writes:
  no half-written file, and the error names the path.
* A SLURM job requeued (``scontrol requeue``) mid-run resumes from its checkpoint (marked slurm).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from fault_helpers import (
    descendants,
    differences,
    edges,
    full_dag,
    killed_and_resumed_run,
    output_files,
    reference_seconds,
    temporaries,
)
from workflow_helpers import SNAKEMAKE, file_digest

pytestmark = pytest.mark.slow
CONFIG = "config/smoke.yaml"


@pytest.fixture(scope="module")
def killed_run(smoke_run, tmp_path_factory):
    return killed_and_resumed_run(smoke_run, tmp_path_factory.mktemp("second-run"))


def test_one_job_of_every_heavy_rule_was_killed_mid_job(killed_run):
    run = killed_run
    assert run.victims, "the DAG has no heavy (gpu) rules: the fault matrix tests nothing"
    assert {k.job.key for k in run.kills} == {v.key for v in run.victims}, run.log()
    for k in run.kills:
        if k.checkpoint is None:  # killed that far through its reference wall time
            assert k.at_seconds >= k.frac * k.reference_seconds, k
    assert run.passes[-1].returncode == 0, run.log()
    for k in run.kills:  # Snakemake noticed every kill
        assert run.passes[k.pass_index].returncode != 0, (str(k.job), run.log())
        assert f"Error in rule {k.job.rule}:" in run.passes[k.pass_index].stdout, str(k.job)


def test_no_output_of_a_killed_job_is_left_looking_complete(killed_run):
    for k in killed_run.kills:
        assert k.outputs_left == [], (str(k.job), k.outputs_left)
        for t in k.temporaries_left:  # records.atomic_path / scratch_dir: hidden
            assert Path(t).name.startswith("."), t
        # the rerun cleared whatever the kill left (a preempted job's model would pile up)
        assert temporaries(killed_run.workdir, k.job) == [], str(k.job)


def test_killed_jobs_rerun_to_the_records_of_the_uninterrupted_run(killed_run, smoke_run):
    run = killed_run
    graph = edges(run.jobs)
    for k in run.kills:
        below = descendants(graph, [k.job]) & run.cover.jobs
        files = output_files(run.workdir, below) | output_files(smoke_run, below)
        diff = differences(smoke_run, run.workdir, files)
        assert not diff, (str(k.job), diff)


def test_checkpointed_jobs_resumed_from_their_checkpoint(killed_run):
    resumed = [k for k in killed_run.kills if k.checkpoint]
    assert any(k.job.rule == "train_model" for k in resumed), killed_run.kills
    for k in resumed:
        log = (killed_run.workdir / k.job.log[0]).read_text()
        assert re.search(rf"resumed from {re.escape(k.checkpoint)}\S* at step [1-9]", log), (
            str(k.job), log[-2000:])


def test_a_second_snakemake_on_the_same_directory_is_refused(killed_run):
    second = killed_run.second_snakemake
    assert second is not None, "no job was seen running during the first pass"
    assert second.returncode != 0
    assert "LockException" in second.stdout or "cannot be locked" in second.stdout, second.stdout
    assert "--unlock" in second.stdout  # the message says how to recover
    # nothing corrupted: the first run's records are checked against the reference
    # (test_killed_jobs_rerun_to_the_records_of_the_uninterrupted_run, test_determinism.py)


# ---------------------------------------------------------------- a full disk


def _copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


def _disk_victim(run: Path, jobs) -> tuple:
    """The quickest job writing a file of at least 32 KB alone in a folder whose parent holds
    nothing else (the tmpfs goes on the parent: Snakemake removes an output folder it cannot
    fill, and a mount point cannot be removed)."""
    best = None
    for j in jobs:
        if not j.outputs or j.rule == "all":
            continue
        parents = {Path(o).parent for o in j.outputs}
        if len(parents) != 1:
            continue
        folder = parents.pop()
        siblings = {p.name for p in (run / folder).iterdir() if not p.name.startswith(".")}
        above = {p.name for p in (run / folder.parent).iterdir() if not p.name.startswith(".")}
        if siblings != {Path(o).name for o in j.outputs} or above != {folder.name}:
            continue
        sizes = [(run / o).stat().st_size for o in j.outputs if (run / o).is_file()]
        if not sizes or max(sizes) < 32 << 10:
            continue
        t = reference_seconds(run, j)
        if best is None or t < best[0]:
            best = (t, j, folder)
    assert best, "no job writes a file of 32 KB or more alone in a folder"
    return best[1], best[2]


def test_a_full_disk_leaves_no_half_written_file_and_names_the_path(smoke_run, tmp_path):
    wd = _copy_run(smoke_run, tmp_path / "wd")
    job, folder = _disk_victim(wd, full_dag(smoke_run, "--configfile", CONFIG))
    mnt = wd / folder.parent
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); see docs/faults.md")
    try:
        run = subprocess.run([*SNAKEMAKE, "--cores", "1", "--configfile", CONFIG,
                              "--keep-incomplete", *job.outputs], cwd=wd, capture_output=True,
                             text=True, timeout=900)
        left = sorted(p.relative_to(mnt).as_posix() for p in mnt.rglob("*") if p.is_file())
        half_written = differences(smoke_run / folder.parent, mnt, left)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out
    log = (wd / job.log[0]).read_text() if job.log and (wd / job.log[0]).is_file() else ""
    assert "No space left on device" in log, log[-3000:]
    assert "Traceback" not in out.split("Error in rule", 1)[-1], out[-3000:]  # Snakemake itself
    # with --keep-incomplete Snakemake leaves whatever the job left: only complete files, no
    # scratch
    assert not half_written, (left, half_written)
    assert not [n for n in left if any(part.startswith(".") for part in Path(n).parts)], left
    assert str(folder) in log, ("the error does not name the output", log[-3000:])
    # with room on the disk again (the tmpfs unmounted; the copy's old outputs, hidden by it,
    # removed) the same command completes
    shutil.rmtree(wd / folder)
    rerun = subprocess.run([*SNAKEMAKE, "--cores", "1", "--configfile", CONFIG,
                            "--rerun-incomplete", *job.outputs], cwd=wd, capture_output=True,
                           text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert not differences(smoke_run, wd, set(job.outputs))


# ---------------------------------------------------------------- SLURM requeue


@pytest.mark.slurm
def test_a_requeued_slurm_job_resumes_from_its_checkpoint(smoke_run, cluster, tmp_path):
    from slurm_helpers import CPU_TEST_PROFILE, scontrol_job

    wd = _copy_run(smoke_run, tmp_path / "wd")
    model = "smoke-clean"
    for p in (f"results/models/{model}/model", f"results/models/{model}/card.json",
              f"results/checkpoints/train_model/{model}"):
        target = wd / p
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    log_file = wd / f"results/logs/train_model/{model}.log"
    log_file.unlink()
    state = wd / f"results/checkpoints/train_model/{model}/state.json"
    env = {k: v for k, v in os.environ.items() if k != "SNAKEMAKE_PROFILE"}
    proc = subprocess.Popen([*SNAKEMAKE, f"results/models/{model}/card.json", "--profile",
                             str(CPU_TEST_PROFILE), "--configfile", CONFIG], cwd=wd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    chunks: list[str] = []
    import threading

    reader = threading.Thread(target=lambda: chunks.extend(iter(proc.stdout.readline, "")),
                              daemon=True)
    reader.start()
    jobid, step, deadline = None, None, time.monotonic() + 900
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"submitted with SLURM jobid (\d+)", "".join(chunks))
            if m and state.is_file() and step is None:
                jobid = m.group(1)
                step = json.loads(state.read_text())["step"]
                subprocess.run(["scontrol", "requeue", jobid], check=True, timeout=30)
                # A requeued job waits 120 s (SLURM's requeue delay) unless released. The
                # release only counts once the requeue is done (the job is PENDING again, after
                # its processes ended: about 3 s for a training job); released earlier, the
                # requeue resets the begin time and the test waits the 120 s (seen: 2.5 min).
                released = time.monotonic() + 60
                while scontrol_job(jobid).get("JobState") != "PENDING" \
                        and time.monotonic() < released:
                    time.sleep(0.2)
                subprocess.run(["scontrol", "update", f"jobid={jobid}", "StartTime=now"],
                               check=True, timeout=30)
            time.sleep(0.5)
        proc.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            if jobid:
                subprocess.run(["scancel", jobid], timeout=30)
    reader.join(timeout=30)
    out = "".join(chunks)
    assert jobid and step, f"the training job never wrote a checkpoint:\n{out[-3000:]}"
    assert proc.returncode == 0, out[-3000:]
    assert len(re.findall(r"submitted with SLURM jobid", out)) == 1, out  # SLURM, not a retry
    info = scontrol_job(jobid)
    if info:
        assert info.get("Restarts") == "1", info
    log = log_file.read_text()
    assert re.search(rf"resumed from results/checkpoints/train_model/{model} at step "
                     rf"({step}|[1-9]\d*)", log), log[-3000:]
    card = json.loads((wd / f"results/models/{model}/card.json").read_text())
    assert card["training"]["resumed_from_step"] >= step
    name = f"results/models/{model}/model/unet/diffusion_pytorch_model.safetensors"
    assert file_digest(wd / name) == file_digest(smoke_run / name)
