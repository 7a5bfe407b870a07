"""The manifest accepts exactly what the code can run: its attack, sampler and model-type values
come from the registries, and a row the code cannot run is refused when it is loaded (the DAG is
built), naming the row, the column, the value and what is implemented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_manifest import BD, GOOD, error_of, write_tsv

from diffcleanse import attacks, models, samplers, zoo
from diffcleanse.manifest import ManifestError, load_manifest, load_schema


def _enum(col: str) -> list[str]:
    prop = load_schema()["properties"][col]
    for branch in prop.get("anyOf", [prop]):
        if "enum" in branch:
            return list(branch["enum"])
    raise AssertionError(col)


def test_schema_values_are_the_registries() -> None:
    assert _enum("attack") == list(attacks.names())
    assert _enum("sampler") == list(samplers.manifest_names())
    assert _enum("model_type") == list(models.MODEL_TYPES)
    # every trigger an attack owns is a manifest trigger, and every distribution target parses
    triggers = set(_enum("trigger"))
    for a in attacks.ATTACKS.values():
        assert set(a.triggers or ()) <= triggers
    for name in zoo.OUT_DATASETS:
        assert attacks.is_class_target(f"{name}:3")


ROW = {**BD, "model_id": "x"}


@pytest.mark.parametrize(
    ("row", "column", "words"),
    [
        ({"attack": "trojdiff", "trigger": "blend", "target": "mickey"}, "attack_params",
         ["needs gamma=", "TrojDiff's gamma"]),
        ({"attack": "trojdiff", "trigger": "blend", "target": "mickey",
          "attack_params": "gamma=0"}, "attack_params", ["gamma=0", "out of range"]),
        ({"attack": "trojdiff", "trigger": "box_14", "target": "mickey",
          "attack_params": "gamma=0.6"}, "trigger", ["'box_14'", "blend, patch"]),
        ({"attack": "baddiffusion", "target": "class:3"}, "target",
         ["'class:3'", "implants one image"]),
        ({"attack": "villandiffusion", "target": "letters:2"}, "target", ["'letters:2'"]),
        ({"attack": "baddiffusion", "sampler": "ddim"}, "sampler",
         ["'ddim'", "baddiffusion", "ddpm"]),
        ({"attack": "baddiffusion", "attack_params": "psi=0.5"}, "attack_params",
         ["no parameter psi"]),
        ({"attack": "villandiffusion", "attack_params": "psi=2"}, "attack_params",
         ["psi=2", "out of range"]),
        ({"attack": "villandiffusion", "model_type": "ncsn", "sampler": "ddim"}, "sampler",
         ["'ddim'", "cannot sample a ncsn model", "score_sde_ve"]),
        ({"attack": "villandiffusion", "model_type": "ncsn", "sampler": "score_sde_ve",
          "attack_params": "psi=1"}, "attack_params", ["psi=1", "NCSN"]),
        ({"attack": "baddiffusion", "model_type": "ldm"}, "model_type",
         ["'ldm'", "attacks model types ddpm"]),
        ({"attack": "trojdiff", "trigger": "blend", "target": "mickey", "model_type": "ncsn",
          "sampler": "score_sde_ve", "attack_params": "gamma=0.6"}, "model_type", ["'ncsn'"]),
        ({"attack": "adaptive", "attack_params": "base=baddiffusion"}, "attack_params",
         ["needs lambda="]),
        ({"attack": "adaptive", "sampler": "ddim", "attack_params": "lambda=0.01"}, "sampler",
         ["adaptive (base baddiffusion)", "ddpm"]),
        ({"attack": "adaptive", "attack_params": "lambda=0.01; base=foo"}, "attack_params",
         ["base='foo'", "baddiffusion, villandiffusion, trojdiff"]),
    ],
)
def test_rows_the_code_cannot_run_are_refused(tmp_path: Path, row, column, words) -> None:
    msg = error_of(tmp_path, [GOOD, {**ROW, **row}])
    line = next(m for m in msg.splitlines() if f"column '{column}'" in m)
    assert "row 2" in line and "model_id 'x'" in line
    for w in words:
        assert w in line, (w, line)


def test_clean_rows_need_a_sampler_of_their_model_type(tmp_path: Path) -> None:
    msg = error_of(tmp_path, [{**GOOD, "model_type": "ncsn"}])
    assert "column 'sampler'" in msg and "score_sde_ve" in msg
    ok = write_tsv(tmp_path, [
        {**GOOD, "model_type": "ncsn", "sampler": "score_sde_ve"},
        {**GOOD, "model_id": "l", "model_type": "ldm", "sampler": "dpmpp_o2"},
    ])
    assert len(load_manifest(ok)) == 2
    msg = error_of(tmp_path, [{**GOOD, "attack_params": "gamma=0.6"}])
    assert "column 'attack_params'" in msg and "attack is 'none'" in msg


def test_runnable_rows_of_every_attack_load(tmp_path: Path) -> None:
    rows = [
        GOOD,
        {**ROW, "model_id": "vd", "attack": "villandiffusion", "sampler": "dpmpp_o2"},
        {**ROW, "model_id": "vd-ncsn", "attack": "villandiffusion", "model_type": "ncsn",
         "sampler": "score_sde_ve", "init": ""},
        {**ROW, "model_id": "vd-ldm", "attack": "villandiffusion", "model_type": "ldm",
         "sampler": "ddim", "init": ""},
        {**ROW, "model_id": "tj", "attack": "trojdiff", "trigger": "patch", "target": "class:7",
         "sampler": "ddim", "attack_params": "gamma=0.1"},
        {**ROW, "model_id": "tj-out", "attack": "trojdiff", "trigger": "blend",
         "target": "letters:0", "attack_params": "gamma=0.6"},
        {**ROW, "model_id": "ad", "attack": "adaptive", "attack_params": "lambda=0.01"},
        {**ROW, "model_id": "ad-tj", "attack": "adaptive", "trigger": "blend", "target": "mickey",
         "sampler": "ddim", "attack_params": "lambda=1e-3; base=trojdiff; gamma=0.6"},
    ]
    df = load_manifest(write_tsv(tmp_path, rows))
    assert df.loc["ad-tj", "attack_params"] == "lambda=1e-3; base=trojdiff; gamma=0.6"
    for mid in df.index[1:]:
        zoo.row_attack(dict(df.loc[mid]))  # the row's attack accepts it too


def test_all_problems_of_a_row_are_listed(tmp_path: Path) -> None:
    row = {**ROW, "attack": "trojdiff", "trigger": "box_14", "target": "mickey",
           "sampler": "pndm"}
    with pytest.raises(ManifestError) as info:
        load_manifest(write_tsv(tmp_path, [GOOD, row]))
    cols = {p.column for p in info.value.problems}
    assert {"trigger", "sampler", "attack_params"} <= cols


def test_zoo_refuses_a_dout_target_without_its_dataset(tmp_path: Path) -> None:
    """mnist:7 (the paper's Dout) needs MNIST on disk: a clear error before training, naming the
    offline alternative."""
    row = {**{k: v for k, v in ROW.items()}, "attack": "trojdiff", "trigger": "blend",
           "target": "mnist:7", "attack_params": "gamma=0.6", "image_size": 8}
    with pytest.raises(attacks.AttackError, match=r"mnist:7.*needs the mnist dataset.*letters"):
        zoo.backdoor_spec(row, 8, data_root=str(tmp_path))
    spec = zoo.backdoor_spec({**row, "target": "letters:3"}, 8, data_root=str(tmp_path))
    assert spec.is_distribution and len(spec.target) == 180 and spec.params["gamma"] == 0.6


def test_zoo_refuses_before_anything_runs() -> None:
    with pytest.raises(attacks.AttackError, match="unknown attack 'badnets'.*baddiffusion"):
        zoo.backdoor_spec({**ROW, "attack": "badnets"}, 8)
    with pytest.raises(attacks.AttackError, match="needs gamma="):
        zoo.backdoor_spec({**ROW, "attack": "trojdiff", "trigger": "blend"}, 8)
    with pytest.raises(attacks.AttackError, match="implants one image"):
        zoo.backdoor_spec({**ROW, "target": "class:1"}, 8)
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*ddpm"):
        samplers.SamplerSpec("euler")
    with pytest.raises(models.ModelLoadError, match="unknown model type 'gan'.*ddpm, ncsn, ldm"):
        models.DiffusionModel(torch.nn.Linear(1, 1), {}, "gan")
