"""What one job pays to start: importing the stack every workflow script imports.

Every rule is its own Python process (on a cluster, its own job), so each pays the imports of
torch, diffusers and the package before it computes anything. Where ``PYTHONDONTWRITEBYTECODE``
is set (these machines set it) and the environment was installed without bytecode, each of those
imports compiles the libraries from source again. This times, in one run and alternating, the
import with the environment as installed and with its bytecode hidden (an empty
``PYTHONPYCACHEPREFIX``: Python finds no ``.pyc`` and, told not to write, compiles everything),
and prints the ratio.

It also times, in the same run, a process from its start to its first UNet forward: with only
``import torch`` (the issue's yardstick), with torch and diffusers' UNet (the floor any job on
stock diffusers pays: diffusers imports ``torch._dynamo`` in ``diffusers.utils.torch_utils``
and every transformer model, scipy.stats included, behind ``UNet2DModel``), and with what a
workflow job imports (the package's stage modules), and prints each as a ratio to ``import
torch``.

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


_FORWARD = ("x = torch.zeros(1, 3, 8, 8)\n"
            "with torch.no_grad():\n    unet(x, torch.tensor([1]))\n")
FIRST_FORWARD = {
    "import torch": "import torch\n",
    "torch + diffusers UNet, forward (floor)": (
        "import torch\nfrom diffusers import UNet2DModel\n"
        "unet = UNet2DModel(sample_size=8, block_out_channels=(8, 16), norm_num_groups=4,"
        " down_block_types=('DownBlock2D', 'AttnDownBlock2D'),"
        " up_block_types=('AttnUpBlock2D', 'UpBlock2D'), attention_head_dim=4)\n" + _FORWARD),
    "workflow job stack, forward": (
        "import torch\nimport diffcleanse.evaluation, diffcleanse.inversion, diffcleanse.zoo\n"
        "import diffcleanse.removal.stages\nfrom diffcleanse import models\n"
        "unet = models.build_unet(8, (8, 16), attention=True, norm_num_groups=4,"
        " attention_head_dim=4)\n" + _FORWARD),
}


def _run(env: dict[str, str], code: str = STACK) -> tuple[float, float]:
    """Wall and CPU seconds (user + system, of the child) of one cold run of ``code``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
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
    ff: dict[str, list[tuple[float, float]]] = {k: [] for k in FIRST_FORWARD}
    for _ in range(args.repeats):
        for name, code in FIRST_FORWARD.items():
            ff[name].append(_run(base, code))
    print(f"process start to first UNet forward (as installed), median of {args.repeats}:")
    ref_w, ref_c = (statistics.median(x for x, _ in ff["import torch"]),
                    statistics.median(c for _, c in ff["import torch"]))
    for name, v in ff.items():
        wall, cpu = statistics.median(x for x, _ in v), statistics.median(c for _, c in v)
        print(f"  {name:>40}: {wall:6.2f} s wall, {cpu:6.2f} CPU-s, "
              f"{wall / ref_w:.2f}x / {cpu / ref_c:.2f}x import torch")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
