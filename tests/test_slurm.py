"""The SLURM path, end to end, on a real (local, single-node) SLURM cluster.

Runs the toy workflow tests/data/slurm_toy/Snakefile through profiles/slurm-cpu-test and
compares it with a local run. Needs a cluster:

    bash scripts/slurm-up.sh
    .venv/bin/pytest tests/test_slurm.py -q -m slurm

Skipped (with the reason) when `sinfo` is not on PATH or the controller does not answer.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from slurm_helpers import (
    CLUSTER_PROFILE,
    CPU_TEST_PROFILE,
    SnakemakeRun,
    cluster_lock,
    differing_files,
    require_slurm,
    run_snakemake,
    run_with_profile,
)

pytestmark = pytest.mark.slurm

TOY = Path(__file__).parent / "data" / "slurm_toy"
TOY_OUTPUTS = ["data.txt", "model.txt", "eval.txt", "report.txt"]
TOY_SLURM_RULES = ["make_data", "train_model", "evaluate", "report"]  # `all` is a local rule
GPU_RULES = ["train_model", "invert_trigger", "importance", "finetune", "evaluate"]


@pytest.fixture(scope="module")
def slurm_cluster() -> Iterator[None]:
    """The cluster, held by this module while its tests run (``cluster_lock``: the smoke-run
    tests of the other xdist worker submit to it too)."""
    require_slurm()
    with cluster_lock():
        yield


def _copy_toy(dest: Path) -> Path:
    shutil.copytree(TOY, dest)
    return dest


@pytest.fixture(scope="module")
def toy_runs(slurm_cluster, tmp_path_factory) -> tuple[SnakemakeRun, SnakemakeRun]:
    """The toy workflow once through the CPU-test profile, once locally with --cores 1."""
    base = tmp_path_factory.mktemp("slurm_toy")
    on_slurm = run_with_profile(_copy_toy(base / "slurm"), timeout=600)
    local = run_snakemake(
        _copy_toy(base / "local"), cores=1, extra_args=["--retries", "2"], timeout=180
    )
    return on_slurm, local


def test_toy_workflow_succeeds_through_slurm_and_matches_local_run(toy_runs):
    on_slurm, local = toy_runs
    on_slurm.check()
    local.check()
    for name in TOY_OUTPUTS:
        assert (on_slurm.workdir / "results" / name).is_file(), name
    assert differing_files(on_slurm.workdir / "results", local.workdir / "results") == []
    assert (on_slurm.workdir / "results" / "report.txt").read_text().splitlines() == [
        "weights 210",
        "20",
        "report written on attempt 2",
    ]


def test_slurm_really_ran_every_job(toy_runs):
    on_slurm, _ = toy_runs
    on_slurm.check()
    assert all(on_slurm.jobids_of(rule) for rule in TOY_SLURM_RULES), on_slurm.tail()
    assert len(on_slurm.submissions) == len(TOY_SLURM_RULES) + 1, on_slurm.tail()  # + a retry
    # train_model is in the profiles' group "model-{model}": a group job of one rule
    assert [n for n, _, _ in on_slurm.submissions if n.startswith("model-")] == [
        "model-model_train_model"], on_slurm.submissions
    for jobid, info in on_slurm.jobs.items():
        if not info:  # forgotten by SLURM already (MinJobAge): nothing to check
            continue
        assert info["NodeList"] == "localhost", (jobid, info)
        assert info["JobState"] in {"COMPLETED", "FAILED"}, (jobid, info)
        assert info["Comment"].startswith("rule_"), (jobid, info)
    assert any(on_slurm.jobs.values()), "scontrol knew none of the run's jobs"
    # The plugin keeps the SLURM log of a failed job: the first attempt of `report` failed.
    first_report = on_slurm.jobids_of("report")[0]
    log = on_slurm.workdir / "logs" / "slurm" / "rule_report" / f"{first_report}.log"
    assert log.is_file()
    assert "failing on purpose to test retries" in log.read_text()


def test_retry_resubmits_with_attempt_and_more_memory(toy_runs):
    on_slurm, _ = toy_runs
    on_slurm.check()
    report_jobs = on_slurm.jobids_of("report")
    assert len(report_jobs) == 2, on_slurm.tail()
    assert on_slurm.failed_rules == ["report"]
    assert "Trying to restart job" in on_slurm.log
    first, second = (on_slurm.jobs[j] for j in report_jobs)
    if first and second:
        assert (first["JobState"], first["MinMemoryNode"]) == ("FAILED", "2000M")
        assert (second["JobState"], second["MinMemoryNode"]) == ("COMPLETED", "4000M")


def test_gpu_rules_are_submitted_without_gpu(toy_runs):
    on_slurm, _ = toy_runs
    on_slurm.check()
    for rule in ("train_model", "evaluate"):
        (jobid,) = on_slurm.jobids_of(rule)
        info = on_slurm.jobs[jobid]
        if info:
            assert "gpu" not in info.get("TRES", ""), info
            assert info.get("TresPerJob", "") in ("", "(null)"), info


def test_failing_rule_is_reported_and_snakemake_exits_nonzero(slurm_cluster, tmp_path):
    # --retries 0: retries after a failure are covered by `report` above, and each failed
    # attempt costs a growing status interval (the plugin resets it only when a job succeeds;
    # with the profile's 2 retries this test took 110 s instead of about 40 s).
    bound = 180
    run = run_with_profile(
        _copy_toy(tmp_path / "toy"), ["always_fails"], extra_args=["--retries", "0"], timeout=bound
    )
    assert run.returncode != 0, run.tail()
    assert run.seconds < bound
    assert run.failed_rules == ["always_fails"], run.tail()
    assert re.search(r"SLURM-job '\d+' failed, SLURM status is: 'FAILED'", run.log)
    assert len(run.jobids_of("always_fails")) == 1
    assert not (tmp_path / "toy" / "results" / "never.txt").exists()
    # Nothing of this run is left in the queue.
    queue = subprocess.run(
        ["squeue", "-h", "--name", run.run_id, "-t", "PENDING,RUNNING", "-o", "%i"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert queue.stdout.strip() == ""
    # The SLURM logs of the failed attempts are kept.
    for jobid in run.jobids_of("always_fails"):
        log = tmp_path / "toy" / "logs" / "slurm" / "rule_always_fails" / f"{jobid}.log"
        assert "always_fails: failing on purpose" in log.read_text()


def test_profiles_resolve_gpu_and_placeholders(slurm_cluster, tmp_path):
    """Dry runs: the cluster profile keeps gpu=1 and its placeholders; the test one sets gpu=0."""
    cluster = run_snakemake(
        _copy_toy(tmp_path / "cluster"), profile=CLUSTER_PROFILE, extra_args=["-n"], timeout=120
    ).check()
    test = run_snakemake(
        _copy_toy(tmp_path / "test"), profile=CPU_TEST_PROFILE, extra_args=["-n"], timeout=120
    ).check()

    def resources(log: str, rule: str) -> str:
        m = re.search(rf"rule {rule}:\n(?:.*\n)*?\s+resources: (.*)", log)
        assert m, rule
        return m.group(1)

    assert "gpu=1" in resources(cluster.log, "train_model")
    assert "slurm_partition=EDIT_ME" in resources(cluster.log, "train_model")
    assert "gpu=0" in resources(test.log, "train_model")
    assert "gpu=0" in resources(test.log, "evaluate")
    assert "slurm_partition" not in resources(test.log, "train_model")
    profile_text = (CPU_TEST_PROFILE / "config.yaml").read_text()
    for rule in GPU_RULES:
        assert re.search(rf"^  {rule}:\n    gpu: 0$", profile_text, re.MULTILINE), rule


def test_toy_workflow_with_plugin_default_sacct_status(slurm_cluster, tmp_path):
    """With accounting (`bash scripts/slurm-up.sh --accounting`): the plugin's default status
    command, sacct, as on a production cluster. Skipped on the fast path without accounting."""
    probe = subprocess.run(
        ["sacct", "-n", "-X", "-S", "now"], capture_output=True, text=True, timeout=15
    )
    if probe.returncode != 0:
        pytest.skip(f"no SLURM accounting here ({probe.stderr.strip() or 'sacct failed'})")
    run = run_with_profile(
        _copy_toy(tmp_path / "toy"), extra_args=["--slurm-status-command", "sacct"], timeout=600
    ).check()
    assert {rule for rule, _, _ in run.submissions} == set(TOY_SLURM_RULES)
    assert "Falling back" not in run.log
    assert re.search(r"SLURM status is: 'FAILED'\. Reason", run.log)  # sacct gives the details
    report = (run.workdir / "results" / "report.txt").read_text()
    assert report.endswith("report written on attempt 2\n")
