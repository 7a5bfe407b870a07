"""Rule adaptive_snapshot_eval: utility and real-trigger ASR of one adaptive-training checkpoint."""

from pathlib import Path

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import evaluation, sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402

inp, params = snakemake.input, snakemake.params  # noqa: F821
with lower_on_oom("evaluation.fid.batch_size", stage="the snapshot's evaluation"):
    rec = evaluation.evaluate_model(
        Path(inp.snapshots) / f"step~{params.step}",
        inp.card,
        snakemake.output.metrics,  # noqa: F821
        snakemake.output.samples,  # noqa: F821
        params.evaluation,
        state="original",
        variant={"snapshot_step": params.step},
        classifier_dir=inp.get("fid_classifier"),
        reference_stats=inp.get("fid_reference"),
        class_classifier_dir=inp.get("class_classifier"),
        data_root=params.evaluation["data_root"],
        download=params.evaluation["download"],
        base_seed=params.seed,
        device=str(sampling.resolve_device(params.device)),
        allow_pickle=params.allow_pickle,
    )
log.info("%s step %d: %s %.4f, ASR real %s", rec["model"], params.step, rec["utility_metric"],
         rec["utility"], rec["asr_real"])
