"""The environment the README's commands build: every requested package imports and pins agree."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_requested_packages_import_and_torchvision_ops_load():
    code = ("import open_clip, torch_fidelity, torch_pruning, diffusers, snakemake, seaborn, "
            "torch, "
            "torchvision; from torchvision.ops import nms; "
            "print(torch.__version__, torchvision.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    torch_v, tv_v = out.stdout.split()
    assert torch_v.startswith("2.13.0") and tv_v.startswith("0.28.0")


def test_cli_version():
    out = subprocess.run([sys.executable, "-m", "diffcleanse.cli", "--version"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and re.match(r"diffcleanse \d+\.\d+", out.stdout)


def test_conda_env_pins_match_the_lock():
    lock = tomllib.loads((REPO / "uv.lock").read_text())
    locked = {p["name"].lower().replace("_", "-"): p["version"] for p in lock["package"]}
    env = yaml.safe_load((REPO / "envs/diffcleanse.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    pinned = [p for p in pip if "==" in p]
    assert len(pinned) >= 6
    for spec in pinned:
        name, version = spec.split("==")
        assert locked[name.lower().replace("_", "-")] == version, spec


def test_the_environment_is_installed_with_bytecode():
    """`make env` compiles the libraries once (``--compile-bytecode``): with PYTHONDONTWRITEBYTECODE
    set, as on these machines, every job would otherwise recompile torch and diffusers as it
    starts (benchmarks/startup.py measured 2.5x the CPU of a job's imports)."""
    import importlib.util

    import diffusers.models.unets.unet_2d
    import torch.nn.modules.conv

    for mod in (torch.nn.modules.conv, diffusers.models.unets.unet_2d):
        assert Path(importlib.util.cache_from_source(mod.__file__)).is_file(), (
            f"{mod.__file__} has no bytecode: install with `make env` (uv sync --compile-bytecode)")
