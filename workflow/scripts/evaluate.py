"""Rules evaluate_original/_pruned/_finetuned: utility and ASR of one model state (one record)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import evaluation, sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402

inp, params = snakemake.input, snakemake.params  # noqa: F821
with lower_on_oom("evaluation.fid.batch_size", stage="the evaluation"):
    rec = evaluation.evaluate_model(
        inp.model,
        inp.card,
        snakemake.output.metrics,  # noqa: F821
        snakemake.output.samples,  # noqa: F821
        params.evaluation,
        state=params.state,
        variant=params.variant,
        classifier_dir=inp.get("fid_classifier"),
        reference_stats=inp.get("fid_reference"),
        class_classifier_dir=inp.get("class_classifier"),
        inverted_trigger=inp.trigger,
        method_triggers=dict(zip(params.methods, inp.method_triggers, strict=True))
        if hasattr(inp, "method_triggers") else None,  # a Namedlist: `in` tests its values
        data_root=params.evaluation["data_root"],
        download=params.evaluation["download"],
        base_seed=params.seed,
        device=str(sampling.resolve_device(params.device)),
        allow_pickle=params.allow_pickle,
    )
log.info("%s %s: %s %.4f, ASR real %s, inverted %s (%.1f s)", rec["model"], rec["state"],
         rec["utility_metric"], rec["utility"], rec["asr_real"], rec["asr_inverted"],
         rec["seconds"])
