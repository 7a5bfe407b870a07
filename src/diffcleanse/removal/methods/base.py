"""The removal-method interface: what a method reads and how it ranks channels (or repairs).

A *pruning* method names the importance kinds it reads (``importance.KINDS``) and turns one
dependency group's per-channel scores into keep-scores (the pruner removes the lowest). A
*fine-tuning* method (``prunes = False``, e.g. Elijah's) removes nothing and repairs the model by
training alone; its module provides ``repair``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from diffcleanse.removal import importance as imp


@dataclass(frozen=True)
class ScoreSpec:
    """How pruning reads the importance (config ``removal.importance``; paper: raw I_b - I_c, both
    accumulated at t > T)."""

    normaliser: str = "none"
    clean_timesteps: str = "above_T"
    backdoor_timesteps: str = "above_T"
    seed: int = 0  # the random control's channel draw

    def __post_init__(self) -> None:
        imp.normalise(torch.ones(2), self.normaliser)  # validates the name
        imp.score_kind("clean", self.clean_timesteps)
        imp.score_kind("backdoor", self.backdoor_timesteps)

    @property
    def clean_kind(self) -> str:
        return imp.score_kind("clean", self.clean_timesteps)

    @property
    def backdoor_kind(self) -> str:
        return imp.score_kind("backdoor", self.backdoor_timesteps)

    def describe(self) -> dict[str, Any]:
        """A JSON-able description for records."""
        return asdict(self)


Scores = Callable[[str], torch.Tensor]  # kind -> this group's per-channel score (float64)


class RemovalMethod:
    """One removal method. Subclasses set the class attributes and ``kinds``/``keep``."""

    name: ClassVar[str]
    label: ClassVar[str]
    prunes: ClassVar[bool] = True
    uses_trigger: ClassVar[bool] = False

    def kinds(self, spec: ScoreSpec) -> tuple[str, ...]:
        """The importance kinds this method reads."""
        return ()

    def keep(self, scores: Scores, spec: ScoreSpec, root: str, n: int
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Keep-scores of a group's ``n`` channels (the lowest go) and the named per-channel
        scores behind them (kept in the prune record)."""
        raise NotImplementedError(f"{self.name} does not prune")
