"""Run the real workflow in temporary copies of the repository (shared by several test modules)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
COPY = ["Snakefile", "config.yaml", "config", "workflow", "envs", "profiles"]
_JOB = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n((?:    .*(?:\n|$))*)", re.M)
_WILDCARDS = re.compile(r"^\s+wildcards: (.*)$", re.M)


def workdir_copy(dest: Path) -> Path:
    """The workflow files (not results) copied into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True, dirs_exist_ok=True)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def run_snakemake(
    workdir: Path, *args: str, timeout: int = 1800, check: bool = True
) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir``; with ``check``, fail the test with its output on failure."""
    proc = subprocess.run(
        [*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def planned_jobs(workdir: Path, *args: str) -> set[tuple[str, str]]:
    """The jobs a dry run plans, as (rule, wildcards) pairs, e.g. ("gallery", "model=smoke-bd")."""
    proc = run_snakemake(workdir, "-n", *args, timeout=600)
    text = proc.stdout + "\n" + proc.stderr
    jobs = set()
    for rule, body in _JOB.findall(text):
        m = _WILDCARDS.search(body)
        jobs.add((rule, m.group(1).strip() if m else ""))
    return jobs


def planned_priorities(workdir: Path, *args: str) -> dict[tuple[str, str], float]:
    """The jobs a dry run plans, as in ``planned_jobs``, with the priority Snakemake gives each
    (0 where it prints none)."""
    proc = run_snakemake(workdir, "-n", *args, timeout=600)
    out = {}
    for rule, body in _JOB.findall(proc.stdout + "\n" + proc.stderr):
        m = _WILDCARDS.search(body)
        prio = re.search(r"^\s+priority: ([\d.]+)$", body, re.M)
        out[(rule, m.group(1).strip() if m else "")] = float(prio.group(1)) if prio else 0.0
    return out


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes."""
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def changed_config(wd: Path, name: str, **changes) -> str:
    """A copy of config/smoke.yaml with nested keys changed ("a.b": value)."""
    import yaml

    cfg = yaml.safe_load((wd / "config/smoke.yaml").read_text())
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    (wd / f"config/{name}.yaml").write_text(yaml.safe_dump(cfg))
    return f"config/{name}.yaml"


_GROUP = re.compile(r"Group job (\S+) \(jobs in lexicogr\. order\):$")
_RULE_LINE = re.compile(r"^( *)(?:local)?(?:rule|checkpoint) (\w+):$")


def dry_run_jobs(text: str) -> list[tuple[str | None, str, dict[str, str]]]:
    """Every job a dry run (``snakemake -n``, not ``--quiet``) prints, as (group job name or None,
    rule, wildcards). Snakemake prints a group job as ``Group job NAME (...)`` followed by its
    jobs indented by four spaces; a job printed at the margin belongs to no group. Two group jobs
    may share a name (disconnected parts of the DAG in the same group), so each ``Group job``
    line starts a new one: the name is suffixed with ``#n`` from its second occurrence on."""
    out: list[tuple[str | None, str, dict[str, str]]] = []
    group: str | None = None
    seen: dict[str, int] = {}
    current: list | None = None
    for line in text.splitlines():
        if m := _GROUP.search(line):
            name = m.group(1)
            seen[name] = seen.get(name, 0) + 1
            group = name if seen[name] == 1 else f"{name}#{seen[name]}"
            continue
        if m := _RULE_LINE.match(line):
            if not m.group(1):
                group = None
            current = [group, m.group(2), {}]
            out.append(current)
            continue
        if current is not None and line.strip().startswith("wildcards: "):
            pairs = line.strip()[len("wildcards: "):].split(", ")
            current[2] = dict(p.split("=", 1) for p in pairs if "=" in p)
    return [tuple(j) for j in out]
