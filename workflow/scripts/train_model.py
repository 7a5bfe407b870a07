"""Rules train_model and train_adaptive: train a zoo model (clean, or with its row's attack) and
write its card; train_adaptive also keeps EMA checkpoints during training (Fig. 14)."""

from diffcleanse.logs import log_to

log = log_to(snakemake.log[0], snakemake.threads)  # noqa: F821

from diffcleanse.precision import set_precision  # noqa: E402

set_precision(snakemake.params.precision)  # noqa: F821

from diffcleanse import sampling, zoo  # noqa: E402
from diffcleanse.oom import lower_on_oom  # noqa: E402

params, out = snakemake.params, snakemake.output  # noqa: F821
train = dict(params.train)
if "snapshots" in out.keys():  # noqa: SIM118 (a Namedlist: `in` tests values)
    train["snapshot_every"] = params.snapshot_every
with lower_on_oom("train.batch_size", stage="training"):
    card = zoo.train_model(
        params.row,
        train,
        out.model,
        out.card,
        init_dir=snakemake.input.get("init"),  # noqa: F821
        checkpoint_dir=params.checkpoint_dir,
        device=str(sampling.resolve_device(params.device)),
        base_seed=params.seed,
        snapshot_dir=out.get("snapshots"),
    )
log.info("done in %.1f s", card["seconds"])
