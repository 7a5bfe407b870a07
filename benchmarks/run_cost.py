"""What a workflow run cost, per rule, from the benchmark files its rules wrote.

Every heavy rule of the workflow has a ``benchmark:`` file (``results/benchmarks/<rule>/…tsv``,
Snakemake's columns: ``s`` wall seconds, ``max_rss`` MB, ``cpu_time`` CPU seconds, …). This prints,
per rule: jobs, wall and CPU seconds (sum, and the largest job), and the peak resident memory of
its largest job, which is what a rule's ``mem_mb`` must cover; then the totals and the shortest
wall time the CPU seconds allow on ``--cores`` cores; then how full the cores were over the run
(each job's end is its benchmark file's modification time, so run it on the run's own folder).

    .venv/bin/python benchmarks/run_cost.py results/benchmarks --cores 2 [--markdown]

Not a test: the figures depend on the machine and its load (``mean_load`` is printed beside them).
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RuleCost:
    """The benchmark files of one rule, summed."""

    jobs: int = 0
    wall: float = 0.0
    cpu: float = 0.0
    max_wall: float = 0.0
    max_rss: float = 0.0
    loads: list[float] = field(default_factory=list)


def _number(value: str | None) -> float:
    try:
        return float(value) if value not in (None, "", "NA", "-") else 0.0
    except ValueError:
        return 0.0


def last_rows(root: Path):
    """(path under ``root``, last row, modification time) per benchmark file with a row: a rerun
    appends, so the last row is the job that made the outputs, and Snakemake writes the file when
    the job ends."""
    for tsv in sorted(root.rglob("*.tsv")):
        with tsv.open(newline="") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        if rows:
            yield tsv.relative_to(root), rows[-1], tsv.stat().st_mtime


def read_costs(root: Path) -> dict[str, RuleCost]:
    """Rule name (the first path component under ``root``) -> its summed benchmark rows."""
    return costs_of(last_rows(root))


def costs_of(rows) -> dict[str, RuleCost]:
    """``read_costs`` of rows already read (``last_rows``)."""
    costs: dict[str, RuleCost] = {}
    for rel, row, _ in rows:
        rule = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        c = costs.setdefault(rule, RuleCost())
        wall = _number(row.get("s"))
        c.jobs += 1
        c.wall += wall
        c.cpu += _number(row.get("cpu_time"))
        c.max_wall = max(c.max_wall, wall)
        c.max_rss = max(c.max_rss, _number(row.get("max_rss")))
        c.loads.append(_number(row.get("mean_load")))
    return costs


def report(costs: dict[str, RuleCost], cores: int, markdown: bool) -> str:
    """The per-rule table and the totals, heaviest rule first."""
    head = ["rule", "jobs", "wall s", "CPU s", "largest job s", "peak RSS MB", "mean load %"]
    rows = []
    for rule, c in sorted(costs.items(), key=lambda kv: -kv[1].cpu):
        load = sum(c.loads) / len(c.loads) if c.loads else 0.0
        rows.append([rule, str(c.jobs), f"{c.wall:.0f}", f"{c.cpu:.0f}", f"{c.max_wall:.0f}",
                     f"{c.max_rss:.0f}", f"{load:.0f}"])
    total_cpu = sum(c.cpu for c in costs.values())
    total_wall = sum(c.wall for c in costs.values())
    jobs = sum(c.jobs for c in costs.values())
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=False)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True))
                 for r in (head, *rows)]
    lines.append("")
    lines.append(f"{jobs} jobs; wall seconds summed over jobs {total_wall:.0f}, CPU seconds "
                 f"{total_cpu:.0f}: at least {total_cpu / cores / 60:.1f} minutes on {cores} "
                 f"cores if every core were busy all the time")
    return "\n".join(lines)


def spans(rows) -> list[tuple[float, float, str]]:
    """(start, end, job) per benchmark row (``last_rows``): the file's modification time is the
    job's end and ``end - s`` its start (a copied folder loses this)."""
    return [(end - _number(row.get("s")), end, str(rel)) for rel, row, end in rows]


def occupancy(jobs: list[tuple[float, float, str]], cores: int) -> str:
    """How full the cores were between the first job's start and the last job's end: the span,
    the core-seconds no benchmarked job held, and the longest stretches with a core free (the
    scheduler's order, the chain of dependent jobs, and the work outside jobs: Snakemake's own
    DAG updates, the installation before the first job)."""
    if not jobs:
        return "no jobs"
    events = sorted([(s, 1) for s, _, _ in jobs] + [(e, -1) for _, e, _ in jobs])
    t0, t1 = events[0][0], events[-1][0]
    idle, running = 0.0, 0
    stretches: list[list[float]] = []  # [start, seconds] of each run of time with a core free
    for (t, step), (nxt, _) in zip(events, events[1:], strict=False):
        running += step
        if nxt > t and running < cores:
            idle += (nxt - t) * (cores - running)
            if stretches and abs(sum(stretches[-1]) - t) < 1e-6:
                stretches[-1][1] += nxt - t
            else:
                stretches.append([t, nxt - t])
    lines = [f"span {(t1 - t0) / 60:.1f} minutes from the first job's start to the last one's end; "
             f"{idle:.0f} core-seconds of it ({idle / ((t1 - t0) * cores):.0%}) held no job"]
    for a, d in sorted(stretches, key=lambda m: -m[1])[:5]:
        during = sorted(n for s, e, n in jobs if s < a + d and e > a)
        lines.append(f"  a core free for {d:.0f} s from minute {(a - t0) / 60:.1f}; running: "
                     + (", ".join(during[:3]) + (" …" if len(during) > 3 else "") or "nothing"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path, help="a run's benchmark folder (results/benchmarks)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--markdown", action="store_true", help="a Markdown table")
    a = ap.parse_args(argv)
    if not a.root.is_dir():
        ap.error(f"{a.root} is not a folder: give a run's results/benchmarks")
    rows = list(last_rows(a.root))
    if not rows:
        ap.error(f"{a.root} holds no benchmark files (*.tsv): has the workflow run there?")
    print(report(costs_of(rows), a.cores, a.markdown))
    print()
    print(occupancy(spans(rows), a.cores))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
