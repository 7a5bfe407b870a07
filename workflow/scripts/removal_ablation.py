"""Rule removal_ablation: every variant of one model and trigger source, pruned, evaluated,
fine-tuned and evaluated again (one job, one process start)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402
from diffcleanse.removal import ablation  # noqa: E402
from diffcleanse.removal import finetune as ft  # noqa: E402
from diffcleanse.removal import importance as imp  # noqa: E402

inp, params, wc = snakemake.input, snakemake.params, snakemake.wildcards  # noqa: F821
p = params.ablation
ev = {k: v for k, v in p["evaluation"].items() if k in ablation.AblationEval.__dataclass_fields__}
with lower_on_oom("removal.ablation.evaluation.batch_size", "removal.finetune.batch_size",
                  "removal.importance_batch", stage="the removal ablation"):
    rec = ablation.run_ablation(
        inp.model,
        inp.card,
        inp.data,
        wc.trigger,
        inp.get("trigger"),
        snakemake.output.records,  # noqa: F821
        snakemake.output.samples,  # noqa: F821
        grid=p["grid"],
        importance_cfg=imp.ImportanceConfig(**p["importance"]),
        finetune_cfg=ft.FinetuneConfig(**p["finetune"]),
        eval_cfg=ablation.AblationEval(**ev),
        seeds=p["seeds"],
        groupnorm=p["groupnorm"],
        classifier_dir=inp.get("fid_classifier"),
        reference_stats=inp.get("fid_reference"),
        class_classifier_dir=inp.get("class_classifier"),
        data_root=p["data_root"],
        download=p["download"],
        base_seed=params.seed,
        device=str(sampling.resolve_device(params.device)),
        allow_pickle=params.allow_pickle,
    )
log.info("%d variant runs in %.1f s", len(rec["rows"]), rec["seconds"])
