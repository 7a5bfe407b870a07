"""Rule figure_mscr_asr: Fig. 5, MSCR of the inverted trigger vs real-trigger ASR after pruning."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import reporting, tables  # noqa: E402

inp, out = snakemake.input, snakemake.output  # noqa: F821
n = reporting.mscr_vs_asr(tables.load_evaluations(inp.evaluations),
                          tables.load_verdicts(inp.verdicts), [out.png, out.pdf])
log.info("%d points", n)
