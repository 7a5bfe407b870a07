"""Incremental reruns and resumable jobs, checked against Snakemake's own plan and real kills."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from workflow_helpers import (
    SNAKEMAKE,
    changed_config,
    file_digest,
    planned_jobs,
    run_snakemake,
    workdir_copy,
)

pytestmark = pytest.mark.slow
MODEL_FILE = "results/models/{}/model/unet/diffusion_pytorch_model.safetensors"


def test_unchanged_rerun_plans_nothing(smoke_run):
    assert planned_jobs(smoke_run, "--configfile", "config/smoke.yaml") == set()


def test_changing_a_gallery_parameter_reruns_only_the_galleries(smoke_run):
    cfg = changed_config(smoke_run, "gallery-changed", **{"gallery.n_samples": 3})
    jobs = planned_jobs(smoke_run, "--configfile", cfg)
    rules = {r for r, _ in jobs}
    assert ("gallery", "model=smoke-clean") in jobs and ("gallery", "model=smoke-bd") in jobs
    assert rules <= {"gallery", "all", "report"}, jobs  # nothing upstream (no training)


def test_changing_one_models_row_reruns_that_model_and_its_descendants_only(smoke_run):
    manifest = (smoke_run / "config/zoo-smoke.tsv").read_text()
    lines = manifest.splitlines()
    header = lines[0].split("\t")
    col = header.index("train_steps")
    out = [lines[0]]
    for line in lines[1:]:
        f = line.split("\t")
        if f[0] == "smoke-bd":
            f[col] = str(int(f[col]) + 10)
        out.append("\t".join(f))
    (smoke_run / "config/zoo-changed.tsv").write_text("\n".join(out) + "\n")
    cfg = changed_config(smoke_run, "row-changed", manifest="config/zoo-changed.tsv")
    jobs = planned_jobs(smoke_run, "--configfile", cfg)
    assert ("train_model", "model=smoke-bd") in jobs
    assert not any("smoke-clean" in w for _, w in jobs), jobs  # the other model is untouched
    assert ("gallery", "model=smoke-bd") in jobs


def _train_processes(workdir: Path) -> list[int]:
    """PIDs of train_model script processes running in ``workdir``."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if "train_model" in cmd and "python" in cmd and Path(cwd) == workdir:
            pids.append(int(d.name))
    return pids


def test_killed_training_resumes_from_its_checkpoint_and_matches(smoke_run, tmp_path):
    """SIGKILL a training job half-way (as an OOM kill or preemption would), rerun the workflow:
    the job resumes from its last checkpoint and ends with the same weights as the smoke run."""
    wd = workdir_copy(tmp_path / "wd")
    target = "results/models/smoke-clean/card.json"
    args = [*SNAKEMAKE, target, "--cores", "1", "--configfile", "config/smoke.yaml"]
    proc = subprocess.Popen(
        args,
        cwd=wd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    state = wd / "results/checkpoints/train_model/smoke-clean/state.json"
    deadline = time.monotonic() + 600
    killed = []
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file():
            killed = _train_processes(wd)
            for pid in killed:
                os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=600)
    assert killed, f"no training process was found to kill:\n{out}"
    assert proc.returncode != 0 and not (wd / target).exists(), out
    import json

    step = json.loads(state.read_text())["step"]
    assert 0 < step < 300
    run_snakemake(
        wd, "--cores", "1", "--configfile", "config/smoke.yaml", "--rerun-incomplete", target
    )
    log = (wd / "results/logs/train_model/smoke-clean.log").read_text()
    assert f"resumed from results/checkpoints/train_model/smoke-clean at step {step}" in log
    card = json.loads((wd / target).read_text())
    assert card["training"]["resumed_from_step"] == step
    name = MODEL_FILE.format("smoke-clean")
    assert file_digest(wd / name) == file_digest(smoke_run / name)
