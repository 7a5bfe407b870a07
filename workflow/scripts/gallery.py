"""Rule gallery: clean samples beside backdoor samples for one zoo model."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse import reporting  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402

with lower_on_oom("gallery.n_samples", stage="the gallery"):
    reporting.model_gallery(
        snakemake.input.model,  # noqa: F821
        snakemake.input.card,  # noqa: F821
        snakemake.output[0],  # noqa: F821
        n_samples=snakemake.params.n_samples,  # noqa: F821
        steps=snakemake.params.steps,  # noqa: F821
        control_trigger=snakemake.params.control_trigger,  # noqa: F821
        base_seed=snakemake.params.seed,  # noqa: F821
    )
