"""Stage 2: backdoor removal by structural pruning and fine-tuning (Diff-Cleanse; Diff-Pruning;
the random-channel control; Elijah's fine-tuning removal).

``importance`` (Taylor scores, Eqs. 8-9, normalisers), ``methods`` (the removal-method registry),
``pruning`` (one pruner over torch-pruning's dependency graph), ``pruned_io`` and ``portable`` (the
pruned-model format; a loader that needs no diffcleanse), ``finetune`` (clean data, loss_p /
loss_c), ``stages`` (file-to-file steps for the workflow, ``repair_model`` for the CLI) and
``ablation`` (the removal ablation: normaliser x clean timesteps x ratio, baselines, control).

A repaired model loads with ``diffcleanse.models.load_pipeline(path)`` (or, without diffcleanse,
with the ``load_pruned.py`` written beside it: see its README.md).
"""

from diffcleanse.removal.finetune import FinetuneConfig
from diffcleanse.removal.importance import NORMALISERS, ImportanceConfig, compute_importance
from diffcleanse.removal.methods import METHODS, ElijahConfig, ScoreSpec
from diffcleanse.removal.pruned_io import (
    load_pruned_unet,
    pruned_shapes,
    save_pruned_unet,
    write_bundle,
)
from diffcleanse.removal.pruning import group_scores, prune_unet
from diffcleanse.removal.stages import (
    make_clean_data,
    repair_model,
    repair_summary,
    run_elijah,
    run_finetune,
    run_importance,
    run_prune,
    summarise_removal,
)

__all__ = [
    "METHODS", "NORMALISERS", "ElijahConfig", "FinetuneConfig", "ImportanceConfig", "ScoreSpec",
    "compute_importance", "group_scores", "load_pruned_unet",
    "make_clean_data", "prune_unet", "pruned_shapes", "repair_model", "repair_summary",
    "run_elijah",
    "run_finetune", "run_importance", "run_prune", "save_pruned_unet", "summarise_removal",
    "write_bundle",
]
