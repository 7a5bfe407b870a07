"""Rule invert_trigger: one inversion method on one model for one seed index."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import inversion, sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402

out = snakemake.output  # noqa: F821
method = snakemake.wildcards.method  # noqa: F821
with lower_on_oom(*inversion.batch_keys(method), stage=f"{method} inversion"):
    rec = inversion.invert_model(
        snakemake.input.model,  # noqa: F821
        {k: out[k] for k in inversion.OUTPUT_FILES},
        snakemake.params.inversion,  # noqa: F821
        snakemake.params.detection,  # noqa: F821
        model_id=snakemake.wildcards.model,  # noqa: F821
        method=method,
        seed_index=int(snakemake.wildcards.seed),  # noqa: F821
        classifier_dir=snakemake.input.get("classifier"),  # noqa: F821
        seed=snakemake.params.seed,  # noqa: F821
        device=str(sampling.resolve_device(snakemake.params.device)),  # noqa: F821
        allow_pickle=snakemake.params.allow_pickle,  # noqa: F821
    )
log.info("%s: MSCR %.3f -> %s after %d iterations in %.1f s", rec["method"], rec["mscr"],
         rec["verdict"], rec["iterations"], rec["seconds"])
