"""Helpers to run Snakemake through a SLURM profile in tests (see tests/test_slurm.py).

The local single-node cluster comes from ``bash scripts/slurm-up.sh``. A test of another
workflow through the CPU-test profile needs only a few lines, for example::

    from slurm_helpers import REPO_ROOT, require_slurm, run_with_profile

    @pytest.mark.slurm
    def test_smoke_config_on_slurm(tmp_path):
        require_slurm()
        run = run_with_profile(
            tmp_path,
            snakefile=REPO_ROOT / "workflow" / "Snakefile",
            configfiles=[REPO_ROOT / "config" / "smoke.yaml"],
            timeout=1800,
        )
        run.check()          # raises with the log's tail when Snakemake failed
        assert run.slurm_jobids

Every subprocess has a timeout; a Snakemake run that times out is interrupted (SIGINT, so it
cancels its SLURM jobs) and its leftover jobs are cancelled by run ID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_TEST_PROFILE = REPO_ROOT / "profiles" / "slurm-cpu-test"
CLUSTER_PROFILE = REPO_ROOT / "profiles" / "slurm"

_UP_STATES = {"idle", "mixed", "allocated", "completing"}
_SUBMITTED = re.compile(
    r"Job (?P<job>\S+) has been submitted with SLURM jobid (?P<slurm>\d+) \(log: (?P<log>[^)]*)\)"
)
_RUN_ID = re.compile(r"SLURM run ID: (\S+)")
_ERROR_IN_RULE = re.compile(r"^Error in rule (\S+):", re.MULTILINE)


def _rules_of(name: str, log: Path) -> str:
    """The rules of one submission, as ``_rule_`` or ``_rule_rule_..._`` for a group job. A
    rule's SLURM log lies under ``rule_<rule>/``, a group job's under
    ``group_<group>_<rule>_<rule>...`` (shortened with ``...`` when long; the profile's group
    names have no ``_``)."""
    if any(p.startswith("group_") for p in log.parts):
        name = name.split("_", 1)[1] if "_" in name else ""
    return f"_{name}_"


# One lock for the machine's one cluster: every test that submits to it holds the lock, so tests
# on different pytest-xdist workers (or in two pytest runs) never queue jobs beside each other on
# its two CPUs, where a job left pending would look like a hang.
CLUSTER_LOCK = Path(tempfile.gettempdir()) / "diffcleanse-slurm-tests.lock"


@contextlib.contextmanager
def cluster_lock() -> Iterator[None]:
    """Hold the local SLURM cluster for the caller (blocking until no other test holds it)."""
    from filelock import FileLock

    with FileLock(str(CLUSTER_LOCK)):
        yield


class SnakemakeTimeout(AssertionError):
    """Snakemake did not finish within its time limit."""


def slurm_unavailable_reason(timeout: float = 15) -> str | None:
    """Why SLURM tests cannot run here, or None when a controller answers with a usable node."""
    hint = "start the local cluster with: bash scripts/slurm-up.sh"
    if shutil.which("sinfo") is None:
        return f"sinfo is not on PATH ({hint})"
    try:
        proc = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return f"sinfo did not answer within {timeout:g} s ({hint})"
    if proc.returncode != 0:
        return f"the SLURM controller does not answer: {proc.stderr.strip()} ({hint})"
    states = {s.rstrip("*~#!%$@^-") for s in proc.stdout.split()}
    if not states & _UP_STATES:
        return f"no SLURM node is up (node states: {sorted(states) or 'none'}; {hint})"
    return None


def require_slurm() -> None:
    """Skip the calling test (with the reason) when no usable SLURM cluster answers."""
    import pytest

    reason = slurm_unavailable_reason()
    if reason:
        pytest.skip(reason)


def scontrol_job(jobid: str, timeout: float = 15) -> dict[str, str]:
    """`scontrol show job -o JOBID` as a dict; empty once SLURM forgot the job (MinJobAge)."""
    proc = subprocess.run(
        ["scontrol", "show", "job", "-o", str(jobid)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        return {}
    return dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", proc.stdout))


@dataclass
class SnakemakeRun:
    """Outcome of one Snakemake invocation."""

    args: list[str]
    workdir: Path
    returncode: int
    log: str
    seconds: float
    jobs: dict[str, dict[str, str]] = field(default_factory=dict)
    """SLURM job id -> `scontrol show job` fields, taken right after the run."""

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0

    @property
    def run_id(self) -> str | None:
        m = _RUN_ID.search(self.log)
        return m.group(1) if m else None

    @property
    def submissions(self) -> list[tuple[str, str, Path]]:
        """(rule, SLURM job id, SLURM log file) for every submission, in order."""
        out = []
        for m in _SUBMITTED.finditer(self.log):
            log = Path(m["log"])
            rule = next(
                (p.split("_", 1)[1] for p in log.parts if p.startswith(("rule_", "group_"))),
                "?",
            )
            out.append((rule, m["slurm"], log))
        return out

    @property
    def slurm_jobids(self) -> list[str]:
        return [jobid for _, jobid, _ in self.submissions]

    def jobids_of(self, rule: str) -> list[str]:
        """SLURM job ids of the submissions that ran ``rule`` (on its own or in a group job)."""
        return [jobid for name, jobid, log in self.submissions
                if f"_{rule}_" in _rules_of(name, log)]

    @property
    def failed_rules(self) -> list[str]:
        """Rules reported as "Error in rule X:" (one entry per failed attempt)."""
        return _ERROR_IN_RULE.findall(self.log)

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.splitlines()[-lines:])

    def check(self) -> SnakemakeRun:
        """Raise AssertionError with the end of the log unless Snakemake exited with 0."""
        if self.returncode != 0:
            raise AssertionError(
                f"snakemake exited with {self.returncode} after {self.seconds:.0f} s in "
                f"{self.workdir}: {' '.join(self.args)}\n--- log (end) ---\n{self.tail()}"
            )
        return self


def run_snakemake(
    workdir: Path | str,
    targets: Sequence[str] = (),
    *,
    profile: Path | str | None = None,
    snakefile: Path | str | None = None,
    configfiles: Iterable[Path | str] = (),
    config: dict[str, object] | None = None,
    cores: int | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 600,
    env: dict[str, str] | None = None,
) -> SnakemakeRun:
    """Run ``python -m snakemake`` in ``workdir`` (the working directory) and return its outcome.

    Does not raise when Snakemake fails (call ``.check()``), only when it runs past ``timeout``
    seconds: then it is interrupted like a Ctrl-C (it cancels its SLURM jobs), killed 60 s
    later if still alive, its remaining SLURM jobs are cancelled by run ID, and
    SnakemakeTimeout is raised.
    """
    workdir = Path(workdir)
    # targets first: after --configfile (nargs="+") they would be read as more config files
    cmd = [sys.executable, "-m", "snakemake", *targets]
    if profile is not None:
        cmd += ["--profile", str(profile)]
    if snakefile is not None:
        cmd += ["--snakefile", str(snakefile)]
    if cores is not None:
        cmd += ["--cores", str(cores)]
    configfiles = [str(c) for c in configfiles]
    if configfiles:
        cmd += ["--configfile", *configfiles]
    if config:
        cmd += ["--config", *(f"{k}={v}" for k, v in config.items())]
    cmd += [*extra_args]

    child_env = dict(os.environ if env is None else env)
    child_env.pop("SNAKEMAKE_PROFILE", None)  # only the profile asked for here
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=child_env,
        start_new_session=True,
    )
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            log, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            log, _ = proc.communicate(timeout=30)
        run = SnakemakeRun(cmd, workdir, proc.returncode, log, time.monotonic() - t0)
        if run.run_id and shutil.which("scancel"):
            subprocess.run(["scancel", "--name", run.run_id], timeout=30, check=False)
        raise SnakemakeTimeout(
            f"snakemake did not finish within {timeout:g} s in {workdir}: {' '.join(cmd)}\n"
            f"--- log (end) ---\n{run.tail()}"
        ) from None
    run = SnakemakeRun(cmd, workdir, proc.returncode, log, time.monotonic() - t0)
    if run.slurm_jobids and shutil.which("scontrol"):
        run.jobs = {jobid: scontrol_job(jobid) for jobid in run.slurm_jobids}
    return run


def run_with_profile(
    workdir: Path | str,
    targets: Sequence[str] = (),
    *,
    profile: Path | str = CPU_TEST_PROFILE,
    **kwargs,
) -> SnakemakeRun:
    """Run Snakemake through a SLURM profile (by default profiles/slurm-cpu-test).

    Keyword arguments are those of run_snakemake (snakefile, configfiles, config, extra_args,
    timeout, env). Note: a ``--set-resources`` in extra_args replaces the profile's whole
    set-resources mapping, including its ``gpu: 0`` overrides; repeat them then.
    """
    return run_snakemake(workdir, targets, profile=profile, **kwargs)


def differing_files(a: Path | str, b: Path | str) -> list[str]:
    """Relative paths of files that are not byte-identical in the trees a and b (or only in one)."""
    a, b = Path(a), Path(b)
    files_a = {p.relative_to(a) for p in a.rglob("*") if p.is_file()}
    files_b = {p.relative_to(b) for p in b.rglob("*") if p.is_file()}
    diff = sorted(str(p) for p in files_a ^ files_b)
    diff += sorted(
        str(p) for p in files_a & files_b if (a / p).read_bytes() != (b / p).read_bytes()
    )
    return diff
