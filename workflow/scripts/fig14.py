"""Rule fig14: the utility of adaptive-attack checkpoints during training (paper Fig. 14)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import adaptive_results  # noqa: E402
from diffcleanse.records import atomic_path  # noqa: E402

inp, out, params = snakemake.input, snakemake.output, snakemake.params  # noqa: F821
df = adaptive_results.fig14_frame(inp.records, dict(zip(params.models, inp.cards, strict=True)))
with atomic_path(out.csv) as tmp:
    df.to_csv(tmp, index=False)
adaptive_results.plot_fig14(df, [out.png, out.pdf])
log.info("Fig. 14 from %d checkpoints of %d models", len(df), df["model"].nunique())
