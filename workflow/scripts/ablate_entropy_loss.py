"""Rule ablate_entropy_loss: BBTI without the entropy loss, its verdict and ASR (Table 3)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import evaluation, sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402

inp, params, out = snakemake.input, snakemake.params, snakemake.output  # noqa: F821
with lower_on_oom("inversion.batch_size", stage="BBTI without the entropy loss"):
    rec = evaluation.ablate_entropy_loss(
        inp.model,
        inp.card,
        dict(out.items()),
        params.inversion,
        params.detection,
        params.evaluation,
        classifier_dir=inp.get("classifier"),
        class_classifier_dir=inp.get("class_classifier"),
        fid_classifier_dir=inp.get("fid_classifier"),
        data_root=params.evaluation["data_root"],
        download=params.evaluation["download"],
        base_seed=params.seed,
        device=str(sampling.resolve_device(params.device)),
    )
log.info("%s without l_e: MSCR %.3f, flagged %s, ASR %s", rec["model"], rec["mscr"],
         rec["flagged"], rec["asr_inverted"])
