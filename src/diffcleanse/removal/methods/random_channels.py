"""The random-channel control: as many channels per layer as the other methods, chosen at random
(seeded by ``ScoreSpec.seed`` and the group's root module, so a rerun removes the same ones)."""

from __future__ import annotations

import torch

from diffcleanse.records import derive_seed
from diffcleanse.removal.methods.base import RemovalMethod, Scores, ScoreSpec


class RandomChannels(RemovalMethod):
    name = "random"
    label = "random channels"

    def keep(self, scores: Scores, spec: ScoreSpec, root: str, n: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(derive_seed(spec.seed, "random-channels", root))
        s = torch.rand(n, generator=g, dtype=torch.float64)
        return s, {"random": s}
