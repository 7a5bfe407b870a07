"""What a reproduction costs on a device: the cost model of ``diffcleanse.cost_model`` priced with
measured seconds per UNet evaluation, per stage and in total, and how the total grows.

    # the paper's 377-model plan, rates measured here (CPU; random weights, a few batches)
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/cost_model.py --configfile config/paper.yaml \\
        --measure --device cpu --name "this machine's 2 CPU cores"

    # the same plan priced with rates measured on a GPU node (written there with --save-rates)
    .venv/bin/python benchmarks/cost_model.py --configfile config/paper.yaml --rates h200.json

    # check the model against a finished run: predicted against measured seconds per rule
    .venv/bin/python benchmarks/cost_model.py --measure --check results/benchmarks

The config is config.yaml with each ``--configfile`` merged on top (as Snakemake merges them).
The fixed cost per job is the median wall time of the run's light jobs with ``--check``, else
``--job-overhead`` seconds (default: measured here, the start of one stage process). Not a test:
the figures depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BENCHMARK_FOLDERS = {"train_adaptive": "train_model"}  # results/benchmarks/train_model/<id>.tsv
sys.path.insert(0, str(REPO / "src"))

from run_cost import read_costs  # noqa: E402  (benchmarks/run_cost.py, beside this script)

from diffcleanse import cost_model  # noqa: E402
from diffcleanse.manifest import load_manifest  # noqa: E402


def merged_config(files: list[str]) -> dict:
    """config.yaml, then each file deep-merged on top (Snakemake's update_config)."""
    from snakemake.utils import update_config

    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for f in files:
        update_config(config, yaml.safe_load(Path(f).read_text()))
    return config


def measured_overhead() -> float:
    """Seconds from process start to the stage modules imported (one run)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import diffcleanse.evaluation, diffcleanse.models"],
                   check=True, cwd=REPO)
    return time.perf_counter() - t0


def _rates_table(rates: dict[str, cost_model.Rate], archs: dict) -> str:
    lines = [f"  {'architecture@batch':<34}{'params':>9}{'px':>5}{'batch':>6}{'fwd ms/img':>12}"
             f"{'fwd+bwd ms/img':>16}{'ratio':>7}"]
    for key, r in rates.items():
        px = archs.get(key.split("@")[0], {}).get("sample_size", "")
        lines.append(f"  {key:<34}{r.params / 1e6:>8.1f}M{px:>5}{r.batch:>6}"
                     f"{r.forward_s * 1e3:>12.2f}{r.backward_s * 1e3:>16.2f}"
                     f"{r.backward_s / r.forward_s:>7.2f}")
    return "\n".join(lines)


def _plan_hours(config: dict, manifest, rates, overhead: float, max_batch: int, device: str
                ) -> float:
    """The total of a changed config (rates it needs that were not measured are measured)."""
    plan = cost_model.plan_work(config, manifest)
    missing = set(cost_model.needed_rates(plan, max_batch)) - set(rates)
    if missing:
        rates = {**rates, **cost_model.measure_rates(plan, device, max_batch, progress=False)}
    return cost_model.total_hours(cost_model.price(plan, rates, overhead, max_batch).values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configfile", action="append", default=[],
                   help="merged on top of config.yaml, in order (as snakemake --configfile)")
    p.add_argument("--measure", action="store_true", help="measure the rates on --device")
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-batch", type=int, default=64,
                   help="largest batch measured; larger batches are priced at it (default 64)")
    p.add_argument("--reps", type=int, default=5, help="timed calls per rate (the best counts)")
    p.add_argument("--rates", help="a rates file (JSON) written by --save-rates")
    p.add_argument("--save-rates", help="write the measured rates to this JSON file")
    p.add_argument("--name", default="", help="the device's name, for the printout")
    p.add_argument("--job-overhead", type=float, default=None,
                   help="fixed seconds per job (default: measured, or from --check's run)")
    p.add_argument("--check", help="a run's results/benchmarks: predicted against measured")
    p.add_argument("--no-growth", action="store_true", help="skip the what-if lines")
    a = p.parse_args()
    if not (a.measure or a.rates):
        p.error("give --measure (rates measured here) or --rates FILE")

    config = merged_config(a.configfile)
    manifest = load_manifest(REPO / config["manifest"])
    plan = cost_model.plan_work(config, manifest)
    if a.rates:
        raw = json.loads(Path(a.rates).read_text())
        rates = {k: cost_model.Rate(**v) for k, v in raw["rates"].items()}
        name = a.name or raw.get("name", a.rates)
        a.max_batch = int(raw.get("max_batch", a.max_batch))
    else:
        rates = cost_model.measure_rates(plan, a.device, a.max_batch, a.reps)
        name = a.name or a.device
    if a.save_rates:
        Path(a.save_rates).write_text(json.dumps(
            {"name": name, "max_batch": a.max_batch,
             "rates": {k: vars(v) for k, v in rates.items()}}, indent=1))

    measured = ({rule: (c.jobs, c.wall) for rule, c in read_costs(Path(a.check)).items()}
                if a.check else {})
    # rules that write their benchmark files under another rule's folder
    for rule, folder in BENCHMARK_FOLDERS.items():
        if measured and rule not in measured:
            for w in plan.work:
                if w.rule == rule:
                    w.rule = folder
    overhead = a.job_overhead
    if overhead is None and measured:
        modelled = cost_model.jobs_by_rule(plan)
        light = [wall / jobs for rule, (jobs, wall) in measured.items()
                 if rule not in modelled or rule in ("prune", "fetch_model")]
        overhead = statistics.median(light) if light else measured_overhead()
    elif overhead is None:
        overhead = measured_overhead()
    costs = cost_model.price(plan, rates, overhead, a.max_batch)

    models = sorted({w.model for w in plan.work})
    print(f"Cost model: {len(models)} models of {config['manifest']}, "
          f"config.yaml + {', '.join(a.configfile) or 'nothing'}; device: {name}")
    print("Seconds per image-evaluation (plain batched UNet, random weights):")
    print(_rates_table(rates, plan.architectures))
    print(f"Fixed cost per job: {overhead:.1f} s")
    print()
    total = cost_model.total_hours(costs.values())
    print(f"  {'rule':<18}{'jobs':>7}{'device-hours':>14}{'share':>8}{'of it sampling':>16}")
    for rule, jobs, hours, share in cost_model.summarise(costs):
        samp = costs[rule].sampled_s / 3600
        print(f"  {rule:<18}{jobs:>7}{hours:>14.1f}{share:>8.1%}{samp:>16.1f}")
    print(f"  {'total':<18}{sum(c.jobs for c in costs.values()):>7}{total:>14.1f}")
    top = cost_model.summarise(costs)[0]
    print(f"\nThe largest stage: {top[0]} ({top[3]:.0%} of the total); "
          f"{total / len(models):.2f} device-hours per model on average.")
    for note in plan.notes:
        print(f"Not modelled: {note}")
    print("Not modelled (fixed cost only if planned): " + ", ".join(cost_model.UNMODELLED))

    if not a.no_growth:
        print("\nHow the total grows (the model re-run with one setting changed):")
        whatifs = []
        c = copy.deepcopy(config)
        c["evaluation"]["fid"]["n_samples"] = int(c["evaluation"]["fid"]["n_samples"]) * 2
        whatifs.append(("FID samples doubled", c))
        for steps in (100,):
            c = copy.deepcopy(config)
            c["evaluation"]["fid"]["steps"] = steps
            c["evaluation"]["asr"]["steps"] = steps
            whatifs.append((f"evaluation with a {steps}-step sampler", c))
            c = copy.deepcopy(config)
            c["inversion"]["steps"] = steps
            whatifs.append((f"inversion with a {steps}-step sampler", c))
        c = copy.deepcopy(config)
        c["removal"]["finetune"]["losses"] = c["removal"]["finetune"]["losses"][:1]
        whatifs.append((f"one fine-tuning loss ({c['removal']['finetune']['losses'][0]})", c))
        for label, cfg in whatifs:
            h = _plan_hours(cfg, manifest, rates, overhead, a.max_batch, a.device)
            print(f"  {label:<40}{h:>12.1f} h  ({h / total - 1:+.0%})")
        print(f"  {'each model more (mean)':<40}{total / len(models):>12.2f} h")

    if measured:
        print(f"\nCheck against {a.check} (wall seconds per rule, summed over jobs):")
        print(f"  {'rule':<18}{'jobs':>6}{'planned':>8}{'measured s':>12}{'predicted s':>13}"
              f"{'ratio':>7}")
        planned = cost_model.jobs_by_rule(plan)
        for rule, (jobs, wall) in sorted(measured.items(), key=lambda kv: -kv[1][1]):
            if rule not in costs:
                continue
            pred = costs[rule].total_s
            print(f"  {rule:<18}{jobs:>6}{planned.get(rule, 0):>8}{wall:>12.0f}{pred:>13.0f}"
                  f"{pred / wall if wall else float('nan'):>7.2f}")


if __name__ == "__main__":
    main()
