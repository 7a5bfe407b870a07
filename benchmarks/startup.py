"""What one job pays to start: importing the stack every workflow script imports.

Every rule is its own Python process (on a cluster, its own job), so each pays the imports of
torch, diffusers and the package before it computes anything. Where ``PYTHONDONTWRITEBYTECODE``
is set (these machines set it) and the environment was installed without bytecode, each of those
imports compiles the libraries from source again. This times, in one run and alternating, the
import with the environment as installed and with its bytecode hidden (an empty
``PYTHONPYCACHEPREFIX``: Python finds no ``.pyc`` and, told not to write, compiles everything),
and prints the ratio.

    .venv/bin/python benchmarks/startup.py [--repeats 3]

Not a test: the figures depend on the machine and its load; the ratio is what to read.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

STACK = "import torch, diffusers; from diffusers import UNet2DModel; import diffcleanse.evaluation"


def _run(env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, of the child) of one cold import of the stack."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", STACK], env=env, check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    """Print the import cost with and without bytecode, and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as empty:
        base = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        base.pop("PYTHONPYCACHEPREFIX", None)
        envs = {"as installed": base, "no bytecode": {**base, "PYTHONPYCACHEPREFIX": empty}}
        _run(base)  # warm the page cache so the first timed run is not the disk's
        got: dict[str, list[tuple[float, float]]] = {k: [] for k in envs}
        for _ in range(args.repeats):
            for name, env in envs.items():
                got[name].append(_run(env))
    print(f"cold import of the job stack ({STACK!r}), median of {args.repeats}:")
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v))
           for k, v in got.items()}
    for name, (wall, cpu) in med.items():
        print(f"  {name:>13}: {wall:6.2f} s wall, {cpu:6.2f} CPU-s")
    (w1, c1), (w0, c0) = med["as installed"], med["no bytecode"]
    print(f"  no bytecode / as installed: {w0 / w1:.2f}x wall, {c0 / c1:.2f}x CPU")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
