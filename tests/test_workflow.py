"""The workflow end to end on the smoke config, in a temporary copy of the repository."""

import json
import subprocess

import pytest
from workflow_helpers import REPO, SNAKEMAKE, run_snakemake, workdir_copy


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
def test_smoke_workflow_inverts_detects_and_tabulates(smoke_run):
    # The smoke models are trained 300 steps: the verdicts are not asserted, only the outputs.
    wd = smoke_run
    assert (wd / "results/classifiers/digits_16/weights.safetensors").is_file()
    for model in ("smoke-clean", "smoke-bd"):
        inv = wd / f"results/inversion/{model}/method~bbti"
        for name in ("trigger.safetensors", "trigger.png", "samples.png", "samples.safetensors"):
            assert (inv / name).stat().st_size > 0, name
        rec = json.loads((inv / "record.json").read_text())
        verdict = json.loads(
            (wd / f"results/detection/{model}/method~bbti/verdict.json").read_text()
        )
        assert verdict["verdict"] in ("clean", "backdoored") and 0 < verdict["mscr"] <= 1
        assert verdict["mscr"] == rec["mscr"] and verdict["encoder"] == "classifier:digits_16"
        assert rec["sampler"]["clip_sample"] is False and rec["batch_size"] == 8
        assert rec["params"]["inversion"]["max_iters"] == 3 and "seed" in rec
        for rule in ("invert_trigger", "detect"):
            assert (wd / f"results/logs/{rule}/{model}.log").is_file()
            assert (wd / f"results/benchmarks/{rule}/{model}.tsv").is_file()
    table = (wd / "results/tables/detection.md").read_text()
    assert "MSE < 0.01" in table and "classifier:digits_16" in table and "DDPM-D" in table
    csv = (wd / "results/tables/detection.csv").read_text().splitlines()
    assert len(csv) == 3 and csv[0].startswith("model,attack,group,truth,verdict")


@pytest.mark.slow
def test_smoke_workflow_prunes_and_finetunes_the_backdoored_model(smoke_run):
    # removal.run_on: backdoored in the smoke config (its backdoor is weak); only outputs are
    # asserted, not removal quality (tests/test_removal.py does that on a trained tiny model).
    from diffcleanse import models
    from diffcleanse.removal import pruned_io

    wd = smoke_run
    base = wd / "results/removal/smoke-bd"
    assert (base / "synthetic.safetensors").stat().st_size > 0
    assert json.loads((base / "synthetic.json").read_text())["n_images"] == 60
    imp = json.loads((base / "importance.json").read_text())
    assert imp["T"] == 48 and imp["timesteps"] == [49, 50] and imp["batch_size"] == 8
    assert imp["params"]["t_threshold_frac"] == 0.95 and len(imp["groups"]) > 10
    for strategy, ratio in (("diffcleanse", "0.02"), ("diffpruning", "0.1")):
        run = base / f"strategy~{strategy}/ratio~{ratio}"
        prune = json.loads((run / "prune.json").read_text())
        assert prune["params"] == {
            "strategy": strategy,
            "ratio": float(ratio),
            "groupnorm": "exact",
        }
        assert 0 < prune["out_channels"]["fraction_removed"] < 0.2
        assert prune["parameters"]["after"] < prune["parameters"]["before"]
        tag = f"smoke-bd/strategy~{strategy}/ratio~{ratio}"
        for rule in ("prune",) + tuple(f"finetune/{tag}/loss~{x}" for x in ("p", "c")):
            log = f"{rule}/{tag}" if rule == "prune" else rule
            assert (wd / f"results/logs/{log}.log").is_file()
            assert (wd / f"results/benchmarks/{log}.tsv").is_file()
        for loss in ("p", "c"):
            rec = json.loads((run / f"loss~{loss}/finetune.json").read_text())
            assert rec["params"]["loss"] == loss and rec["steps"] == 8
            unet, _ = models.load_model(run / f"loss~{loss}/finetuned")
            assert pruned_io.pruned_shapes(unet) == {
                k: v["after"] for k, v in prune["layers"].items()
            }
    summary = json.loads((base / "summary.json").read_text())
    assert summary["acted"] and len(summary["runs"]) == 4 and summary["flagged"] is None
    assert set(summary["seconds_per_model"]) == {"clean_data", "importance"}
    assert not (wd / "results/removal/smoke-clean").exists()  # run_on: backdoored


@pytest.mark.slow
def test_removal_follows_the_verdicts_when_run_on_flagged(smoke_run):
    wd = smoke_run
    cfg = (wd / "config/smoke.yaml").read_text().replace("run_on: backdoored", "run_on: flagged")
    (wd / "config/flagged.yaml").write_text(cfg)
    proc = run_snakemake(wd, "-n", "--configfile", "config/flagged.yaml")
    out = proc.stdout + proc.stderr
    for model in ("smoke-clean", "smoke-bd"):
        verdict = json.loads(
            (wd / f"results/detection/{model}/method~bbti/verdict.json").read_text()
        )
        assert f"results/removal/{model}/summary.json" in out
        if model == "smoke-clean":  # its removal jobs are scheduled exactly when it is flagged
            assert ("results/removal/smoke-clean/importance.json" in out) == verdict["backdoored"]


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


@pytest.mark.slow
def test_fetch_model_copies_a_local_model_with_its_card(tmp_path, tiny_zoo):
    wd = workdir_copy(tmp_path)
    header = (wd / "config/zoo-smoke.tsv").read_text().splitlines()[0]
    row = {
        "model_id": "fetched",
        "source": f"local:{tiny_zoo['clean']}",
        "init": "",
        "model_type": "ddpm",
        "dataset": "digits",
        "image_size": "8",
        "attack": "none",
        "trigger": "none",
        "target": "none",
        "poison_rate": "0",
        "seed": "0",
        "train_steps": "0",
        "sampler": "ddpm",
        "group": "DDPM-D",
    }
    line = "\t".join(row[c] for c in header.split("\t"))
    (wd / "config/local.tsv").write_text(f"{header}\n{line}\n")
    run_snakemake(
        wd,
        "results/models/fetched/card.json",
        "--cores",
        "1",
        "--configfile",
        "config/smoke.yaml",
        "--config",
        "manifest=config/local.tsv",
    )
    src = tiny_zoo["clean"] / "unet/diffusion_pytorch_model.safetensors"
    dst = wd / "results/models/fetched/model/unet/diffusion_pytorch_model.safetensors"
    from safetensors.torch import load_file

    a, b = load_file(src), load_file(dst)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    card = json.loads((wd / "results/models/fetched/card.json").read_text())
    assert card["source"].startswith("local:") and card["ground_truth"]["backdoored"] is False
    log = (wd / "results/logs/fetch_model/fetched.log").read_text()
    assert "Traceback" not in log
