"""Rule ablate_threshold: Diff-Cleanse pruning with another threshold T, evaluated (Fig. 6)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import evaluation, sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402

inp, params, out = snakemake.input, snakemake.params, snakemake.output  # noqa: F821
with lower_on_oom("evaluation.fid.batch_size", "removal.importance_batch",
                  stage="the threshold ablation"):
    rec = evaluation.ablate_threshold(
        inp.model,
        inp.card,
        inp.data,
        inp.trigger,
        inp.original,
        dict(out.items()),
        params.evaluation,
        params.importance,
        t_threshold_frac=params.t,
        ratio=params.ratio,
        groupnorm=params.groupnorm,
        scores=params.scores,
        allow_pickle=params.allow_pickle,
        classifier_dir=inp.get("fid_classifier"),
        reference_stats=inp.get("fid_reference"),
        class_classifier_dir=inp.get("class_classifier"),
        data_root=params.evaluation["data_root"],
        download=params.evaluation["download"],
        base_seed=params.seed,
        device=str(sampling.resolve_device(params.device)),
    )
log.info("T=%s: ASR %s, delta %s", rec["T"], rec["asr_real"], rec["delta_utility"])
