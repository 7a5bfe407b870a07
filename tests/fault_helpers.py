"""The workflow's DAG as Snakemake plans it, real SIGKILLs of running jobs, and record comparison
(shared by tests/test_faults.py and tests/test_determinism.py).

Nothing here hard-codes the workflow's rules: jobs, their files and resources come from a
``snakemake -n`` of the run under test, edges from matching inputs to outputs, and "heavy" rules
are those that request a GPU (``resources: gpu=1``).
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from workflow_helpers import SNAKEMAKE, workdir_copy

_BLOCK = re.compile(r"^(?:local)?(?:rule|checkpoint) (\w+):\n((?:    .*(?:\n|$))*)", re.M)
# Keys of records (and columns of CSV tables) that say how long or when something ran, or that
# a resumed job reports about its own resumption: ignored when two runs are compared. A key is
# about timing when one of its words is in TIMING_WORDS ("inversion_seconds", "seconds per
# model", "unet_evals_per_second", "created_unix").
TIMING_WORDS = frozenset({"second", "seconds", "unix", "elapsed"})
TIMING_KEYS = frozenset({"resumed_from", "resumed_from_step"})
# Outputs that are about timing or embed a creation date (compared by existence only).
TIMING_FILES = (re.compile(r"(^|/)table7\.(csv|md)$"), re.compile(r"\.pdf$"),
                re.compile(r"(^|/)report\.html$"))
# Names of temporary folders (tempfile.mkdtemp) that some records mention: random by design.
TMP_NAME = re.compile(r"\btmp[A-Za-z0-9_]{8}\b")
SKIP_DIRS = ("logs", "benchmarks", "checkpoints")


@dataclass(frozen=True)
class Job:
    """One job of a dry run."""

    rule: str
    wildcards: tuple[tuple[str, str], ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    log: tuple[str, ...]
    benchmark: str | None
    resources: tuple[tuple[str, str], ...]

    @property
    def key(self) -> tuple[str, str]:
        """(rule, "k=v, ...") as ``workflow_helpers.planned_jobs`` reports jobs."""
        return self.rule, ", ".join(f"{k}={v}" for k, v in self.wildcards)

    @property
    def wc(self) -> dict[str, str]:
        return dict(self.wildcards)

    @property
    def heavy(self) -> bool:
        """The job asks for a GPU (the workflow's mark of a heavy rule)."""
        return dict(self.resources).get("gpu", "0") not in ("0", "")

    def __str__(self) -> str:
        return f"{self.rule}[{self.key[1]}]"


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(", ") if v.strip())


def parse_jobs(text: str) -> list[Job]:
    """The job blocks of a ``snakemake -n`` log."""
    jobs = []
    for rule, body in _BLOCK.findall(text):
        fields: dict[str, str] = {}
        for line in body.splitlines():
            k, _, v = line.strip().partition(": ")
            fields[k] = v
        wildcards = tuple(tuple(p.split("=", 1)) for p in _split(fields.get("wildcards", "")))
        resources = tuple(tuple(p.split("=", 1)) for p in _split(fields.get("resources", ""))
                          if "=" in p)
        jobs.append(Job(rule, wildcards, _split(fields.get("input", "")),
                        _split(fields.get("output", "")), _split(fields.get("log", "")),
                        fields.get("benchmark"), resources))
    return jobs


def dry_runs(workdir: Path, arglists: Sequence[Sequence[str]], timeout: int = 900) -> list[str]:
    """The logs of several ``snakemake -n`` runs in one Python process (imports are paid once,
    so each further dry run costs about 2 s instead of a cold start)."""
    child = textwrap.dedent("""
        import contextlib, io, json, sys
        from snakemake.cli import main
        out = []
        for args in json.loads(sys.argv[1]):
            buf = io.StringIO()
            code = 0
            try:
                with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
                    main(["-n", *args])
            except SystemExit as e:
                code = e.code or 0
            out.append({"code": code, "log": buf.getvalue()})
        print("\\x00" + json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", child, json.dumps([list(a) for a in arglists])],
                          cwd=workdir, capture_output=True, text=True, timeout=timeout)
    if "\x00" not in proc.stdout:
        raise AssertionError(f"dry runs failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results = json.loads(proc.stdout.split("\x00", 1)[1])
    for args, r in zip(arglists, results, strict=True):
        if r["code"] != 0:
            raise AssertionError(f"snakemake -n {' '.join(args)} failed:\n{r['log'][-3000:]}")
    return [r["log"] for r in results]


def planned(text: str) -> set[tuple[str, str]]:
    """(rule, wildcards) of every job a dry-run log plans."""
    return {j.key for j in parse_jobs(text)}


def _produces(out: str, path: str) -> bool:
    return path == out or path.startswith(out.rstrip("/") + "/")


def edges(jobs: Iterable[Job]) -> dict[Job, set[Job]]:
    """job -> the jobs that read one of its outputs (directories match what lies inside)."""
    jobs = list(jobs)
    out: dict[Job, set[Job]] = {j: set() for j in jobs}
    for consumer in jobs:
        for path in consumer.inputs:
            for producer in jobs:
                if producer is not consumer and any(_produces(o, path) for o in producer.outputs):
                    out[producer].add(consumer)
    return out


def descendants(graph: dict[Job, set[Job]], roots: Iterable[Job]) -> set[Job]:
    """The roots and every job downstream of them."""
    seen: set[Job] = set()
    stack = list(roots)
    while stack:
        j = stack.pop()
        if j not in seen:
            seen.add(j)
            stack.extend(graph[j])
    return seen


_DAGS: dict[tuple[str, ...], list[Job]] = {}


def remember_dag(workdir: Path, args: Sequence[str], jobs: list[Job]) -> None:
    """Store a DAG computed elsewhere (e.g. with other dry runs in one process) for full_dag."""
    _DAGS[(str(workdir), *args)] = list(jobs)


def ancestors(graph: dict[Job, set[Job]], job: Job) -> set[Job]:
    """The job and every job upstream of it."""
    parents: dict[Job, set[Job]] = {j: set() for j in graph}
    for a, consumers in graph.items():
        for c in consumers:
            parents[c].add(a)
    seen: set[Job] = set()
    stack = [job]
    while stack:
        j = stack.pop()
        if j not in seen:
            seen.add(j)
            stack.extend(parents[j])
    return seen


@dataclass
class Cover:
    """One job of every per-model stage and the jobs they need: a second run that exercises
    every stage at a fraction of the zoo's cost."""

    representatives: list[Job]  # one job per (rule, inversion method)
    jobs: set[Job]  # the representatives and their ancestors
    left_out: dict[str, str]  # rule -> why it has no representative


def stage_cover(jobs: Sequence[Job], light_extra: int = 1) -> Cover:
    """Pick, greedily, one job of every heavy rule (each inversion method separately) needing the
    fewest jobs not picked yet, then one of every light per-model rule that needs at most
    ``light_extra`` more. Rules without a ``model`` wildcard that are nobody's ancestor here
    (tables and figures over the whole zoo) are left out, as are light rules that would pull in
    more jobs."""
    graph = edges(jobs)
    anc = {j: ancestors(graph, j) for j in jobs}
    groups: dict[tuple[str, str], list[Job]] = {}
    for j in jobs:
        if j.rule != "all" and "model" in j.wc:
            groups.setdefault((j.rule, j.wc.get("method", "")), []).append(j)
    heavy = [g for g in groups if any(j.heavy for j in groups[g])]
    light = [g for g in groups if g not in heavy]
    cover: set[Job] = set()
    reps: list[Job] = []
    left: dict[str, str] = {}
    for group, cap in ((heavy, None), (light, light_extra)):
        for g in sorted(group, key=lambda g: (min(len(anc[j]) for j in groups[g]), g)):
            best = min(groups[g], key=lambda j: (len(anc[j] - cover), j.key))
            new = anc[best] - cover
            if cap is not None and len(new) > cap:
                left[g[0]] = f"a per-model summary needing {len(new)} more jobs"
                continue
            reps.append(best)
            cover |= anc[best]
    for j in jobs:
        if j.rule != "all" and j not in cover and "model" not in j.wc:
            left.setdefault(j.rule, "reads the whole zoo (a table, figure or population step)")
    return Cover(sorted(reps, key=lambda j: j.key), cover, left)


def full_dag(workdir: Path, *args: str) -> list[Job]:
    """Every job of the workflow (``--forceall``) as planned in ``workdir`` (memoised: tests of
    one session share it)."""
    key = (str(workdir), *args)
    if key not in _DAGS:
        (log,) = dry_runs(workdir, [["--forceall", *args]])
        _DAGS[key] = parse_jobs(log)
    return list(_DAGS[key])


# ---------------------------------------------------------------- records


def is_timing(key: str) -> bool:
    """Whether a record key or table column is about timing (see TIMING_WORDS)."""
    return key in TIMING_KEYS or bool(TIMING_WORDS & set(re.split(r"[^a-z0-9]+", key.lower())))


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if not is_timing(k)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    if isinstance(obj, float) and math.isnan(obj):
        return "NaN"
    if isinstance(obj, str):
        return TMP_NAME.sub("tmp*", obj)
    return obj


def _safetensors(path: Path) -> tuple[dict, bytes]:
    """(header as a mapping, tensor bytes): safetensors writes its metadata in a random key order
    per process (a Rust HashMap), so two equal files can differ in their header bytes."""
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _md(path: Path) -> list:
    """A Markdown file with its pipe tables as rows of {column: cell}, timing columns dropped."""
    lines = path.read_text().splitlines()
    out: list = []
    header: list[str] | None = None
    for i, line in enumerate(lines):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$",
                                                                   lines[i + 1]):
            header = cells
        elif line.startswith("|") and header and not re.match(r"^\|[\s:|-]+\|$", line):
            out.append({h: TMP_NAME.sub("tmp*", c) for h, c in zip(header, cells, strict=False)
                        if not is_timing(h)})
        elif not line.startswith("|"):
            header = None
            out.append(TMP_NAME.sub("tmp*", line))
    return out


def _csv(path: Path) -> list[dict]:
    import csv

    with open(path, newline="") as fh:
        return [{k: TMP_NAME.sub("tmp*", v or "") for k, v in row.items() if not is_timing(k)}
                for row in csv.DictReader(fh)]


def result_files(root: Path) -> set[str]:
    """Relative paths of the files a run made under results/ (logs, benchmarks, checkpoints and
    hidden temporaries left out)."""
    base = root / "results"
    out = set()
    for p in base.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[1] not in SKIP_DIRS and not any(
            part.startswith(".") for part in rel.parts
        ):
            out.add(rel.as_posix())
    return out


def output_files(root: Path, jobs: Iterable[Job]) -> set[str]:
    """The files the jobs made under ``root`` (directory outputs expanded, hidden files left
    out)."""
    out = set()
    for j in jobs:
        for o in j.outputs:
            p = root / o
            if p.is_dir():
                out |= {q.relative_to(root).as_posix() for q in p.rglob("*") if q.is_file()
                        and not any(part.startswith(".") for part in q.relative_to(p).parts)}
            else:
                out.add(o)
    return out


def differences(a: Path, b: Path, files: Iterable[str]) -> dict[str, str]:
    """For each file that differs between the runs in ``a`` and ``b``: why. JSON records are
    compared without timing keys (``TIMING_KEYS``); files about timing (``TIMING_FILES``) only
    by existence; everything else byte for byte."""
    out = {}
    for rel in sorted(files):
        fa, fb = a / rel, b / rel
        if not (fa.is_file() and fb.is_file()):
            out[rel] = f"missing in {'the first' if not fa.is_file() else 'the second'} run"
        elif any(r.search(rel) for r in TIMING_FILES):
            continue
        elif rel.endswith(".json"):
            ja, jb = _strip(json.loads(fa.read_text())), _strip(json.loads(fb.read_text()))
            if ja != jb:
                keys = sorted(k for k in set(ja) | set(jb) if ja.get(k) != jb.get(k)) \
                    if isinstance(ja, dict) and isinstance(jb, dict) else ["(value)"]
                out[rel] = f"record differs in {keys[:6]}"
        elif rel.endswith(".safetensors"):
            (ha, da), (hb, db) = _safetensors(fa), _safetensors(fb)
            if ha != hb:
                out[rel] = "safetensors header differs"
            elif da != db:
                out[rel] = "tensor bytes differ"
        elif rel.endswith(".csv"):
            if _csv(fa) != _csv(fb):
                out[rel] = "table differs (timing columns ignored)"
        elif rel.endswith(".md"):
            if _md(fa) != _md(fb):
                out[rel] = "Markdown differs (timing columns ignored)"
        elif fa.read_bytes() != fb.read_bytes():
            out[rel] = "bytes differ"
    return out


# ---------------------------------------------------------------- processes


def job_processes(workdir: Path) -> dict[int, str]:
    """PID -> log path (relative) of every job script running in ``workdir``, found by the log
    file the script holds open (``diffcleanse.logs.log_to`` opens it first thing)."""
    out = {}
    wd = str(workdir)
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if ".snakemake/scripts/" not in cmd or os.readlink(d / "cwd") != wd:
                continue
            for fd in (d / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(wd + "/results/logs/"):
                    out[int(d.name)] = os.path.relpath(target, wd)
        except OSError:
            continue
    return out


def process_age(pid: int) -> float:
    """Seconds since process ``pid`` started."""
    ticks = os.sysconf("SC_CLK_TCK")
    start = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start


def reference_seconds(run: Path, job: Job) -> float:
    """Wall seconds of ``job`` in the reference run (its benchmark file)."""
    if not job.benchmark:
        return 10.0
    rows = (run / job.benchmark).read_text().splitlines()
    return float(rows[-1].split("\t")[0])


def checkpoint_dirs(run: Path, job: Job) -> list[str]:
    """Checkpoint folders of ``job`` in a run (results/checkpoints/<rule or stage>/<wildcards>)."""
    base = run / "results" / "checkpoints"
    if not base.is_dir():
        return []
    wc = job.wc
    parts = [wc.get("model", "")] + [f"{k}~{v}" for k, v in job.wildcards if k != "model"]
    found = []
    for d in sorted(p for p in base.rglob("*") if p.is_dir()):
        rel = d.relative_to(run).parts
        stage = rel[2]  # the stage's name: train_model, finetune, elijah (elijah_removal), ...
        if job.rule != stage and not job.rule.startswith(stage + "_"):
            continue
        if list(rel[3:]) == [p for p in parts if p] and any(f.is_file() for f in d.iterdir()):
            found.append(d.relative_to(run).as_posix())
    return found


@dataclass
class Kill:
    """One SIGKILLed job: when, and what was on disk right after its pass ended."""

    job: Job
    pass_index: int
    at_seconds: float
    reference_seconds: float
    frac: float  # the kill waited for this share of reference_seconds (when no checkpoint)
    checkpoint: str | None
    outputs_left: list[str] = field(default_factory=list)
    temporaries_left: list[str] = field(default_factory=list)


@dataclass
class KilledRun:
    """A fresh run of the workflow (the stage cover's jobs) in which one job of every heavy rule
    was SIGKILLed mid-job and the workflow rerun until it completed."""

    workdir: Path
    reference: Path
    jobs: list[Job]
    cover: Cover
    victims: list[Job]
    kills: list[Kill]
    passes: list[subprocess.CompletedProcess]
    second_snakemake: subprocess.CompletedProcess | None
    seconds: float

    def log(self) -> str:
        return "\n".join(f"--- pass {i} (exit {p.returncode})\n{p.stdout[-4000:]}"
                         for i, p in enumerate(self.passes))


def heavy_victims(jobs: Iterable[Job]) -> list[Job]:
    """One job of every heavy rule (and of every inversion method, each its own code): the one
    with the most jobs upstream (a fine-tuned model's training rather than a from-scratch one,
    which tests/test_cluster_ops.py already kills)."""
    jobs = list(jobs)
    graph = edges(jobs)
    depth = {j: len(ancestors(graph, j)) for j in jobs if j.heavy}
    chosen: dict[tuple[str, str], Job] = {}
    for j in sorted(depth, key=lambda j: (-depth[j], j.key)):
        chosen.setdefault((j.rule, j.wc.get("method", "")), j)
    return sorted(chosen.values(), key=lambda j: j.key)


_MEMO: dict[str, KilledRun] = {}


def complete_checkpoint(folder: Path) -> bool:
    """``folder`` holds a finished checkpoint file: one that is neither a temporary being written
    (``*.tmp``, which ``training._save_checkpoint`` renames when complete) nor hidden
    (``records.atomic_path``'s ``.<name>.*.tmp``). A kill while only a temporary exists leaves
    nothing to resume, so it is not yet "after the first checkpoint"."""
    if not folder.is_dir():
        return False
    return any(f.is_file() and not f.name.startswith(".") and not f.name.endswith(".tmp")
               for f in folder.iterdir())


def killed_and_resumed_run(reference: Path, dest: Path, config: str = "config/smoke.yaml",
                           frac: float = 0.5, max_passes: int = 8) -> KilledRun:
    """A fresh copy of the workflow run with ``config`` for one job of every stage and what it
    needs (``stage_cover``: a fresh run of the same config at a fraction of the zoo's cost); one
    job of every heavy rule is SIGKILLed
    (as the OOM killer or a preemption would) once it is mid-job: after its first checkpoint
    when it writes checkpoints, else after ``frac`` of its wall time in ``reference``. The
    workflow is rerun (``--rerun-incomplete``) until it completes; a victim that finished
    before its kill has its outputs removed and is killed sooner in the next pass. During the
    first pass a second Snakemake is started on the same directory. Memoised per config within a
    session, so test modules share one such run."""
    if config in _MEMO:
        return _MEMO[config]
    t0 = time.monotonic()
    wd = workdir_copy(dest)
    jobs = full_dag(reference, "--configfile", config)
    cover = stage_cover(jobs)
    victims = heavy_victims(cover.jobs)
    targets = sorted({o for j in cover.representatives for o in j.outputs})
    todo = {j.log[0]: j for j in victims if j.log}
    ckpts = {log: checkpoint_dirs(reference, j) for log, j in todo.items()}
    kills: list[Kill] = []
    passes: list[subprocess.CompletedProcess] = []
    second: subprocess.Popen | None = None
    args = [*SNAKEMAKE, *targets, "--cores", "2", "--configfile", config, "--keep-going",
            "--rerun-incomplete"]
    for n in range(max_passes):
        proc = subprocess.Popen(args, cwd=wd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        chunks: list[str] = []
        reader = _Reader(proc, chunks)
        while proc.poll() is None:
            running = job_processes(wd)
            if second is None and running:  # a second Snakemake on the same directory
                second = subprocess.Popen(args, cwd=wd, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True)
            for pid, log in running.items():
                job = todo.get(log)
                if job is None:
                    continue
                try:
                    age = process_age(pid)
                except OSError:
                    continue
                ref = reference_seconds(reference, job)
                if ckpts[log]:  # after its first checkpoint: the rerun must resume from it
                    ready = any(complete_checkpoint(wd / c) for c in ckpts[log])
                else:
                    ready = age >= frac * ref
                if not ready:
                    continue
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    continue
                kills.append(Kill(job, n, age, ref, frac,
                                  ckpts[log][0] if ckpts[log] else None))
                del todo[log]
            time.sleep(0.25)
        reader.join()
        passes.append(subprocess.CompletedProcess(args, proc.returncode, "".join(chunks)))
        for k in kills:
            if k.pass_index == n:
                k.outputs_left = [o for o in k.job.outputs if (wd / o).exists()]
                k.temporaries_left = temporaries(wd, k.job)
        escaped = [j for j in todo.values() if all((wd / o).exists() for o in j.outputs)]
        for job in escaped:  # finished before it could be killed: again, sooner
            for o in job.outputs:
                _remove(wd / o)
        if escaped:
            frac /= 2
        elif proc.returncode == 0 and not todo:
            break
    second_done = None
    if second is not None:
        out, _ = second.communicate(timeout=600)
        second_done = subprocess.CompletedProcess(args, second.returncode, out)
    run = KilledRun(wd, reference, jobs, cover, victims, kills, passes, second_done,
                    time.monotonic() - t0)
    _MEMO[config] = run
    return run


def temporaries(wd: Path, job: Job) -> list[str]:
    """Hidden temporaries beside the job's outputs: ``records.atomic_path``'s
    ``.<output>.*.tmp`` and ``records.scratch_dir``'s ``.<name>.scratch``."""
    out = []
    for o in job.outputs:
        parent = (wd / o).parent
        if parent.is_dir():
            out += [p.relative_to(wd).as_posix() for p in parent.iterdir()
                    if (p.name.startswith(f".{Path(o).name}.") and p.name.endswith(".tmp"))
                    or (p.name.startswith(".") and p.name.endswith(".scratch"))]
    return sorted(set(out))


def _remove(p: Path) -> None:
    import shutil

    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists():
        p.unlink()


class _Reader:
    """Drain a process's stdout in a thread (a full pipe would block Snakemake)."""

    def __init__(self, proc: subprocess.Popen, sink: list[str]) -> None:
        import threading

        self._t = threading.Thread(target=lambda: sink.extend(iter(proc.stdout.readline, "")),
                                   daemon=True)
        self._t.start()

    def join(self) -> None:
        self._t.join(timeout=60)
