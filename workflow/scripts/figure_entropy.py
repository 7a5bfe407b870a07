"""Rule figure_entropy: Fig. 4, image entropy per dataset with random noise (boxplot)."""

import time

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0])  # noqa: F821

from diffcleanse import reporting  # noqa: E402
from diffcleanse.records import make_record, write_json  # noqa: E402

params, out = snakemake.params, snakemake.output  # noqa: F821
t0 = time.time()
sets = [(str(name), int(size)) for name, size in params.sets]
values, skipped = reporting.entropy_sets(
    sets,
    data_root=params.data_root,
    n_images=params.n_images,
    n_random=params.n_random,
    bins=params.bins,
    seed=params.seed,
)
note = f"{params.bins} bins on [-1, 1]; lines: the entropy band of BBTI's ℓ_e"
reporting.entropy_boxplot(values, [out.png, out.pdf], kappa_minus=params.kappa_minus,
                          kappa_plus=params.kappa_plus, note=note)
stats = {k: {"n": len(v), "median": float(v.median()), "q25": float(v.quantile(0.25)),
             "q75": float(v.quantile(0.75)), "min": float(v.min()), "max": float(v.max())}
         for k, v in values.items()}
write_json(out.record, make_record("figure_entropy", dict(params.items()), params.seed,
                                   time.time() - t0, sets=stats, skipped=skipped))
for k, r in stats.items():
    log.info("%s: median %.2f bits (n=%d)", k, r["median"], r["n"])
