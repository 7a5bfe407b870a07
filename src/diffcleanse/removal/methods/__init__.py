"""Removal methods, a registry: ``METHODS[name]`` (the workflow's ``strategy~<name>``).

``diffcleanse`` (the paper's: largest I = n(I_b) - n(I_c)), ``diffpruning`` (the baseline:
smallest clean importance), ``random`` (the control: random channels, same count), ``elijah``
(Elijah's fine-tuning removal, no pruning). A new method is a module with a ``RemovalMethod``
subclass, one entry here, and its tests.
"""

from __future__ import annotations

from diffcleanse.removal.methods.base import RemovalMethod, ScoreSpec
from diffcleanse.removal.methods.diffcleanse import DiffCleanse
from diffcleanse.removal.methods.diffpruning import DiffPruning
from diffcleanse.removal.methods.elijah import Elijah, ElijahConfig
from diffcleanse.removal.methods.random_channels import RandomChannels

METHODS: dict[str, RemovalMethod] = {
    m.name: m for m in (DiffCleanse(), DiffPruning(), RandomChannels(), Elijah())
}
PRUNING_METHODS = tuple(k for k, m in METHODS.items() if m.prunes)


def get(name: str) -> RemovalMethod:
    """The registry entry of ``name``, or a ValueError listing the methods."""
    if name not in METHODS:
        raise ValueError(f"unknown removal method {name!r}: use {', '.join(METHODS)} "
                         f"(config: removal.strategies)")
    return METHODS[name]


__all__ = ["METHODS", "PRUNING_METHODS", "ElijahConfig", "RemovalMethod", "ScoreSpec", "get"]
