"""Shared test set-up: offline hub, few threads, the grouping of tests for parallel workers,
and small helpers."""

import os

import pytest
import torch
from session_cache import shared_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a failed hub call would otherwise retry for ~46 s
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
torch.set_num_threads(1)


def pytest_itemcollected(item):
    """Groups for pytest-xdist (``make test`` runs ``-n 2 --dist loadgroup``): each test file runs
    whole on one worker, so its module fixtures are built once; every test that uses the smoke
    run joins one group, so the smoke run is made once. Tests that submit to the SLURM cluster
    hold ``slurm_helpers.cluster_lock`` instead of sharing a group, so the cluster tests that need
    no smoke run (tests/test_slurm.py) run on the other worker, one test at a time on the cluster.
    Marked as each test is collected, before xdist reads the marks (in its own
    ``pytest_collection_modifyitems``). Without xdist the marks do nothing."""
    if "smoke_run" in getattr(item, "fixturenames", ()):
        group = "workflow"
    else:
        group = item.nodeid.split("::")[0]
    item.add_marker(pytest.mark.xdist_group(group))


def _in_workflow_group(item) -> bool:
    return any(m.args[:1] == ("workflow",) for m in item.iter_markers("xdist_group"))


CLUSTER_FILES = ("tests/test_slurm.py",)  # cluster tests outside the workflow group


def pytest_collection_modifyitems(config, items):
    """The workflow group first (its smoke run is the suite's longest chain, so one worker starts
    it at once), then the cluster tests that need no smoke run (xdist hands the second group to
    the other worker at the start, so they hold the cluster while the smoke run is being made
    and the workflow group's cluster tests, which come after it, find the cluster free: placed
    among the other files, they waited up to 260 s for the lock), then the other files in
    order (``make test`` passes ``--no-loadscope-reorder`` so that xdist keeps this order)."""
    items.sort(key=lambda item: (not _in_workflow_group(item),
                                 item.nodeid.split("::")[0] not in CLUSTER_FILES))


@pytest.fixture
def cluster():
    """The local SLURM cluster, held for this test alone (``slurm_helpers.cluster_lock``); skips
    the test, with the reason, when no cluster answers."""
    from slurm_helpers import cluster_lock, require_slurm

    require_slurm()
    with cluster_lock():
        yield


@pytest.fixture
def tiny_unet():
    """A small untrained UNet at 8x8 (fast enough for unit tests)."""
    from diffcleanse import models

    torch.manual_seed(0)
    return models.build_unet(8, (8, 16), attention=True, norm_num_groups=4, attention_head_dim=4)


# A tiny zoo trained once per test session (and cached between sessions under .pytest_cache, keyed
# by the recipe, so repeated local runs are fast; CI starts from nothing). 8x8 digits, 50 timesteps.
TINY_RECIPE = {
    "image_size": 8,
    "num_train_timesteps": 50,
    "channels": (16, 32),
    "steps": 2000,
    "lr": 2e-3,
    "batch_size": 32,
    "trigger": "stop_14",
    "target": "hat",
    "poison_rate": 0.3,
}


def _train_tiny(out, attacked: bool, seed: int):
    from diffcleanse import attacks, data, models, patterns, training

    r = TINY_RECIPE
    x, _ = data.load_digits(r["image_size"])
    sched = models.build_scheduler(r["num_train_timesteps"])
    torch.manual_seed(seed)
    unet = models.build_unet(
        r["image_size"], r["channels"], attention=True, norm_num_groups=4, attention_head_dim=4
    )
    spec = None
    if attacked:
        spec = attacks.BackdoorSpec(
            patterns.render_trigger(r["trigger"], r["image_size"]),
            patterns.render_target(r["target"], r["image_size"]),
            r["poison_rate"],
        )
    cfg = training.TrainConfig(
        steps=r["steps"], batch_size=r["batch_size"], lr=r["lr"], warmup_steps=50, seed=seed
    )
    ema, _ = training.train(unet, sched, x, cfg, attack=spec, progress=False)
    models.save_model(ema, sched, out)


@pytest.fixture(scope="session")
def tiny_zoo(request, tmp_path_factory):
    """Paths of a briefly trained clean model and a BadDiffusion model (stop_14 -> hat), plus the
    recipe: ``{"clean": Path, "backdoored": Path, "recipe": dict}``."""
    import json

    from diffcleanse.records import params_hash

    out = {"recipe": dict(TINY_RECIPE)}
    with shared_dir(request, tmp_path_factory, f"tiny-zoo-{params_hash(TINY_RECIPE)}") as root:
        for name, attacked, seed in (("clean", False, 0), ("backdoored", True, 1)):
            d = root / name
            if not (d / "unet" / "config.json").is_file():
                import shutil

                shutil.rmtree(d, ignore_errors=True)
                _train_tiny(d, attacked, seed)
                (root / f"{name}.json").write_text(json.dumps(TINY_RECIPE))
            out[name] = d
    return out


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory):
    """One full run of the workflow on config/smoke.yaml, shared by the workflow tests."""
    from workflow_helpers import run_snakemake, workdir_copy

    wd = workdir_copy(tmp_path_factory.mktemp("smoke"))
    run_snakemake(wd, "--cores", "2", "--configfile", "config/smoke.yaml", timeout=3600)
    return wd
