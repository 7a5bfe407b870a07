"""Memory: datasets load chunk by chunk to the same values, the bytes diffcleanse.memory charges
cover what loading really takes, and every smoke job ran within its first attempt's mem_mb."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffcleanse import data, evaluation, memory

REPO = Path(__file__).resolve().parents[1]


def _whole(images: torch.Tensor, size: int) -> torch.Tensor:
    """The conversion of the whole set at once (the code the chunked one replaced)."""
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if x.shape[-2:] != (size, size):
        down = size < min(x.shape[-2:])
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                          antialias=down)
    return (x.clamp(0, 1) * 2 - 1).contiguous()


@pytest.mark.parametrize("shape,size", [((10, 3, 40, 40), 16), ((7, 1, 12, 12), 20),
                                        ((9, 3, 8, 8), 8)])
def test_chunked_conversion_gives_the_values_of_the_whole_set(monkeypatch, shape, size):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(shape, generator=g) * 1.2 - 0.1  # a little outside [0, 1]: clamped
    u8 = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    monkeypatch.setattr(data, "CHUNK_VALUES", 2400)  # 1 to 12 images per chunk here
    assert torch.equal(data.to_model_range(x, size), _whole(x, size))
    want = _whole(u8.float() / 255.0, size)
    assert torch.equal(data.to_model_range(u8, size, divide=255.0), want)
    y = data.to_model_range(x, size)
    whole = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(evaluation.to_uint8(y), whole)


def test_a_folder_loads_image_by_image_to_the_values_of_the_whole_set(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (30, 40, 3), dtype=np.uint8) for _ in range(5)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
    got = data.load_folder(tmp_path, 16)
    want = []
    for a in arrays:  # centre crop and bicubic resize by PIL, then [0, 1] -> [-1, 1]
        im = Image.fromarray(a).crop((5, 0, 35, 30)).resize((16, 16), Image.Resampling.BICUBIC)
        want.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1))
    assert torch.equal(got, _whole(torch.stack(want), 16))


def test_the_bytes_charged_per_value_cover_a_measured_load():
    """benchmarks/memory.py in fresh processes: loading a folder, a uint8 array, and a folder plus
    its uint8 copy (an evaluation's reference) grows the peak RSS by at most BYTES_PER_VALUE per
    float32 value held, at least the 4 bytes of the result itself (the measurement sees the
    set), and less than the whole-set code it replaced."""
    proc = subprocess.run([sys.executable, "benchmarks/memory.py", "--images", "3000", "--size",
                           "64", "--json"], cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["bound"] == memory.BYTES_PER_VALUE
    for case, r in out["cases"].items():
        assert 3.5 <= r["new"] <= memory.BYTES_PER_VALUE, (case, r)
        assert r["old"] > 1.3 * r["new"], (case, r)


def test_data_mb_counts_the_values_a_job_holds(tmp_path):
    assert memory.data_mb("cifar10", 32) == -(-1.25 * 50_000 * 3 * 32 * 32 * 6 // 2**20)
    big = memory.data_mb("celebahq", 256, root=tmp_path)  # not on disk: CelebA-HQ's 30,000
    assert big > 40_000 and memory.data_mb("celebahq", 256, tmp_path, limit=3_000) < big / 9
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.JPG", "c.webp", "notes.txt"):
        (folder / name).write_bytes(b"x")
    assert memory.dataset_images(f"folder:{folder}") == 3
    assert memory.dataset_images(f"folder:{folder}", limit=2) == 2
    assert memory.target_data_mb("hat", "cifar10", 32) == 0
    assert memory.target_data_mb("class:3", "cifar10", 32) == memory.data_mb("cifar10", 32)
    assert memory.target_data_mb("mnist:7", "cifar10", 32) == memory.data_mb("mnist", 32)


@pytest.mark.slow
def test_every_smoke_job_ran_within_its_first_attempts_memory(smoke_run):
    """Each job's max_rss in its benchmark file is within the mem_mb its first SLURM attempt asks
    (the dry run's resources); the rule fid_reference asks its base plus the reference's MB, the
    evaluations only their base."""
    import pandas as pd
    from fault_helpers import full_dag

    jobs = full_dag(smoke_run, "--configfile", "config/smoke.yaml")
    checked, over, reference_jobs = 0, [], 0
    for job in jobs:
        mem = dict(job.resources).get("mem_mb")
        if not job.benchmark or mem is None or not (smoke_run / job.benchmark).is_file():
            continue
        rss = float(pd.read_csv(smoke_run / job.benchmark, sep="\t")["max_rss"].max())
        checked += 1
        if rss > int(mem):
            over.append(f"{job}: {rss:.0f} MB used, {mem} MB asked")
        if job.rule.startswith("evaluate_"):  # they read the reference's statistics
            assert int(mem) == 4000, job
        if job.rule == "fid_reference":  # which loads the reference once
            assert int(mem) == 4000 + memory.data_mb("digits", 16), job
            reference_jobs += 1
    assert not over, over
    assert checked > 60, checked
    assert reference_jobs == 1  # one dataset at one size
