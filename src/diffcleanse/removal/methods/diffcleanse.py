"""Diff-Cleanse (paper Stage 2): remove the channels with the largest I = n(I_b) - n(I_c).

``n`` is the per-group normaliser of ``ScoreSpec.normaliser`` (``none``: the paper's raw
difference); I_c and I_b are accumulated over ``ScoreSpec.clean_timesteps`` /
``backdoor_timesteps`` (the paper: both at t > T).
"""

from __future__ import annotations

import torch

from diffcleanse.removal import importance as imp
from diffcleanse.removal.methods.base import RemovalMethod, Scores, ScoreSpec


class DiffCleanse(RemovalMethod):
    name = "diffcleanse"
    label = "Diff-Cleanse"
    uses_trigger = True

    def kinds(self, spec: ScoreSpec) -> tuple[str, ...]:
        return (spec.clean_kind, spec.backdoor_kind)

    def keep(self, scores: Scores, spec: ScoreSpec, root: str, n: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        i_c, i_b = scores(spec.clean_kind), scores(spec.backdoor_kind)
        n_c, n_b = imp.normalise(i_c, spec.normaliser), imp.normalise(i_b, spec.normaliser)
        score = n_b - n_c
        return -score, {"clean": i_c, "backdoor": i_b, "I": score}
