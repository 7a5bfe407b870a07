"""Trigger inversion: a registry of methods behind one interface (``inversion.base``).

``METHODS`` maps a method's name (the workflow's ``{method}`` wildcard, the config's
``inversion.methods``, ``diffcleanse scan --method``) to its implementation:

* ``bbti``: Diff-Cleanse's black-box trigger inversion with MSCR (``inversion.bbti``).
* ``elijah``: Elijah's distribution-shift inversion at t = T, with its uniformity and total
  variation features (``inversion.elijah``).
* ``purediffusion``: PureDiffusion's multi-timestep inversion with trigger-shift scales estimated
  on a surrogate backdoor (or BadDiffusion's analytic ones), with its uniform score
  (``inversion.purediffusion``).
* ``terd``: TERD's two-stage trigger estimation and refinement, with its KL model-level statistics
  and input-level detection rates (``inversion.terd``).

``run.run_method`` runs any of them on a loaded model and adds the common evidence (the verdict
samples from noise + trigger under the model's sampler, and MSCR); ``run.invert_model`` is the
workflow rule's file-to-file step.
"""

from __future__ import annotations

import dataclasses

from diffcleanse.inversion.base import (
    Context,
    InversionError,
    InversionMethod,
    MethodResult,
)
from diffcleanse.inversion.bbti import BBTI, BBTISpec
from diffcleanse.inversion.elijah import Elijah, ElijahSpec
from diffcleanse.inversion.purediffusion import PureDiffusion, PureDiffusionSpec
from diffcleanse.inversion.run import (
    OUTPUT_FILES,
    InversionResult,
    invert_model,
    run_method,
    seeds_for,
)
from diffcleanse.inversion.terd import TERD, TERDSpec

METHODS: dict[str, InversionMethod] = {
    m.name: m for m in (BBTI(), Elijah(), PureDiffusion(), TERD())}


def get_method(name: str) -> InversionMethod:
    """The registered method ``name``, or a ValueError naming every registered one."""
    if name not in METHODS:
        raise ValueError(f"unknown inversion method {name!r}: registered are "
                         f"{', '.join(METHODS)} (config inversion.methods, --method)")
    return METHODS[name]


def batch_keys(name: str) -> list[str]:
    """The config keys that size a method's batches: the verdict batch, and its own (every
    setting of its Spec named ``batch`` or ``*_batch``), for an out-of-memory message."""
    own = [f.name for f in dataclasses.fields(get_method(name).Spec)
           if f.name == "batch" or f.name.endswith("_batch")]
    return ["inversion.batch_size", *(f"inversion.{name}.{k}" for k in own)]


__all__ = ["BBTI", "BBTISpec", "METHODS", "OUTPUT_FILES", "TERD", "Context", "Elijah",
           "ElijahSpec", "InversionError", "InversionMethod", "InversionResult", "MethodResult",
           "PureDiffusion", "PureDiffusionSpec", "TERDSpec", "batch_keys", "get_method",
           "invert_model", "run_method", "seeds_for"]
