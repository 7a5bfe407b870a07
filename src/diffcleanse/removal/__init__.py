"""Stage 2: backdoor removal by structural pruning and fine-tuning (Diff-Cleanse; Diff-Pruning).

``importance`` (Taylor scores, Eqs. 8-9), ``pruning`` (one pruner over torch-pruning's dependency
graph, two importances), ``pruned_io`` (the pruned-model format), ``finetune`` (clean data,
loss_p / loss_c) and ``stages`` (file-to-file steps for the workflow, ``repair_model`` for the CLI).
"""

from diffcleanse.removal.finetune import FinetuneConfig
from diffcleanse.removal.importance import ImportanceConfig, compute_importance
from diffcleanse.removal.pruned_io import load_pruned_unet, pruned_shapes, save_pruned_unet
from diffcleanse.removal.pruning import group_scores, prune_unet
from diffcleanse.removal.stages import (
    make_clean_data,
    repair_model,
    run_finetune,
    run_importance,
    run_prune,
    summarise_removal,
)

__all__ = [
    "FinetuneConfig", "ImportanceConfig", "compute_importance", "group_scores",
    "load_pruned_unet", "make_clean_data", "prune_unet", "pruned_shapes", "repair_model",
    "run_finetune", "run_importance", "run_prune", "save_pruned_unet", "summarise_removal",
]
