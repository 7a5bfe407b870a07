"""The removal ablation: its variants, its records, table and figures (on the tiny zoo)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffcleanse import patterns, reporting, tables
from diffcleanse.removal import ablation, stages
from diffcleanse.removal import finetune as ft
from diffcleanse.removal import importance as imp

GRID = {"normalisers": ["none", "mean"], "clean_timesteps": ["above_T", "all"],
        "diffcleanse_ratios": [0.01, 0.02, 0.05], "diffpruning_ratios": [0.02, 0.05, 0.1, 0.13],
        "random": True}


def test_the_grid_of_the_issue():
    dc = ablation.grid_variants(GRID, "true")
    assert len(dc) == 12 and {v.strategy for v in dc} == {"diffcleanse"}
    rest = ablation.grid_variants(GRID, ablation.NO_TRIGGER)
    assert [v.ratio for v in rest if v.strategy == "diffpruning"] == [0.02, 0.05, 0.1, 0.13]
    assert [v.ratio for v in rest if v.strategy == "random"] == [0.01, 0.02, 0.05, 0.1, 0.13]
    assert len({v.label for v in dc + rest}) == len(dc + rest)


@pytest.mark.slow
def test_ablation_records_table_and_figures(tiny_zoo, tmp_path):
    from diffcleanse import classifiers, data

    x, y = data.load_digits(8)
    model, metrics = classifiers.train_classifier(x, y, steps=100, batch_size=64,
                                                  channels=(16, 32), seed=0)
    classifiers.save_classifier(model, tmp_path / "cls", {"dataset": "digits", **metrics})
    r = tiny_zoo["recipe"]
    card = {"model_id": "tiny", "manifest_row": {"model_id": "tiny", "dataset": "digits",
                                                 "sampler": "ddpm", "group": "DDPM-D"},
            "ground_truth": {"attack": "baddiffusion", "trigger": r["trigger"],
                             "target": r["target"], "backdoored": True}}
    (tmp_path / "card.json").write_text(json.dumps(card))
    bd = tiny_zoo["backdoored"]
    stages.make_clean_data(bd, tmp_path / "syn.safetensors", tmp_path / "syn.json", n=64, seed=1,
                           progress=False)
    save_file({"trigger": patterns.render_trigger(r["trigger"], r["image_size"])},
              str(tmp_path / "trigger.safetensors"))
    grid = {"normalisers": ["none", "mean"], "clean_timesteps": ["above_T"],
            "diffcleanse_ratios": [0.02], "diffpruning_ratios": [0.1], "random": True}
    common = dict(grid=grid, importance_cfg=imp.ImportanceConfig(batch_size=8),
                  finetune_cfg=ft.FinetuneConfig(epochs=1, batch_size=16, lr=5e-4),
                  eval_cfg=ablation.AblationEval(fid_n_samples=16, asr_n_samples=16,
                                                 batch_size=32),
                  seeds=[0], classifier_dir=str(tmp_path / "cls"))
    recs = {}
    for part, trig in (("true", tmp_path / "trigger.safetensors"), ("none", None)):
        recs[part] = ablation.run_ablation(bd, tmp_path / "card.json", tmp_path / "syn.safetensors",
                                           part, trig, tmp_path / f"{part}.json",
                                           tmp_path / f"{part}.safetensors", **common)
    rows = recs["true"]["rows"] + recs["none"]["rows"]
    assert [r["strategy"] for r in rows] == ["diffcleanse", "diffcleanse", "diffpruning",
                                             "random", "random"]
    by = {(r["strategy"], r["normaliser"], r["ratio"]): r for r in rows}
    # the random control removes as many channels as the method it controls
    assert by[("random", "none", 0.02)]["channels_removed"] == \
        by[("diffcleanse", "mean", 0.02)]["channels_removed"]
    assert by[("random", "none", 0.1)]["channels_removed"] == \
        by[("diffpruning", "none", 0.1)]["channels_removed"]
    base = recs["true"]["original"]
    assert base == recs["none"]["original"]  # the same noise: paired
    assert base["asr_real"] >= 0.5
    for row in rows:
        for state in ("pruned", "finetuned"):
            assert row[f"delta_utility_{state}"] == pytest.approx(row[f"utility_{state}"]
                                                                  - base["utility"])
            assert 0.0 <= row[f"out_of_range_triggered_{state}"] <= 1.0
            assert row[f"fd_triggered_{state}"] > 0
        assert row["finetune_steps"] == 4
    samples = load_file(str(tmp_path / "true.safetensors")) | \
        load_file(str(tmp_path / "none.safetensors"))
    assert samples["original/triggered"].shape == (8, 3, 8, 8)
    df, protocols = tables.load_removal_ablation([tmp_path / "true.json", tmp_path / "none.json"])
    table = tables.removal_ablation_table(df)
    assert len(table) == 5 and set(table["trigger"]) == {"true", "none"}
    tables.write_table(table, tmp_path / "t.csv", tmp_path / "t.md", "Removal ablation",
                       tables.removal_ablation_caption(protocols))
    assert "κ_m = 0.01" in (tmp_path / "t.md").read_text()
    assert reporting.removal_ablation_figure(df, protocols[0]["utility_metric"],
                                             [tmp_path / "f.png"]) == 5
    assert reporting.removal_ablation_samples(samples, df, tmp_path / "s.png") == 6
    assert (tmp_path / "f.png").stat().st_size > 0 and (tmp_path / "s.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"shape \(3, 16, 16\)"):
        save_file({"trigger": torch.zeros(3, 16, 16)}, str(tmp_path / "big.safetensors"))
        ablation.run_ablation(bd, tmp_path / "card.json", tmp_path / "syn.safetensors", "true",
                              tmp_path / "big.safetensors", tmp_path / "x.json",
                              tmp_path / "x.safetensors", **common)
