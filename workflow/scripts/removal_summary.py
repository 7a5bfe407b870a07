"""Rule removal_summary: one model's removal outcome (verdict, what was removed, seconds)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse.removal import stages  # noqa: E402

inp = snakemake.input  # noqa: F821
summary = stages.summarise_removal(
    snakemake.wildcards.model,  # noqa: F821
    list(inp.get("finetuned", [])),
    snakemake.output[0],  # noqa: F821
    verdict_path=inp.get("verdict"),
    run_on=snakemake.params.run_on,  # noqa: F821
)
log.info("%d fine-tuned variants", len(summary["runs"]))
