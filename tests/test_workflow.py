"""The workflow end to end on the smoke config, in a temporary copy of the repository."""

import json
import re
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
    truth = card["ground_truth"]
    assert (truth["attack"], truth["trigger"], truth["target"]) == ("baddiffusion", "box_14", "hat")
    assert truth["poison_rate"] == 0.5 and truth["backdoored"] is True
    assert truth["backdoor_input"] == "noise + r" and truth["spec"]["trigger_norm"] > 0
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
        inv = wd / f"results/inversion/{model}/method~bbti/seed~0"
        for name in ("trigger.safetensors", "trigger.png", "samples.png", "samples.safetensors"):
            assert (inv / name).stat().st_size > 0, name
        rec = json.loads((inv / "record.json").read_text())
        verdict = json.loads(
            (wd / f"results/detection/{model}/method~bbti/seed~0/verdict.json").read_text()
        )
        assert verdict["verdict"] in ("clean", "backdoored") and 0 <= verdict["mscr"] <= 1
        assert verdict["mscr"] == rec["mscr"] and verdict["encoder"] == "classifier:digits_16"
        assert rec["sampler"]["clip_sample"] is False and rec["batch_size"] == 8
        assert rec["params"]["inversion"]["max_iters"] == 3 and "seed" in rec
        combined = json.loads((wd / f"results/detection/{model}/verdict.json").read_text())
        assert combined["verdict"] in ("clean", "backdoored") and "by_method" in combined
        assert (wd / f"results/detection/{model}/trigger.safetensors").is_file()
        assert (wd / f"results/logs/invert_trigger/{model}/method~bbti/seed~0.log").is_file()
        assert (wd / f"results/logs/detect/{model}/method~bbti/seed~0.log").is_file()
        assert (wd / f"results/logs/detect/{model}/combined.log").is_file()
        assert (wd / f"results/benchmarks/invert_trigger/{model}/method~bbti/seed~0.tsv").is_file()
    assert (wd / "results/detection/population/method~bbti.json").is_file()
    table = (wd / "results/tables/detection.md").read_text()
    assert "MSE 0.01" in table and "classifier:digits_16" in table and "DDPM-D" in table
    csv = (wd / "results/tables/detection.csv").read_text().splitlines()
    assert len(csv) == 6  # header + the five smoke models (one method, one seed)
    assert csv[0].startswith("model,method,seed,attack,group,truth,mscr,mscr_pairs,mscr_unbanded")


@pytest.mark.slow
def test_smoke_workflow_prunes_and_finetunes_the_backdoored_model(smoke_run):
    # removal.run_on lists smoke-bd and smoke-ad in the smoke config (its backdoors are weak);
    # only outputs are asserted, not removal quality (tests/test_removal.py does that on a
    # trained tiny model).
    from diffcleanse import models
    from diffcleanse.removal import pruned_io

    wd = smoke_run
    base = wd / "results/removal/smoke-bd"
    assert (base / "synthetic.safetensors").stat().st_size > 0
    assert json.loads((base / "synthetic.json").read_text())["n_images"] == 60
    trig = base / "trigger~detected"  # removal.triggers: stage 1's chosen trigger
    imp = json.loads((trig / "importance.json").read_text())
    assert imp["T"] == 48 and imp["timesteps"] == [49, 50] and imp["batch_size"] == 8
    assert imp["params"]["t_threshold_frac"] == 0.95 and len(imp["groups"]) > 10
    for strategy, ratio in (("diffcleanse", "0.02"), ("diffpruning", "0.1")):
        run = trig / f"strategy~{strategy}/ratio~{ratio}"
        prune = json.loads((run / "prune.json").read_text())
        assert prune["params"]["strategy"] == strategy and prune["params"]["ratio"] == float(ratio)
        assert prune["params"]["groupnorm"] == "exact"
        assert prune["params"]["scores"]["normaliser"] == "mean"  # config.yaml's removal.importance
        assert 0 < prune["out_channels"]["fraction_removed"] < 0.2
        assert prune["parameters"]["after"] < prune["parameters"]["before"]
        tag = f"smoke-bd/trigger~detected/strategy~{strategy}/ratio~{ratio}"
        for log in (f"prune/{tag}", *(f"finetune/{tag}/loss~{x}" for x in ("p", "c"))):
            assert (wd / f"results/logs/{log}.log").is_file(), log
            assert (wd / f"results/benchmarks/{log}.tsv").is_file(), log
        for loss in ("p", "c"):
            rec = json.loads((run / f"loss~{loss}/finetune.json").read_text())
            assert rec["params"]["loss"] == loss and rec["steps"] == 8
            unet, _ = models.load_model(run / f"loss~{loss}/finetuned")
            assert pruned_io.pruned_shapes(unet) == {
                k: v["after"] for k, v in prune["layers"].items()
            }
    summary = json.loads((base / "summary.json").read_text())
    assert summary["acted"] and len(summary["runs"]) == 4 and summary["flagged"] is None
    assert set(summary["seconds_per_model"]) == {"clean_data", "importance/trigger~detected"}
    for model in ("smoke-clean", "smoke-vd", "smoke-tj"):  # run_on lists smoke-bd, smoke-ad
        assert not (wd / f"results/removal/{model}").exists(), model
        assert not list((wd / f"results/evaluation/{model}").glob("trigger~*")), model
    assert (wd / "results/removal/smoke-ad/summary.json").is_file()


@pytest.mark.parametrize("override,key", [
    ("removal={'run_on': ['smoke-bd', 'smoke-zz']}", "removal.run_on"),
    ("evaluation={'ablation': {'t_models': ['smoke-zz']}}", "evaluation.ablation.t_models"),
])
def test_a_model_list_naming_a_model_outside_the_manifest_stops_before_any_job(
        tmp_path, override, key):
    wd = workdir_copy(tmp_path)
    proc = subprocess.run(
        [*SNAKEMAKE, "-n", "--configfile", "config/smoke.yaml", "--config", override],
        cwd=wd, capture_output=True, text=True, timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and not (wd / "results").exists(), out
    problem = next(p for ln in out.splitlines() for p in ln.split("; ")
                   if f"{key} names models that are not in the manifest" in p)
    assert "smoke-zz" in problem and "smoke-bd" not in problem, problem  # only the unknown one


@pytest.mark.slow
def test_removal_follows_the_verdicts_when_run_on_flagged(smoke_run):
    wd = smoke_run
    cfg = re.sub(r"(?m)^  run_on: .*$", "  run_on: flagged",
                 (wd / "config/smoke.yaml").read_text())
    assert "run_on: flagged" in cfg
    (wd / "config/flagged.yaml").write_text(cfg)
    proc = run_snakemake(wd, "-n", "--configfile", "config/flagged.yaml")
    out = proc.stdout + proc.stderr
    for model in ("smoke-clean", "smoke-bd"):
        verdict = json.loads((wd / f"results/detection/{model}/verdict.json").read_text())
        assert f"results/removal/{model}/summary.json" in out
        if model == "smoke-clean":  # its removal jobs are scheduled exactly when it is flagged
            planned = "results/removal/smoke-clean/trigger~detected/importance.json" in out
            assert planned == verdict["backdoored"]


@pytest.mark.slow
def test_smoke_workflow_evaluates_tabulates_and_reports(smoke_run):
    # Evaluation records per model state, the paper's tables and figures, and the HTML report.
    import pandas as pd

    from diffcleanse import tables

    wd = smoke_run
    ev = wd / "results/evaluation"
    states = sorted(p.relative_to(ev).as_posix() for p in ev.rglob("metrics.json"))
    assert "smoke-clean/state~original/metrics.json" in states
    assert "smoke-bd/state~original/metrics.json" in states
    assert any("smoke-bd/trigger~detected/strategy~diffcleanse/" in s and "state~pruned" in s
               for s in states)
    assert any("strategy~diffpruning/" in s and "loss~c/state~finetuned" in s for s in states)
    for rel in states:
        rec = json.loads((ev / rel).read_text())
        assert rec["utility_metric"] == "FD-digits-cls" and rec["utility"] >= 0
        assert rec["protocol"]["fid_n_samples"] == 32 and rec["protocol"]["mse_threshold"] == 0.01
        assert (ev / rel).with_name("samples.safetensors").is_file()
        if rec["model"] == "smoke-clean":
            assert rec["asr_real"] is None
        else:  # the four backdoored smoke models, one per attack
            assert 0 <= rec["asr_real"] <= 1 and 0 <= rec["asr_inverted"] <= 1
    bd = json.loads((ev / "smoke-bd/state~original/metrics.json").read_text())
    assert set(bd["inverted_by_method"]) == {"bbti"}  # evaluation with each method's trigger
    assert 0 <= bd["inverted_by_method"]["bbti"]["asr"] <= 1
    t1 = pd.read_csv(wd / "results/tables/table1.csv")
    keys = list(zip(t1["Attack"], t1["Model"], strict=True))
    paper = list(tables.PAPER_ROWS["table1"])
    assert keys[: len(paper)] == paper and ("BadDiff", "DDPM-D") in keys[len(paper):]
    empty = t1["Models"] == tables.NO_MODEL
    assert empty.any() and (t1.loc[empty, "BBTI ACC"] == tables.NO_MODEL).all()
    assert {"BBTI ACC", "BBTI ASR", "Combined ACC"} <= set(t1.columns)
    mine = t1.set_index(["Attack", "Model"]).loc[("BadDiff", "DDPM-D")]
    assert mine["Models"] == "1 clean / 1 bd" and 0 <= float(mine["BBTI ASR"]) <= 1
    t2 = pd.read_csv(wd / "results/tables/table2.csv")
    mine = t2[(t2["Model"] == "DDPM-D") & (t2["Attack"] == "BadDiff")]
    assert set(mine["State"]) == {"pruned", "fine-tuned (loss_p)"}
    skipped = t2[t2["Attack"].isin(["VillanDiff", "TrojDiff"]) & t2["Model"].str.endswith("-D")]
    assert len(skipped) == 2 and (skipped["Diff-Cleanse ΔASR"] == tables.NO_REMOVAL).all()
    assert "Diff-Cleanse ΔFD-digits-cls" in t2.columns and "Diff-Pruning ΔASR" in t2.columns
    assert (wd / "results/tables/tableI.md").read_text().startswith("# PureDiffusion's Table I")
    for name in ("table1", "table2", "table3", "table4", "table7"):
        md = (wd / f"results/tables/{name}.md").read_text()
        assert md.startswith("# Table") and tables.NO_MODEL in md, name
        if name != "table7":
            assert "FD-digits-cls" in md and "κ_m = 0.01" in md and "32 clean samples" in md
    t7 = pd.read_csv(wd / "results/tables/table7.csv").set_index("Attack")
    assert float(t7.loc["BadDiff", "Training"]) > 0 and float(t7.loc["BadDiff", "BBTI"]) > 0
    for fig in ("fig4", "fig5", "fig6"):
        for ext in ("png", "pdf"):
            assert (wd / f"results/figures/{fig}.{ext}").stat().st_size > 1000
    for model in ("smoke-clean", "smoke-bd"):
        assert (wd / f"results/figures/before_after/{model}.png").stat().st_size > 1000
    run_snakemake(wd, "--report", "report.html", "--configfile", "config/smoke.yaml")
    html = (wd / "report.html").read_text(errors="replace")
    assert len(html) > 10_000
    for text in ("table1.md", "table2.md", "table7.md", "fig4.png", "fig5.png", "smoke-bd.png"):
        assert text in html, text
    # the front page names the utility metric (not Inception FID) and the ablations' status
    assert "FD-&lt;dataset&gt;-cls" in html and "not</em> Inception FID" in html
    assert "Table 3 (entropy loss) is included" in html


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


PER_MODEL_GROUPS = {"model", "detect", "remove"}  # the chain; "ablation" where the config asks


def test_paper_run_submits_three_slurm_jobs_per_model(tmp_path):
    """The paper's 373-model plan builds its DAG, and through the cluster profile's groups each
    model's chain is three SLURM submissions (model, detection, removal), plus one for the
    removal ablation on the models the config lists; only the rules over the whole zoo run on
    their own. Read from the dry run, as Snakemake would submit it (``-n`` contacts no cluster)."""
    from collections import defaultdict

    from workflow_helpers import dry_run_jobs

    wd = workdir_copy(tmp_path)
    proc = run_snakemake(wd, "-n", "--profile", "profiles/slurm", "--configfile",
                         "config/paper.yaml", timeout=600)
    jobs = dry_run_jobs(proc.stdout + proc.stderr)
    rules = {rule for _, rule, _ in jobs}
    assert {"train_model", "fetch_model", "invert_trigger", "finetune"} <= rules
    groups: dict[str, set[str]] = defaultdict(set)
    ablated = set()
    for group, rule, wc in jobs:
        if "model" not in wc:  # over the zoo (tables, figures, classifiers): its own job
            assert group is None, (group, rule)
            continue
        assert group is not None, (rule, wc)  # every per-model job is in a group ...
        kind, model = group.split("-", 1)
        assert model == wc["model"], (group, rule, wc)  # ... of its own model
        assert "#" not in model, f"{group}: a group that falls apart into two submissions"
        groups[model].add(kind)
        ablated |= {model} if kind == "ablation" else set()
    from diffcleanse.manifest import load_manifest

    assert len(groups) == len(load_manifest(wd / "config/paper/manifest.tsv")) >= 373
    for model, kinds in groups.items():
        assert kinds - {"ablation"} <= PER_MODEL_GROUPS, (model, kinds)
    assert 0 < len(ablated) < len(groups)
    ungrouped = sum(1 for g, _, _ in jobs if g is None)  # an upper bound: some are localrules
    submissions = sum(len(k) for k in groups.values()) + ungrouped
    assert len(jobs) > 5 * submissions  # measured: 8,011 jobs, 1,134 groups, 20 ungrouped


def _job_counts(stdout):
    counts = {}
    for line in stdout.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            counts[parts[0]] = int(parts[1])
    return counts


@pytest.mark.parametrize("overlay, methods", [
    (None, ["bbti", "elijah"]),
    ("config/baselines.yaml", ["bbti", "elijah", "purediffusion", "terd"]),
])
def test_default_run_inverts_every_model_with_every_method(tmp_path, overlay, methods):
    """The default config runs BBTI and Elijah (the paper's pair) on every model of its zoo, the
    baselines overlay all four methods: one job per model, method and seed, a population detector
    per method and one detection table."""
    import yaml

    wd = workdir_copy(tmp_path)
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    extra = []
    if overlay is not None:
        cfg["inversion"] |= yaml.safe_load((wd / overlay).read_text())["inversion"]
        extra = ["--configfile", overlay]
    assert cfg["inversion"]["methods"] == methods
    n_models = len((wd / cfg["manifest"]).read_text().strip().splitlines()) - 1
    counts = _job_counts(run_snakemake(wd, "-n", "--quiet", "rules", *extra, timeout=300).stdout)
    assert counts["invert_trigger"] == counts["detect_method"] == n_models * len(methods)
    assert counts["detect"] == n_models and counts["detect_population"] == len(methods)
    assert counts["detection_table"] == 1


def test_an_overlay_under_directory_keeps_the_embedded_defaults(tmp_path):
    """`--directory runs/<name>` with a `--configfile` overlay (the README's external-zoo command)
    merges the overlay onto config.yaml, not onto the schema's defaults: the default methods (BBTI
    and Elijah) and seeds from the overlay. (A relative `configfile:` is looked up in the working
    directory, and Snakemake skips it silently when an overlay is given: BBTI then ran the
    paper's settings instead of the default's, and a five-seed table changed with it.)"""
    import yaml

    wd = workdir_copy(tmp_path)
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    n_models = len((wd / cfg["manifest"]).read_text().strip().splitlines()) - 1
    seeds = yaml.safe_load((wd / "config/seeds.yaml").read_text())["inversion"]["seeds"]
    out = run_snakemake(wd, "-n", "--quiet", "rules", "--directory", "runs/elsewhere",
                        "--configfile", "config/seeds.yaml", timeout=300).stdout
    assert len(cfg["inversion"]["methods"]) == 2  # the schema's default is one method
    assert _job_counts(out)["invert_trigger"] == n_models * 2 * len(seeds)


def test_the_readmes_external_zoo_command_plans(tmp_path):
    """The README's command for the external zoo (config/external.yaml + seeds, run under
    `--directory runs/external`) builds its DAG: BBTI on each of its models from each seed (its
    zoo is too small for Elijah's forest), then detection, removal and the tables. The models
    themselves are not needed for the plan: empty folders stand in at ../shared/zoo-external."""
    import yaml

    wd = workdir_copy(tmp_path / "repo")
    rows = (wd / "config/zoo-external.tsv").read_text().splitlines()
    ids = [r.split("\t")[0] for r in rows if r and not r.startswith(("#", "model_id"))]
    for m in ids:
        (tmp_path / "shared" / "zoo-external" / m).mkdir(parents=True)
    seeds = yaml.safe_load((wd / "config/seeds.yaml").read_text())["inversion"]["seeds"]
    out = run_snakemake(wd, "-n", "--quiet", "rules", "--configfile", "config/external.yaml",
                        "config/seeds.yaml", "--directory", "runs/external", timeout=300).stdout
    counts = _job_counts(out)
    assert len(ids) == 3 and counts["fetch_model"] == len(ids)
    assert counts["invert_trigger"] == counts["detect_method"] == len(ids) * len(seeds)
    assert counts["detection_table"] == counts["tables"] == 1


def test_oracle_removal_overlay_repairs_every_backdoored_model_from_its_true_trigger(tmp_path):
    """config/oracle-removal.yaml plans removal on each backdoored model of the default zoo, and
    on no clean one, from the card's trigger (trigger~true): clean data, importance, both
    methods' pruning and fine-tuning and the evaluation of every state; without the checkpoint
    (run_on: backdoored does not wait for detection)."""
    import yaml

    wd = workdir_copy(tmp_path)
    cfg = yaml.safe_load((wd / "config.yaml").read_text())
    rows = [line.split("\t") for line in (wd / cfg["manifest"]).read_text().splitlines()]
    attack = rows[0].index("attack")
    backdoored = [r[0] for r in rows[1:] if r[attack] != "none"]
    assert 0 < len(backdoored) < len(rows) - 1
    out = run_snakemake(wd, "-n", "--configfile", "config/oracle-removal.yaml", timeout=300).stdout
    counts = _job_counts(out)
    n, methods = len(backdoored), len(cfg["removal"]["strategies"])
    assert counts["true_trigger"] == counts["clean_data"] == counts["importance"] == n
    assert counts["removal_summary"] == n
    assert counts["prune"] == counts["finetune"] == n * methods
    assert counts["evaluate_pruned"] == counts["evaluate_finetuned"] == n * methods
    planned = set(re.findall(r"results/removal/([^/\s]+)/trigger~(\w+)/importance\.json", out))
    assert planned == {(m, "true") for m in backdoored}


def test_a_zoo_too_small_for_a_methods_detector_stops_before_any_job(tmp_path):
    """The smoke zoo has one clean model: Elijah's forest and TERD's calibrated threshold cannot
    judge it, and the workflow says so when the DAG is built, not after hours of inversion."""
    wd = workdir_copy(tmp_path)
    proc = run_snakemake(wd, "-n", "--configfile", "config/smoke.yaml", "--config",
                         'inversion={"methods": ["bbti", "elijah", "terd"]}', check=False,
                         timeout=300)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "inversion method elijah" in out and "at least 3 clean and 3 backdoored" in out
    assert "inversion method terd" in out and "leave the method out of inversion.methods" in out
    assert not (wd / "results").exists()


@pytest.mark.slow
def test_inversion_sampler_reruns_exactly_the_models_whose_sampler_it_changes(smoke_run):
    """`inversion.sampler` by group (the paper's protocol: DDIM for TrojDiff): on the finished
    smoke run only the TrojDiff model's inversions are planned again, for their changed params;
    naming the ODE row's own sampler (ddim) changes nothing."""
    from workflow_helpers import dry_run_jobs

    def planned(sampler: str) -> set[str]:
        proc = run_snakemake(smoke_run, "-n", "--configfile", "config/smoke.yaml",
                             "--rerun-triggers", "params", "--config",
                             f'inversion={{"sampler": {sampler}}}', timeout=300)
        return {wc["model"] for _, rule, wc in dry_run_jobs(proc.stdout + proc.stderr)
                if rule == "invert_trigger"}

    assert planned('{"D2I": "ddim", "default": "manifest"}') == {"smoke-tj"}
    assert planned('{"ODE-D": "ddim", "default": "manifest"}') == set()


def test_training_starts_with_the_longest_chain_of_training_steps(tmp_path):
    """The default zoo's dry run: every training job outranks every other job, and of the
    trainings `clean-a` (3,000 steps, then the 3,000 of a BadDiffusion row that fine-tunes it)
    comes first, the 3,000-step rows before the shorter attacks, the 1,000-step rows last."""
    from workflow_helpers import planned_priorities

    prio = planned_priorities(workdir_copy(tmp_path))
    train = {k[1].removeprefix("model="): v for k, v in prio.items()
             if k[0] in ("train_model", "train_adaptive")}
    assert len(train) == 8, train
    assert min(train.values()) > max(v for k, v in prio.items()
                                      if k[0] not in ("train_model", "train_adaptive"))
    # TRAIN_PRIORITY (10) + the chain's steps / the longest chain's (clean-a: 3,000 + 3,000)
    assert train["clean-a"] == pytest.approx(11.0)
    assert train["bd-box-hat"] == train["bd-stop-corner"] == pytest.approx(10.5)  # 3,000 each
    assert train["bd-box-hat"] > train["vd-box-shoe"] > train["ad-box-shoe"] > train["clean-b"]
    assert train["clean-b"] == train["clean-c"] == train["tj-blend-mickey"] == min(train.values())


def test_an_unknown_inversion_sampler_stops_before_any_job(tmp_path):
    wd = workdir_copy(tmp_path)
    proc = run_snakemake(wd, "-n", "--configfile", "config/smoke.yaml", "--config",
                         'inversion={"sampler": {"D2I": "dpm", "default": "manifest"}}',
                         check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "inversion.sampler: 'dpm' (for model smoke-tj) is not a stock sampler" in out
    assert "dpmpp_o2" in out and not (wd / "results").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_stops_before_any_job(tmp_path):
    """`device: cuda` on a machine without one: one clear error as the run starts, no job run."""
    wd = workdir_copy(tmp_path)
    proc = run_snakemake(wd, "--cores", "1", "--configfile", "config/smoke.yaml", "--config",
                         "device=cuda", check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "nothing was run: device 'cuda' was asked for but this machine has no CUDA GPU" in out
    assert "`device: auto` (or cpu)" in out
    assert not (wd / "results").exists()  # no job started, nothing written


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
        "attack_params": "",
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
        # the smoke removal's and ablations' models are not in this zoo
        'removal={"ablation": {"models": []}, "run_on": "backdoored"}',
        'evaluation={"ablation": {"t_models": []}}',  # [] as null: every backdoored model
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


@pytest.mark.slow
def test_run_cost_sums_the_benchmark_files_of_a_run(smoke_run):
    """benchmarks/run_cost.py: one row per rule that wrote benchmark files, its job count and CPU
    seconds those of the files (read here with pandas), the heaviest rule first."""
    import importlib.util
    import sys

    import pandas as pd

    spec = importlib.util.spec_from_file_location("run_cost", REPO / "benchmarks/run_cost.py")
    run_cost = importlib.util.module_from_spec(spec)
    sys.modules["run_cost"] = run_cost  # dataclasses look their module up there
    spec.loader.exec_module(run_cost)
    root = smoke_run / "results/benchmarks"
    costs = run_cost.read_costs(root)
    files: dict[str, list] = {}
    for tsv in root.rglob("*.tsv"):
        rel = tsv.relative_to(root)
        files.setdefault(rel.parts[0] if len(rel.parts) > 1 else rel.stem, []).append(tsv)
    assert set(costs) == set(files) and {"train_model", "invert_trigger", "finetune"} <= set(costs)
    for rule, paths in files.items():
        cpu = sum(float(pd.read_csv(p, sep="\t")["cpu_time"].iloc[-1]) for p in paths)
        assert costs[rule].jobs == len(paths) and costs[rule].cpu == pytest.approx(cpu), rule
    text = run_cost.report(costs, 2, markdown=True)
    first = text.splitlines()[2].split(" | ")[0].strip("| ")
    assert first == max(costs, key=lambda r: costs[r].cpu)
    assert f"{sum(c.jobs for c in costs.values())} jobs" in text


def test_the_cpu_test_profile_groups_jobs_as_the_cluster_profile():
    """The SLURM tests run profiles/slurm-cpu-test; its job groups and GPU scope must be the
    cluster profile's, so that what they check is what a cluster gets."""
    import yaml

    cluster = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    test = yaml.safe_load((REPO / "profiles/slurm-cpu-test/config.yaml").read_text())
    for key in ("groups", "resources", "set-resource-scopes"):
        assert test[key] == cluster[key], key
    assert cluster["resources"] == ["gpu=1"] and cluster["set-resource-scopes"] == ["gpu=local"]
    assert 1 <= test["cores"] <= cluster["cores"]
    rules = set(re.findall(r"^(?:rule|checkpoint) (\w+):", "\n".join(
        p.read_text() for p in (REPO / "workflow/rules").glob("*.smk")), re.M))
    assert set(cluster["groups"]) <= rules, set(cluster["groups"]) - rules
