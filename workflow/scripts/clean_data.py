"""Rule clean_data: clean images of one model for importance and fine-tuning (synthetic or real)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import sampling  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402
from diffcleanse.records import derive_seed  # noqa: E402
from diffcleanse.removal import stages  # noqa: E402

wc, params = snakemake.wildcards, snakemake.params  # noqa: F821
with lower_on_oom("removal.synthetic_sampler.batch_size", stage="sampling the clean data"):
    rec = stages.make_clean_data(
        snakemake.input.model,  # noqa: F821
        snakemake.output.images,  # noqa: F821
        snakemake.output.record,  # noqa: F821
        source=wc.source,
        seed=derive_seed(params.seed, wc.model, "clean_data", wc.source),
        device=str(sampling.resolve_device(params.device)),
        allow_pickle=params.allow_pickle,
        **params.data,
    )
log.info("%d %s images in %.1f s", rec["n_images"], wc.source, rec["seconds"])
