"""config/paper.yaml merged on top of config.yaml as Snakemake does IS the paper (Appendix D).

Each value is checked against the paper's text, per model where it varies (by image size or by
model group), on the paper manifest's own models.
"""

from pathlib import Path

import jsonschema
import pytest
import yaml
from snakemake.utils import update_config

from diffcleanse import permodel
from diffcleanse.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def merged():
    """config.yaml, then --configfile config/paper.yaml (Snakemake's update_config: a deep merge
    of dicts), validated against the workflow's schema."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    update_config(config, yaml.safe_load((REPO / "config/paper.yaml").read_text()))
    schema = yaml.safe_load((REPO / "src/diffcleanse/schemas/config.schema.yaml").read_text())
    jsonschema.validate(config, schema)
    return config


@pytest.fixture(scope="module")
def rows():
    """One manifest row per (model_type, dataset, image size, group) of the paper manifest."""
    m = load_manifest(REPO / "config/paper/manifest.tsv")
    seen, out = set(), []
    for mid in m.index:
        r = {k: (v.item() if hasattr(v, "item") else v) for k, v in m.loc[mid].items()}
        key = (r["model_type"], r["dataset"], int(r["image_size"]), r["group"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def test_stage1_bbti_is_the_papers(merged):
    inv, bbti, det = merged["inversion"], merged["inversion"]["bbti"], merged["detection"]
    assert "bbti" in inv["methods"] and inv["seeds"] == [0]  # run once
    assert bbti["gradient"] == "blackbox"
    assert bbti["init_scale"] == 1.0 and bbti["trigger_bound"] is None  # r ~ N(0, 1)
    assert bbti["max_iters"] == 100 and bbti["restarts"] == 1 and bbti["lr"] == 0.1
    assert bbti["explore"] == 0 and bbti["explore_patches"] == []  # one r ~ N(0, 1)
    assert bbti["entropy_loss"] is True and bbti["range_loss"] is False
    assert bbti["early_stop"] is True
    assert det["encoder"] == "clip" and det["clip_model"] == "ViT-B-32"
    assert det["kappa"] == 0.9 and det["kappa_class"] == 0.75 and det["kappa_d"] == 0.5
    assert det["target_kind"] == "manifest"
    assert (det["kappa_minus"], det["kappa_plus"]) == (0.1, 8.5)
    assert det["entropy_band"] is False and det["range_band"] is False


def test_stage1_sampler_by_attack_group(merged, rows):
    """"DDPM sampler for BadDiff and DDIM sampler for VillanDiff and TrojDiff" (Appendix D), by
    model group so that clean models are inverted as their group's backdoored ones; NCSN and LDM
    rows keep their own (score-SDE VE; DDIM)."""
    want = {"DDPM-C": "ddpm", "DDPM-A": "ddpm", "ODE-C": "ddim", "ODE-A": "ddim", "D2I": "ddim",
            "Din": "ddim", "Dout": "ddim", "NCSN-C": "manifest", "LDM-A": "manifest",
            "ADAPT": "manifest"}
    assert {r["group"] for r in rows} == set(want)
    for r in rows:
        got = permodel.resolve(merged["inversion"]["sampler"], r, "inversion.sampler")
        assert got == want[r["group"]], r["model_id"]


def test_stage1_batch_by_image_size(merged, rows):
    want = {32: 100, 64: 50, 256: 20}
    for r in rows:
        got = permodel.resolve(merged["inversion"]["batch_size"], r, "inversion.batch_size")
        assert got == want[int(r["image_size"])], r["model_id"]


def test_stage2_importance_and_ratios(merged, rows):
    rem = merged["removal"]
    assert rem["run_on"] == "backdoored" and rem["triggers"] == ["detected"]
    assert rem["t_threshold_frac"] == 0.95 and rem["importance_batch"] == 16  # T = 950
    assert (rem["rho_start"], rem["rho_end"]) == (0.0002, 1.0)
    assert rem["importance"] == {"normaliser": "none", "clean_timesteps": "above_T",
                                 "backdoor_timesteps": "above_T"}  # I = I_b - I_c, t > T
    assert rem["strategies"] == ["diffcleanse", "diffpruning"]
    assert rem["ratios"]["diffcleanse"] == [0.01, 0.02]  # 1-2 % per layer
    assert rem["groupnorm"] == "exact"
    diffpruning = {("ddpm", "cifar10"): [0.13], ("ncsn", "cifar10"): [0.13],
                   ("ddpm", "celebahq"): [0.07], ("ldm", "celebahq"): [0.05]}
    checked = set()
    for r in rows:
        key = (r["model_type"], r["dataset"])
        got = permodel.resolve(rem["ratios"]["diffpruning"], r, "removal.ratios.diffpruning")
        if key in diffpruning:
            assert got == diffpruning[key], r["model_id"]
            checked.add(key)
    assert checked == set(diffpruning)  # every group of the paper is in the manifest


def test_stage2_finetuning_budget(merged, rows):
    rem = merged["removal"]
    ft = rem["finetune"]
    assert rem["clean_data"] == "synthetic" and rem["synthetic_scale"] == 1.0
    assert ft["epochs"] == 40 and ft["lr"] == 2e-4 and "p" in ft["losses"]
    # the removal ablation fine-tunes with removal.finetune under its own overrides: after the
    # merge those must not keep config.yaml's CPU budget (an empty {} in paper.yaml did)
    assert {**ft, **rem["ablation"]["finetune"]}["epochs"] == 40
    images = {"cifar10": 6000, "celeba": 6000, "celebahq": 3000}
    batch = {32: 128, 64: 50, 256: 16}
    for r in rows:
        n = permodel.resolve(rem["synthetic_samples"], r, "removal.synthetic_samples")
        assert n == images[r["dataset"]], r["model_id"]
        b = permodel.resolve(ft["batch_size"], r, "removal.finetune.batch_size")
        assert b == batch[int(r["image_size"])], r["model_id"]
    from diffcleanse.removal.finetune import FinetuneConfig

    cifar = next(r for r in rows if r["dataset"] == "cifar10")
    steps = FinetuneConfig(epochs=ft["epochs"], batch_size=permodel.resolve(
        ft["batch_size"], cifar)).steps(permodel.resolve(rem["synthetic_samples"], cifar))
    assert steps == 1875  # the paper's budget, reached by config alone


def test_evaluation_protocol(merged):
    ev = merged["evaluation"]
    assert ev["fid"]["feature_extractor"] == "inception" and ev["fid"]["n_samples"] == 10000
    assert ev["asr"]["n_samples"] == 1000 and ev["asr"]["mse_threshold"] == 1e-3
    assert ev["fid"]["sampler"] is None and ev["asr"]["steps"] is None  # the model's sampler


def test_every_paper_key_differs_from_the_cpu_default_only_through_paper_yaml():
    """A key the paper file leaves out keeps the CPU default: list the stage keys whose CPU value
    is not the paper's and check paper.yaml sets each of them."""
    paper = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    for path in ["inversion.batch_size", "inversion.bbti.gradient", "inversion.bbti.max_iters",
                 "inversion.bbti.restarts", "inversion.bbti.explore",
                 "inversion.bbti.explore_patches", "inversion.bbti.init_scale",
                 "inversion.bbti.range_loss", "detection.encoder", "detection.target_kind",
                 "removal.ratios.diffpruning", "removal.importance.normaliser",
                 "removal.synthetic_scale", "removal.finetune.epochs", "removal.finetune.lr",
                 "removal.finetune.batch_size", "evaluation.fid.n_samples",
                 "evaluation.asr.n_samples", "evaluation.asr.mse_threshold"]:
        node = paper
        for part in path.split("."):
            assert part in node, f"config/paper.yaml does not set {path}"
            node = node[part]
