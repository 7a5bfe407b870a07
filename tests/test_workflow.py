"""The workflow end to end on the smoke config, in a temporary copy of the repository."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]
COPY = ["Snakefile", "config.yaml", "config", "workflow", "envs", "profiles"]


def workdir_copy(dest: Path) -> Path:
    """The workflow files (not results) copied into ``dest``."""
    for name in COPY:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, symlinks=True)
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


def run_snakemake(workdir: Path, *args: str, timeout: int = 1200) -> subprocess.CompletedProcess:
    """Run Snakemake in ``workdir``; fail the test with its output when it fails."""
    proc = subprocess.run(
        [*SNAKEMAKE, *args], cwd=workdir, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One full smoke run shared by the workflow tests of this module."""
    wd = workdir_copy(tmp_path_factory.mktemp("smoke"))
    run_snakemake(wd, "--cores", "2", "--configfile", "config/smoke.yaml")
    return wd


@pytest.mark.slow
def test_smoke_workflow_makes_models_cards_and_galleries(smoke_run):
    wd = smoke_run
    for model in ("smoke-clean", "smoke-bd"):
        assert (
            wd / f"results/models/{model}/model/unet/diffusion_pytorch_model.safetensors"
        ).is_file()
        assert (wd / f"results/gallery/{model}.png").stat().st_size > 1000
        assert (wd / f"results/logs/train_model/{model}.log").is_file()
        assert (wd / f"results/benchmarks/train_model/{model}.tsv").is_file()
        card = json.loads((wd / f"results/models/{model}/card.json").read_text())
        assert card["model_id"] == model and card["manifest_row"]["model_id"] == model
    card = json.loads((wd / "results/models/smoke-bd/card.json").read_text())
    assert card["ground_truth"] == {
        "attack": "baddiffusion",
        "trigger": "box_14",
        "target": "hat",
        "poison_rate": 0.5,
        "backdoored": True,
    }
    assert 0 <= card["attack_check"]["asr"] <= 1 and card["training"]["init"].endswith(
        "smoke-clean/model"
    )
    # nothing a defence stage reads holds the ground truth
    assert not list((wd / "results/models/smoke-bd/model").rglob("card.json"))


@pytest.mark.slow
def test_unchanged_rerun_does_nothing(smoke_run):
    proc = run_snakemake(smoke_run, "-n", "--configfile", "config/smoke.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_lint_is_clean():
    proc = subprocess.run(
        [*SNAKEMAKE, "--lint"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Lints for" not in proc.stdout, proc.stdout


def test_paper_manifest_builds_its_dag_quickly(tmp_path):
    wd = workdir_copy(tmp_path)
    proc = run_snakemake(
        wd, "-n", "--quiet", "rules", "--configfile", "config/paper.yaml", timeout=300
    )
    assert "train_model" in proc.stdout and "fetch_model" in proc.stdout


def test_bad_manifest_stops_before_any_job(tmp_path):
    wd = workdir_copy(tmp_path)
    bad = (wd / "config/zoo-smoke.tsv").read_text().replace("baddiffusion", "badnets")
    (wd / "config/bad.tsv").write_text(bad)
    proc = subprocess.run(
        [*SNAKEMAKE, "-n", "--config", "manifest=config/bad.tsv"],
        cwd=wd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "badnets" in proc.stdout + proc.stderr and not (wd / "results").exists()
