"""Rule detection_table: every method's verdicts, own detectors, ROC and trigger ASR/fidelity."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import detection  # noqa: E402

pop = snakemake.params.population  # noqa: F821
df = detection.detection_table(
    list(snakemake.input.verdicts),  # noqa: F821
    list(snakemake.input.records),  # noqa: F821
    list(snakemake.input.combined),  # noqa: F821
    list(snakemake.input.population),  # noqa: F821
    list(snakemake.input.cards),  # noqa: F821
    {k: snakemake.output[k] for k in ("csv", "md", "roc_csv", "roc_png", "roc_pdf")},  # noqa: F821
    mse_threshold=snakemake.params.mse_threshold,  # noqa: F821
    methods=list(snakemake.params.methods),  # noqa: F821
    bootstrap=int(pop.get("bootstrap", 1000)),
    fpr=float(pop.get("fpr", 0.05)),
    seed=int(pop.get("seed", 0)),
)
log.info("%d rows, MSCR-verdict ACC %.2f", len(df), df["correct"].mean())
