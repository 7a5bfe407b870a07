"""Rule invert_trigger: BBTI trigger inversion on one model (trigger, samples, record)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse import inversion, sampling  # noqa: E402

out = snakemake.output  # noqa: F821
rec = inversion.invert_model(
    snakemake.input.model,  # noqa: F821
    {k: out[k] for k in ("trigger", "trigger_png", "samples_png", "samples", "record")},
    snakemake.params.inversion,  # noqa: F821
    snakemake.params.detection,  # noqa: F821
    model_id=snakemake.wildcards.model,  # noqa: F821
    classifier_dir=snakemake.input.get("classifier"),  # noqa: F821
    seed=snakemake.params.seed,  # noqa: F821
    device=str(sampling.resolve_device(snakemake.params.device)),  # noqa: F821
    allow_pickle=snakemake.params.allow_pickle,  # noqa: F821
)
log.info("MSCR %.3f -> %s after %d iterations in %.1f s", rec["mscr"], rec["verdict"],
         rec["iterations"], rec["seconds"])
