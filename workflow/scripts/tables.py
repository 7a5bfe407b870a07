"""Rules tables and table3: the paper's tables from records and benchmark files."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import tables  # noqa: E402

inp, params = snakemake.input, snakemake.params  # noqa: F821
out = tables.build_tables(
    inp.evaluations,
    inp.verdicts,
    dict(snakemake.output.items()),  # noqa: F821
    benchmarks=params.benchmarks,
    entropy_ablation=inp.get("ablation"),
    strategies=params.strategies,
    losses=params.losses,
    finetune_loss=params.finetune_loss,
    device=params.device,
    methods=params.methods,
)
log.info("wrote %s from %d evaluation records", ", ".join(sorted(out)), len(out["evaluation"]))
