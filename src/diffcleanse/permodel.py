"""Config values that vary by model: one value for all, or a mapping resolved per manifest row.

The paper sets several values by image size (BBTI batch 100/50/20 at 32/64/256 px; fine-tuning
batch 128/50/16) or by model group (Diff-Pruning 13 % for DDPM and NCSN on CIFAR-10, 7 % for DDPM on
CelebA-HQ, 5 % for LDM). A config key takes either a plain value or a mapping, e.g.::

    batch_size: {32: 128, 64: 50, 256: 16}
    diffpruning: {ddpm/cifar10: [0.13], ncsn/cifar10: [0.13], ddpm/celebahq: [0.07], ldm: [0.05]}

A mapping picks, for a model, the first key that matches it, in this order: its image size,
``<model_type>/<dataset>``, ``<model_type>``, ``<dataset>``, its manifest ``group``, and
``default``. A model that matches no key is an error naming the key, the model and the keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def candidates(row: Mapping[str, Any]) -> list[str]:
    """The keys a mapping is searched for, most specific first, for one manifest row."""
    out = []
    if row.get("image_size") not in (None, ""):
        out.append(str(int(row["image_size"])))
    mt, ds = str(row.get("model_type", "")), str(row.get("dataset", ""))
    if mt and ds:
        out.append(f"{mt}/{ds}")
    out += [k for k in (mt, ds, str(row.get("group", ""))) if k]
    return [*out, "default"]


def resolve(value: Any, row: Mapping[str, Any], key: str = "value") -> Any:
    """``value`` itself, or when it is a mapping, its entry for the model of ``row``."""
    if not isinstance(value, Mapping):
        return value
    table = {str(k): v for k, v in value.items()}
    for cand in candidates(row):
        if cand in table:
            return table[cand]
    raise KeyError(f"{key} has no entry for model {row.get('model_id', '?')} (tried "
                   f"{', '.join(candidates(row))}; the mapping has {', '.join(table)}): add one "
                   f"of those keys or 'default'")


def resolve_tree(tree: Any, row: Mapping[str, Any], keys: set[str], path: str = "") -> Any:
    """A copy of a config tree with the mappings at the dotted ``keys`` resolved for ``row``."""
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for k, v in tree.items():
        here = f"{path}.{k}" if path else str(k)
        out[k] = resolve(v, row, here) if here in keys else resolve_tree(v, row, keys, here)
    return out
