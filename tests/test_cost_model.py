"""The cost model (diffcleanse.cost_model, benchmarks/cost_model.py): UNet calls counted by running
the samplers, the planned jobs equal to the workflow's own plan, work that scales with the
settings it reads, and prices made of measured rates and a fixed cost per job."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml
from snakemake.utils import update_config

from diffcleanse import cost_model
from diffcleanse.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


def _config(*files: str) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for f in files:
        update_config(config, yaml.safe_load((REPO / f).read_text()))
    return config


@pytest.fixture(scope="module")
def smoke():
    config = _config("config/smoke.yaml")
    return config, load_manifest(REPO / config["manifest"])


def test_unet_calls_are_counted_by_running_the_sampler():
    assert cost_model.unet_calls("ddpm", 1000) == 1000
    assert cost_model.unet_calls("ddim", 50) == 50
    heun = cost_model.unet_calls("heun", 1000)  # second order: two calls per step but the last
    assert 1.9 * 1000 < heun <= 2 * 1000
    ve = cost_model.unet_calls("score_sde_ve", 100, "ncsn")  # predictor + one corrector step
    assert ve > 1.5 * 100


def test_planned_jobs_equal_the_workflows_dry_run(smoke, tmp_path):
    """Per modelled rule, as many jobs as `snakemake -n` plans for config/smoke.yaml (the three
    evaluate rules are one stage): the model counts the workflow's jobs, not a guess of them."""
    from workflow_helpers import planned_jobs, workdir_copy

    config, manifest = smoke
    wd = workdir_copy(tmp_path / "wd")
    jobs = planned_jobs(wd, "--configfile", "config/smoke.yaml")
    dry: dict[str, int] = {}
    for rule, _ in jobs:
        rule = re.sub(r"^evaluate_(original|pruned|finetuned)$", "evaluate", rule)
        dry[rule] = dry.get(rule, 0) + 1
    planned = cost_model.jobs_by_rule(cost_model.plan_work(config, manifest))
    assert planned.pop("fetch_model", 0) == dry.get("fetch_model", 0)
    assert planned, planned
    assert {r: dry.get(r, 0) for r in planned} == planned


def _forward(plan: cost_model.Plan, rule: str) -> float:
    return sum(w.forward for w in plan.work if w.rule == rule)


def _backward(plan: cost_model.Plan, rule: str) -> float:
    return sum(w.backward for w in plan.work if w.rule == rule)


def test_work_scales_with_the_settings_it_reads(smoke):
    config, manifest = smoke
    base = copy.deepcopy(config)
    base["evaluation"]["asr"]["n_samples"] = 0
    more = copy.deepcopy(base)
    more["evaluation"]["fid"]["n_samples"] *= 2
    a, b = cost_model.plan_work(base, manifest), cost_model.plan_work(more, manifest)
    assert _forward(b, "evaluate") == pytest.approx(2 * _forward(a, "evaluate"))
    assert _forward(b, "invert_trigger") == _forward(a, "invert_trigger")

    steps = copy.deepcopy(config)
    steps["evaluation"]["fid"]["steps"] = 10
    steps["evaluation"]["asr"]["steps"] = 10
    c = cost_model.plan_work(steps, manifest)  # 10 of the smoke models' 50 timesteps
    assert _forward(c, "evaluate") == pytest.approx(_forward(
        cost_model.plan_work(config, manifest), "evaluate") / 5)

    longer = copy.deepcopy(config)
    longer["removal"]["finetune"]["epochs"] *= 4
    d = cost_model.plan_work(longer, manifest)
    base_ft = _backward(cost_model.plan_work(config, manifest), "finetune")
    # steps = ceil(epochs * images / batch): the smoke's few images round up at 2 epochs
    assert _backward(d, "finetune") == pytest.approx(4 * base_ft, rel=0.1)

    plain = copy.deepcopy(config)
    plain["inversion"]["bbti"]["explore"] = 0  # exploration is priced apart, below
    iters = copy.deepcopy(plain)
    iters["inversion"]["bbti"]["gradient"] = "zeroth_order"
    zo = cost_model.plan_work(iters, manifest)
    k = iters["inversion"]["bbti"].get("zo_directions", 6)
    f_plain = _forward(cost_model.plan_work(plain, manifest), "invert_trigger")
    assert _forward(zo, "invert_trigger") == pytest.approx((2 * k + 1) * f_plain)

    # each exploration candidate is one batch through the sampler, whatever the gradient
    explored = copy.deepcopy(plain)
    explored["inversion"]["bbti"]["explore"] = 5
    one_iter = copy.deepcopy(plain)
    one_iter["inversion"]["bbti"]["max_iters"] = 1
    b = plain["inversion"]["bbti"]
    per_pass = (_forward(cost_model.plan_work(one_iter, manifest), "invert_trigger")
                / (1 if b.get("gradient", "blackbox") != "zeroth_order" else 2 * k + 1))
    assert _forward(cost_model.plan_work(explored, manifest), "invert_trigger") == pytest.approx(
        f_plain + 5 * int(b.get("restarts", 1)) * per_pass)


def test_terd_work_counts_both_stages_and_the_checkpoint_recomputes(smoke):
    config, manifest = smoke
    only = copy.deepcopy(config)
    only["inversion"]["methods"] = ["terd"]
    only["inversion"]["terd"] = {"iterations": 30, "refine_iterations": 0}
    refined = copy.deepcopy(only)
    refined["inversion"]["terd"]["refine_iterations"] = 5
    ckpt = copy.deepcopy(refined)
    ckpt["inversion"]["terd"]["checkpoint"] = True
    s1, s2, s2c = (cost_model.plan_work(c, manifest) for c in (only, refined, ckpt))
    runs = sum(1 for w in s1.work if w.rule == "invert_trigger")  # models x seeds
    # stage 1: 2 calls x 16 rows per iteration; stage 2: (10 chain + 4) calls x 16 rows
    assert _backward(s1, "invert_trigger") == 30 * 2 * 16 * runs
    assert _backward(s2, "invert_trigger") - _backward(s1, "invert_trigger") == \
        5 * 14 * 16 * runs
    assert _forward(s2, "invert_trigger") == _forward(s1, "invert_trigger") > 0  # verdicts
    assert _forward(s2c, "invert_trigger") - _forward(s2, "invert_trigger") == 5 * 10 * 16 * runs
    assert not any("terd" in n for n in s2.notes)


def test_price_is_rates_times_work_plus_the_fixed_cost():
    plan = cost_model.Plan(work=[
        cost_model.Work("evaluate", "m", "a", forward=1000, batch=64, sampled=1000),
        cost_model.Work("finetune", "m", "a", forward=10, backward=100, batch=16),
        cost_model.Work("prune", "m", "a"),
    ])
    rates = {"a@32": cost_model.Rate(1e-3, 3e-3, 32, 1), "a@16": cost_model.Rate(2e-3, 5e-3, 16, 1)}
    costs = cost_model.price(plan, rates, job_overhead_s=10.0, max_batch=32)
    assert costs["evaluate"].total_s == pytest.approx(1000 * 1e-3 + 10)  # batch 64 priced at 32
    assert costs["finetune"].total_s == pytest.approx(10 * 2e-3 + 100 * 5e-3 + 10)
    assert costs["prune"].total_s == 10.0 and costs["prune"].compute_s == 0.0
    with pytest.raises(KeyError, match="a@16"):
        cost_model.price(plan, {"a@32": rates["a@32"]}, 10.0, 32)


def test_measured_rates_are_per_image_and_count_the_parameters(smoke):
    config, manifest = smoke
    plan = cost_model.plan_work(config, manifest)
    rates = cost_model.measure_rates(plan, max_batch=8, reps=1, progress=False)
    assert set(rates) == set(cost_model.needed_rates(plan, 8))
    for r in rates.values():
        assert 0 < r.forward_s < r.backward_s and r.params > 0 and r.batch <= 8


def test_the_papers_plan_is_dominated_by_sampling_for_the_evaluation():
    """Under config/paper.yaml most UNet evaluations are the FID and ASR samples of every model
    state through the full 1,000-step chains (what docs/cluster.md's cost section reports)."""
    config = _config("config/paper.yaml")
    plan = cost_model.plan_work(config, load_manifest(REPO / config["manifest"]))
    total = sum(w.forward + w.backward for w in plan.work)
    assert _forward(plan, "evaluate") > 0.5 * total
    assert {"hub-ddpm-32", "hub-ddpm-256", "hub-ldm-256"} <= set(plan.architectures)
