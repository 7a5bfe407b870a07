"""Determinism (issue 15, item 4): the same config gives the same numbers in two fresh runs, and
changing one stage's parameter reruns exactly that stage's jobs and their descendants.

The stages and their descendants come from the workflow itself (a ``snakemake -n --forceall`` of
the smoke run, edges from inputs to outputs; tests/fault_helpers.py); the only hand-written part
is ``STAGE_PARAMS``, which says which config key feeds which rules. A rule of the workflow that
has no entry there (and is not in ``NO_OWN_PARAMS``) fails the coverage test, so a new stage
cannot go untested.
"""

from __future__ import annotations

import pytest
from fault_helpers import (
    descendants,
    differences,
    dry_runs,
    edges,
    killed_and_resumed_run,
    output_files,
    parse_jobs,
    remember_dag,
    result_files,
)
from workflow_helpers import changed_config

pytestmark = pytest.mark.slow
CONFIG = "config/smoke.yaml"

# config key -> (a new valid value, the rules whose own params it changes, a wildcard filter).
# Changing the key must rerun exactly those rules' jobs (restricted by the filter) and every job
# downstream of them, nothing else.
STAGE_PARAMS: dict[str, tuple[object, set[str], dict[str, str]]] = {
    "train.batch_size": (8, {"train_model", "train_adaptive"}, {}),
    "gallery.n_samples": (3, {"gallery"}, {}),
    "classifier.steps": (100, {"train_classifier", "train_target_classifier"}, {}),
    "inversion.bbti.lr": (0.05, {"invert_trigger", "ablate_entropy_loss"}, {"method": "bbti"}),
    "detection.kappa_d": (0.6, {"invert_trigger", "detect_method", "ablate_entropy_loss"}, {}),
    "detection.asr_mse_threshold": (0.02, {"invert_trigger", "detect_method",
                                           "ablate_entropy_loss", "detection_table"}, {}),
    "removal.synthetic_scale": (0.02, {"clean_data"}, {}),
    "removal.importance_batch": (4, {"importance", "ablate_threshold", "removal_ablation"}, {}),
    "removal.groupnorm": ("interleaved", {"prune", "ablate_threshold", "removal_ablation"}, {}),
    "removal.finetune.lr": (1.0e-4, {"finetune", "removal_ablation"}, {}),
    "removal.ablation.evaluation.asr_n_samples": (4, {"removal_ablation"}, {}),
    "evaluation.fid.n_samples": (16, {"evaluate_original", "evaluate_pruned",
                                      "evaluate_finetuned", "ablate_entropy_loss",
                                      "ablate_threshold", "adaptive_snapshot_eval"}, {}),
    "evaluation.fid.n_reference": (500, {"fid_reference", "evaluate_original", "evaluate_pruned",
                                         "evaluate_finetuned", "ablate_entropy_loss",
                                         "ablate_threshold", "adaptive_snapshot_eval",
                                         "removal_ablation"}, {}),
    "evaluation.figures.entropy_images": (100, {"figure_entropy"}, {}),
    # every rule that evaluates a UNet (and detect_method, whose record states it; fid_reference,
    # whose features must be made as the evaluations make theirs: TF32 or not)
    "precision": ("bf16", {"train_model", "train_adaptive", "invert_trigger", "detect_method",
                           "fid_reference",
                           "evaluate_original", "evaluate_pruned", "evaluate_finetuned",
                           "ablate_entropy_loss", "ablate_threshold", "adaptive_snapshot_eval",
                           "clean_data", "importance", "finetune", "elijah_removal",
                           "removal_ablation"}, {}),
}
# Rules without config parameters of their own: aggregations, figures drawn from records, and
# rules whose only params are the DAG's shape (methods, seeds, run_on, the adaptive models):
# changing those changes which jobs exist, not what one job computes.
NO_OWN_PARAMS = {"all", "detect", "detect_population", "tables", "table3", "before_after",
                 "figure_mscr_asr", "figure_threshold", "removal_summary", "true_trigger",
                 "fig14", "table8", "removal_ablation_table", "removal_ablation_figure",
                 "removal_ablation_samples"}


@pytest.fixture(scope="module")
def plans(smoke_run):
    """The full DAG (``--forceall``) and the plan after each change of ``STAGE_PARAMS``, from one
    Python process (one cold start)."""
    cfgs = [changed_config(smoke_run, f"changed-{i}", **{key: value})
            for i, (key, (value, _, _)) in enumerate(STAGE_PARAMS.items())]
    logs = dry_runs(smoke_run, [["--forceall", "--configfile", CONFIG],
                                *(["--configfile", c] for c in cfgs)])
    dag = parse_jobs(logs[0])
    remember_dag(smoke_run, ["--configfile", CONFIG], dag)  # test_faults.py reuses it
    return dag, dict(zip(STAGE_PARAMS, logs[1:], strict=True))


def test_every_stage_of_the_workflow_has_a_parameter_in_the_table(plans):
    dag, _ = plans
    rules = {j.rule for j in dag}
    covered = set().union(*(r for _, r, _ in STAGE_PARAMS.values()))
    missing = rules - covered - NO_OWN_PARAMS
    assert not missing, (f"rules with no entry in STAGE_PARAMS (add the config key that drives "
                         f"each, or list it in NO_OWN_PARAMS with why): {sorted(missing)}")
    assert {j.rule for j in dag if j.heavy} <= covered


def test_changing_one_stages_parameter_reruns_exactly_its_descendants(plans):
    dag, logs = plans
    graph = edges(dag)
    failures = []
    for key, (_, rules, where) in STAGE_PARAMS.items():
        roots = [j for j in dag if j.rule in rules
                 and all(j.wc.get(k, v) == v for k, v in where.items())]
        expected = {j.key for j in descendants(graph, roots)}
        got = {j.key for j in parse_jobs(logs[key])}
        if got != expected:
            failures.append(f"{key}: extra {sorted(got - expected)}, missing "
                            f"{sorted(expected - got)}")
    assert not failures, "\n".join(failures)


def test_two_fresh_runs_give_the_same_records(smoke_run, tmp_path_factory):
    """The second fresh run (tests/fault_helpers.killed_and_resumed_run) runs the same config for
    one job of every per-model stage and everything those need (``stage_cover``), at a fraction
    of the zoo's cost; one job of every heavy rule in it was SIGKILLed and rerun, so equality
    also covers resume (test_faults.py checks the kills themselves). Records are compared
    without timing keys, tensors byte for byte, tables without timing columns. Tables and
    figures over the whole zoo are not rerun (their inputs are compared)."""
    run = killed_and_resumed_run(smoke_run, tmp_path_factory.mktemp("second-run"))
    assert run.passes[-1].returncode == 0, run.log()
    made = result_files(run.workdir)
    expected = output_files(smoke_run, run.cover.jobs)
    assert made <= output_files(run.workdir, run.cover.jobs), made - expected
    diff = differences(smoke_run, run.workdir, expected | made)
    killed = {o for k in run.kills for o in k.job.outputs}
    assert not diff, "\n".join(f"{f}: {why}" + (" (its job was killed and rerun)"
                                                 if f in killed else "")
                               for f, why in diff.items())
    stages = {j.rule for j in run.cover.representatives}
    assert {j.rule for j in run.jobs if "model" in j.wc} - stages <= set(run.cover.left_out)
    assert len(expected) > 20 and any(f.endswith(".safetensors") for f in expected)


def test_the_record_comparison_sees_numbers_and_ignores_only_timing(tmp_path):
    """The comparison behind the determinism and fault tests is not vacuous."""
    import json

    import torch
    from safetensors.torch import save_file

    a, b = tmp_path / "a", tmp_path / "b"
    for root, (asr, secs, order, value, col) in {
        a: (0.5, 1.0, ("x", "y"), 0.0, "1.5"),
        b: (0.5, 9.0, ("y", "x"), 0.0, "7.5"),
    }.items():
        (root / "results/r").mkdir(parents=True)
        rec = {"asr": asr, "seconds": secs, "inversion_seconds": secs, "created_unix": int(secs),
               "model_dir": f"results/r/tmp{'abcdefgh' if root == a else 'zyxwvuts'}/pruned"}
        (root / "results/r/rec.json").write_text(json.dumps(rec))
        save_file({"t": torch.full((2,), value)}, str(root / "results/r/t.safetensors"),
                  metadata={k: k for k in order})
        (root / "results/r/t.csv").write_text(f"model,asr,seconds per model\nm,0.5,{col}\n")
        (root / "results/r/t.md").write_text(f"# T\n\n| model | seconds |\n|---|---|\n"
                                             f"| m | {col} |\n")
    files = result_files(a)
    assert files == {f"results/r/{n}" for n in ("rec.json", "t.safetensors", "t.csv", "t.md")}
    assert differences(a, b, files) == {}
    rec = json.loads((b / "results/r/rec.json").read_text())
    (b / "results/r/rec.json").write_text(json.dumps({**rec, "asr": 0.51}))
    save_file({"t": torch.full((2,), 1e-7)}, str(b / "results/r/t.safetensors"))
    (b / "results/r/t.csv").write_text("model,asr,seconds per model\nm,0.49,7.5\n")
    diff = differences(a, b, files)
    assert set(diff) == {"results/r/rec.json", "results/r/t.safetensors", "results/r/t.csv"}
    assert "asr" in diff["results/r/rec.json"]
