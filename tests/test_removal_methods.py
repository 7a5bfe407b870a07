"""Removal methods: the registry, the normalisers, what I_c and the random control change, and the
bad inputs of pruning (a ratio that empties a layer, a trigger of the wrong shape)."""

import copy

import pytest
import torch
import yaml

from diffcleanse.removal import importance as imp
from diffcleanse.removal import methods, pruning
from diffcleanse.removal.methods.base import ScoreSpec


def _vectors(unet, seed=0, backdoor_scale=1.0, kinds=("clean", "backdoor", "diffpruning")):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for kind in kinds:
        grads = {k: torch.rand(p.shape, generator=g) for k, p in unet.named_parameters()}
        vec = imp.taylor_vectors(unet, grads, kind)
        if kind.startswith("backdoor"):
            vec = {k: v * backdoor_scale for k, v in vec.items()}
        out |= vec
    return out


def _removed(rec):
    return {g["root"]: g["removed_indices"] for g in rec["groups"]}


def test_registry_matches_the_schema_and_names_every_method():
    from pathlib import Path

    schema = yaml.safe_load(Path("src/diffcleanse/schemas/config.schema.yaml").read_text())
    removal = schema["properties"]["removal"]["properties"]
    assert removal["strategies"]["items"]["enum"] == list(methods.METHODS)
    assert set(methods.PRUNING_METHODS) == {"diffcleanse", "diffpruning", "random"}
    assert not methods.get("elijah").prunes
    with pytest.raises(ValueError, match="unknown removal method 'x'.*removal.strategies"):
        methods.get("x")


def test_mean_normaliser_ranks_the_same_whatever_the_scale_of_i_b_raw_does_not():
    """With I_b tens of times I_c (as measured on backdoored models) the raw difference ranks by
    I_b alone; the per-group mean makes the ranking independent of the two scores' scales."""
    i_c = torch.tensor([1.0, 2.0, 3.0, 10.0], dtype=torch.float64)
    i_b = torch.tensor([1.0, 1.1, 0.9, 1.2], dtype=torch.float64)
    dc = methods.get("diffcleanse")

    def top(scale, normaliser):
        scores = {"clean": i_c, "backdoor": scale * i_b}
        keep, parts = dc.keep(scores.__getitem__, ScoreSpec(normaliser=normaliser), "g", 4)
        assert torch.allclose(parts["I"], -keep)
        return int(parts["I"].argmax())

    assert [top(s, "none") for s in (1.0, 50.0, 5e4)] == [0, 1, 3]  # 3: the largest I_b, though
    # its clean score is the largest too
    assert {top(s, "mean") for s in (0.02, 1.0, 50.0, 5e4)} == {0}
    assert {top(s, "rank") for s in (0.02, 1.0, 50.0, 5e4)} == {int((i_b.argsort().argsort()
                                                                    - i_c.argsort().argsort()
                                                                    ).argmax())}


def test_normalisation_changes_which_channels_a_pruned_unet_loses(tiny_unet):
    vectors = _vectors(tiny_unet, backdoor_scale=50.0)
    runs = {n: pruning.prune_unet(copy.deepcopy(tiny_unet), vectors, "diffcleanse", 0.2,
                                  spec=ScoreSpec(normaliser=n)) for n in ("none", "mean")}
    raw, mean = _removed(runs["none"]), _removed(runs["mean"])
    assert raw.keys() == mean.keys()
    assert sum(raw[k] != mean[k] for k in raw) >= 3
    # the record keeps each group's scores and the removed indices of every layer it touched
    g = next(g for g in runs["mean"]["groups"] if g["removed"])
    assert set(g["scores"]) == {"clean", "backdoor", "I", "keep"}
    assert len(g["scores"]["I"]) == g["channels"]
    assert g["layers"] and all(layer["indices"] for layer in g["layers"])
    assert g["layers"][0]["module"] == g["root"] and g["layers"][0]["indices"] == \
        g["removed_indices"]


@pytest.mark.parametrize("normaliser", ["none", "mean"])
def test_the_clean_score_decides_which_channels_go(tiny_unet, normaliser):
    """Raise the clean score of the channels Diff-Cleanse removes: they must be kept (this fails
    if I_c is ignored)."""
    vectors = _vectors(tiny_unet)
    spec = ScoreSpec(normaliser=normaliser)
    first = pruning.prune_unet(copy.deepcopy(tiny_unet), vectors, "diffcleanse", 0.2, spec=spec)
    root = "down_blocks.0.resnets.0.conv1"
    gone = _removed(first)[root]
    assert gone
    guarded = dict(vectors)
    for key in (f"clean/{root}.weight/out", f"clean/{root}.bias/out"):
        v = guarded[key].clone()
        v[gone] *= 1e6
        guarded[key] = v
    second = pruning.prune_unet(copy.deepcopy(tiny_unet), guarded, "diffcleanse", 0.2, spec=spec)
    assert not set(_removed(second)[root]) & set(gone)
    # the clean timestep set is read from its own kind
    clean_all = {k.replace("clean/", "clean_all/", 1): v for k, v in guarded.items()
                 if k.startswith("clean/")}
    spec_all = ScoreSpec(normaliser=normaliser, clean_timesteps="all")
    third = pruning.prune_unet(copy.deepcopy(tiny_unet), {**vectors, **clean_all}, "diffcleanse",
                               0.2, spec=spec_all)
    assert third["score_kinds"] == ["clean_all", "backdoor"]
    assert not set(_removed(third)[root]) & set(gone)
    with pytest.raises(KeyError, match="clean_all"):
        pruning.prune_unet(copy.deepcopy(tiny_unet), vectors, "diffcleanse", 0.2, spec=spec_all)


def test_random_control_removes_as_many_channels_seeded(tiny_unet):
    vectors = _vectors(tiny_unet)
    dc = pruning.prune_unet(copy.deepcopy(tiny_unet), vectors, "diffcleanse", 0.2)
    r0 = pruning.prune_unet(copy.deepcopy(tiny_unet), {}, "random", 0.2, spec=ScoreSpec(seed=0))
    r0b = pruning.prune_unet(copy.deepcopy(tiny_unet), {}, "random", 0.2, spec=ScoreSpec(seed=0))
    r1 = pruning.prune_unet(copy.deepcopy(tiny_unet), {}, "random", 0.2, spec=ScoreSpec(seed=1))
    assert r0["out_channels"] == dc["out_channels"] and r0["parameters"] == dc["parameters"]
    assert _removed(r0) == _removed(r0b) != _removed(r1)


def test_diffpruning_removes_the_smallest_clean_scores(tiny_unet):
    vectors = _vectors(tiny_unet)
    rec = pruning.prune_unet(copy.deepcopy(tiny_unet), vectors, "diffpruning", 0.2)
    for g in rec["groups"]:
        if g["kind"] == "channels" and g["removed"]:
            s = torch.tensor(g["scores"]["diffpruning"])
            assert sorted(g["removed_indices"]) == sorted(s.argsort()[:g["removed"]].tolist())


def test_a_ratio_that_empties_a_layer_is_refused(tiny_unet):
    vectors = _vectors(tiny_unet)
    with pytest.raises(ValueError, match=r"every channel of .*\(\d+ channels\).*removal.ratios"):
        pruning.prune_unet(copy.deepcopy(tiny_unet), vectors, "diffcleanse", 0.95)
    with pytest.raises(ValueError, match="does not prune"):
        pruning.prune_unet(copy.deepcopy(tiny_unet), vectors, "elijah", 0.02)


def test_a_trigger_of_another_shape_is_refused(tiny_unet, tmp_path):
    from safetensors.torch import save_file

    from diffcleanse import models
    from diffcleanse.removal import stages

    sched = models.build_scheduler(20)
    x0 = torch.zeros(2, 3, 8, 8)
    with pytest.raises(ValueError, match=r"shape \(3, 16, 16\), the model takes \(3, 8, 8\)"):
        imp.compute_importance(tiny_unet, sched, x0, torch.zeros(3, 16, 16),
                               imp.ImportanceConfig())
    save_file({"trigger": torch.zeros(1, 16, 16)}, str(tmp_path / "t.safetensors"))
    with pytest.raises(ValueError, match="removal.triggers"):
        stages.load_trigger(tmp_path / "t.safetensors", (3, 8, 8))
