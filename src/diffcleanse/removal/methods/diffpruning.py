"""Diff-Pruning (Fang, Ma and Wang 2024), the baseline: remove the channels with the smallest
clean Taylor importance, accumulated by its own recipe (from t = 1 until L_t < thr x max L_t)."""

from __future__ import annotations

import torch

from diffcleanse.removal.methods.base import RemovalMethod, Scores, ScoreSpec


class DiffPruning(RemovalMethod):
    name = "diffpruning"
    label = "Diff-Pruning"

    def kinds(self, spec: ScoreSpec) -> tuple[str, ...]:
        return ("diffpruning",)

    def keep(self, scores: Scores, spec: ScoreSpec, root: str, n: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s = scores("diffpruning")
        return s, {"diffpruning": s}
