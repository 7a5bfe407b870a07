"""Structural pruning of a diffusers UNet2DModel: one pruner, any pruning method of the registry.

torch-pruning's dependency graph says which weights go together (a "group": a channel and every
tensor slice that must go with it); a removal method (``removal.methods``: Diff-Cleanse,
Diff-Pruning, the random control) turns the group's stored Taylor scores into keep-scores; this
pruner removes, in every group, the lowest. ``conv_out`` keeps its outputs (the image channels).
The record keeps, per group, the scores behind the ranking and the removed channel indices of the
root and of every layer the group touches.

GroupNorm and the per-layer budget. torch-pruning keeps ``nn.GroupNorm`` valid by removing the same
in-group position from every group, so the smallest step of a layer with G groups is G channels: a
1-2 % target removes 1/group_size of the layer (25 % for 128 channels in 32 groups; DESIGN.md
measured 12-58 % of the parameters). The ``exact`` mode (the default) removes exactly
``ceil(ratio * C)`` channels of every group of C channels (at least one) and replaces each pruned
GroupNorm by an ``UnevenGroupNorm`` whose groups keep their channels: untouched groups are
normalised exactly as before, a group that lost a channel over the channels it kept. Attention
q/k/v dimensions must shrink equally in every head (the processor reshapes by ``heads``), so their
step is ``heads`` dimensions; the budget is a cap there: ``ceil(ratio * C) // heads`` dimensions per
head, none when the budget is smaller than one step (the case of the small zoo; one head of 256,
as in DDPM-CIFAR10, loses 3 at 1 %). ``interleaved`` runs torch-pruning's own ``BasePruner``
instead, for comparison. Every record states what was really removed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch_pruning as tp
from diffusers import UNet2DModel
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from diffcleanse.removal import methods
from diffcleanse.removal.importance import GroupScorer, KeepScore
from diffcleanse.removal.methods.base import ScoreSpec
from diffcleanse.removal.pruned_io import _set_module, group_norm_for, module_shapes

GROUPNORM_MODES = ("exact", "interleaved")


class _ChannelGroupNormPruner(tp.pruner.function.GroupNormPruner):
    """GroupNorm pruner that removes single channels and remembers which group each one was in."""

    def get_in_channel_groups(self, layer: nn.Module) -> int:
        return 1

    def get_out_channel_groups(self, layer: nn.Module) -> int:
        return 1

    def prune_out_channels(self, layer: nn.GroupNorm, idxs: list[int]) -> nn.Module:
        ids = getattr(layer, "_dc_group_ids", None)
        if ids is None:
            ids = torch.arange(layer.num_channels) // (layer.num_channels // layer.num_groups)
        drop = set(int(i) for i in idxs)
        layer._dc_group_ids = ids[[i for i in range(layer.num_channels) if i not in drop]]
        return super().prune_out_channels(layer, idxs)

    prune_in_channels = prune_out_channels


def channel_budget(channels: int, ratio: float, where: str = "a layer") -> int:
    """Channels to remove from a layer of ``channels`` at ``ratio``: ceil(ratio * C), at least one
    when ratio > 0. A ratio that would remove every channel is refused."""
    if ratio <= 0:
        return 0
    budget = max(1, math.ceil(ratio * channels - 1e-9))
    if budget >= channels:
        hint = (f"use a ratio below {(channels - 1) / channels:.3f}" if channels > 1
                else "it cannot lose a channel")
        raise ValueError(f"pruning ratio {ratio:g} would remove every channel of {where} "
                         f"({channels} channels): {hint} (config: removal.ratios)")
    return budget


def _example_inputs(unet: UNet2DModel) -> tuple[torch.Tensor, torch.Tensor]:
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    device = next(unet.parameters()).device
    return (torch.randn(1, unet.config.in_channels, h, w, device=device),
            torch.ones(1, dtype=torch.long, device=device))


def _num_heads(unet: nn.Module) -> dict[nn.Module, int]:
    heads: dict[nn.Module, int] = {}
    for m in unet.modules():
        if isinstance(m, Attention):
            for lin in (m.to_q, m.to_k, m.to_v):
                heads[lin] = int(m.heads)
    return heads


def _finish(unet: nn.Module) -> None:
    """Make static attributes agree with the pruned tensors and make GroupNorms valid again."""
    for m in unet.modules():
        if isinstance(m, (Upsample2D, Downsample2D)) and getattr(m, "conv", None) is not None:
            m.channels, m.out_channels = m.conv.in_channels, m.conv.out_channels
    for name, m in list(unet.named_modules()):
        ids = getattr(m, "_dc_group_ids", None)
        if isinstance(m, nn.GroupNorm) and ids is not None:
            sizes = [int(s) for s in torch.bincount(ids) if s > 0]
            new = group_norm_for(sizes, m.eps, m.affine)
            if m.affine:
                new.weight, new.bias = m.weight, m.bias
            _set_module(unet, name, new)


def _graph(unet: nn.Module, inputs) -> tp.DependencyGraph:
    """The dependency graph with single-channel GroupNorm pruning (the ``exact`` mode)."""
    return tp.DependencyGraph().build_dependency(
        unet, example_inputs=inputs, customized_pruners={nn.GroupNorm: _ChannelGroupNormPruner()})


def _groups(dg: tp.DependencyGraph, unet: UNet2DModel):
    """Every prunable group (``conv_out`` keeps its outputs), rooted at a Conv2d or Linear."""
    return dg.get_all_groups(ignored_layers=list(unet.conv_out.modules()),
                             root_module_types=[nn.Conv2d, nn.Linear])


def group_scores(unet: UNet2DModel, vectors: dict[str, torch.Tensor]
                 ) -> dict[str, dict[str, torch.Tensor]]:
    """Per-channel scores of every prunable group, by root module name: one vector per kind in
    ``vectors`` (``clean``, ``backdoor``, ...) and ``I`` = backdoor - clean (raw, t > T)."""
    unet.eval().requires_grad_(True)
    dg = _graph(unet, _example_inputs(unet))
    scorer = GroupScorer(unet, vectors)
    kinds = sorted({k.split("/", 1)[0] for k in vectors})
    table: dict[str, dict[str, torch.Tensor]] = {}
    for g in _groups(dg, unet):
        root = scorer.names[g[0].dep.target.module]
        table[root] = {k: scorer.score(g, k).float() for k in kinds}
        if "clean" in table[root] and "backdoor" in table[root]:
            table[root]["I"] = table[root]["backdoor"] - table[root]["clean"]
    unet.requires_grad_(False)
    return table


def _layer_indices(group, names: dict[nn.Module, str]) -> list[dict[str, Any]]:
    """Every named layer a pruning group touches: module, direction, removed indices."""
    out = []
    for item in group:
        name = names.get(item.dep.target.module)
        if name is None:
            continue
        out.append({"module": name, "handler": item.dep.handler.__name__,
                    "indices": sorted(int(i) for i in item.idxs)})
    return out


def _floats(v: torch.Tensor) -> list[float]:
    return [float(f"{x:.6g}") for x in v.double().tolist()]


def _count(unet: nn.Module, inputs) -> dict[str, int]:
    macs, params = tp.utils.count_ops_and_params(unet, inputs)
    return {"params": int(params), "macs": int(macs)}


def prune_unet(unet: UNet2DModel, vectors: dict[str, torch.Tensor], strategy: str, ratio: float,
               groupnorm: str = "exact", spec: ScoreSpec | None = None) -> dict[str, Any]:
    """Prune ``unet`` in place with the removal method ``strategy`` at ``ratio`` per layer.

    ``vectors`` are the Taylor score vectors of ``importance.compute_importance`` for this
    (unpruned) model, holding the kinds the method reads (``spec``: normaliser and timesteps).
    Returns a record of what was removed: per group the scores and the removed indices of the root
    and of every layer, per changed layer the shapes, and parameter and MAC counts.
    """
    method = methods.get(strategy)
    if not method.prunes:
        raise ValueError(f"removal method {strategy!r} does not prune (it fine-tunes)")
    if groupnorm not in GROUPNORM_MODES:
        raise ValueError(f"unknown groupnorm mode {groupnorm!r}: use {', '.join(GROUPNORM_MODES)}")
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio must be in [0, 1), got {ratio} (config: removal.ratios)")
    spec = spec or ScoreSpec()
    missing = [k for k in method.kinds(spec) if not any(v.startswith(f"{k}/") for v in vectors)]
    if missing:
        raise KeyError(f"{strategy} needs the importance kind(s) {', '.join(missing)}, which the "
                       f"importance file lacks: recompute it with those kinds")
    unet.eval().requires_grad_(True)
    inputs = _example_inputs(unet)
    shapes_before = module_shapes(unet)
    before = _count(unet, inputs)
    names = {m: n for n, m in unet.named_modules()}
    scorer = GroupScorer(unet, vectors)

    def keep(group):
        root = names.get(group[0].dep.target.module, "?")
        cache: dict[str, torch.Tensor] = {}

        def scores(kind: str) -> torch.Tensor:
            if kind not in cache:
                cache[kind] = scorer.score(group, kind)
            return cache[kind]

        return method.keep(scores, spec, root, len(group[0].idxs))

    importance = KeepScore(keep, names)
    heads = _num_heads(unet)
    groups: list[dict[str, Any]] = []
    if groupnorm == "interleaved":
        pruner = tp.pruner.BasePruner(unet, inputs, importance=importance, pruning_ratio=ratio,
                                      ignored_layers=[unet.conv_out], num_heads=heads)
        for g in pruner.step(interactive=True):
            dep = g[0].dep
            groups.append({"root": names.get(dep.target.module), "direction": dep.handler.__name__,
                           "removed": len(g[0].idxs), "removed_indices": sorted(g[0].idxs),
                           "layers": _layer_indices(g, names)})
            g.prune()
    else:
        dg = _graph(unet, inputs)
        plan = []
        for g in _groups(dg, unet):
            root = g[0].dep.target.module
            n_heads = max([heads[d.target.module] for d, _ in g
                           if d.target.module in heads and dg.is_out_channel_pruning_fn(d.handler)]
                          or [1])
            plan.append((root, g[0].dep.handler, len(g[0].idxs), n_heads, importance(g)))
        budgets = [channel_budget(c, ratio, f"{names.get(r)} ({h.__name__})")
                   for r, h, c, _, _ in plan]
        for (root, handler, channels, n_heads, score), budget in zip(plan, budgets, strict=True):
            head_dim = channels // n_heads
            per_head = min(budget // n_heads, head_dim - 1)
            entry = {"root": names.get(root), "direction": handler.__name__,
                     "kind": "attention" if n_heads > 1 else "channels", "channels": channels,
                     "step": n_heads, "budget": budget}
            layers: list[dict[str, Any]] = []
            if per_head > 0:
                within = score.view(n_heads, head_dim).mean(0)
                drop = torch.topk(within, per_head, largest=False).indices
                idxs = sorted(int(h * head_dim + j) for h in range(n_heads) for j in drop)
                pg = dg.get_pruning_group(root, handler, idxs)
                layers = _layer_indices(pg, names)
                pg.prune()
            else:
                idxs = []
            groups.append(entry | {"removed": len(idxs), "removed_indices": idxs,
                                   "layers": layers})
    for entry in groups:
        seen = importance.seen.get(entry["root"])
        if seen is not None:
            entry["scores"] = {k: _floats(v) for k, v in seen.items()}
    _finish(unet)
    unet.requires_grad_(False)
    after = _count(unet, _example_inputs(unet))
    shapes_after = module_shapes(unet)
    layers = {k: {"before": shapes_before[k], "after": v} for k, v in shapes_after.items()
              if shapes_before.get(k) != v}
    outs = [(v.get("out_channels", v.get("out_features")),
             shapes_after[k].get("out_channels", shapes_after[k].get("out_features")))
            for k, v in shapes_before.items() if v["type"] in ("Conv2d", "Linear")
            and k != "conv_out"]
    total, kept = sum(o for o, _ in outs), sum(a for _, a in outs)
    return {
        "strategy": strategy, "ratio": ratio, "groupnorm": groupnorm, "scores": spec.describe(),
        "score_kinds": list(method.kinds(spec)),
        "out_channels": {"before": total, "after": kept, "removed": total - kept,
                         "fraction_removed": 1 - kept / total},
        "parameters": {"before": before["params"], "after": after["params"],
                       "removed": before["params"] - after["params"],
                       "fraction_removed": 1 - after["params"] / before["params"]},
        "macs": {"before": before["macs"], "after": after["macs"],
                 "fraction_removed": 1 - after["macs"] / before["macs"]},
        "groups": groups, "layers": layers,
    }
