"""Rule detect (a checkpoint): the verdict of one model from its inverted trigger's samples."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import detection, sampling  # noqa: E402

rec = detection.detect_from_inversion(
    snakemake.input.record,  # noqa: F821
    snakemake.input.samples,  # noqa: F821
    snakemake.output[0],  # noqa: F821
    snakemake.params.detection,  # noqa: F821
    classifier_dir=snakemake.input.get("classifier"),  # noqa: F821
    device=str(sampling.resolve_device(snakemake.params.device)),  # noqa: F821
)
log.info("MSCR %.3f -> %s", rec["mscr"], rec["verdict"])
