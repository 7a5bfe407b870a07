"""Evaluation: FID/FD through torch-fidelity, ASR (Eq. 15), ACC, deltas, tables and figures."""

import json
import math

import pandas as pd
import pytest
import torch
from torch import nn

from diffcleanse import evaluation as ev
from diffcleanse import tables


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    """A small classifier trained on the bundled digits at 8x8 (a few seconds), saved to disk."""
    from diffcleanse import classifiers, data

    x, y = data.load_digits(8)
    model, metrics = classifiers.train_classifier(
        x, y, steps=150, batch_size=64, channels=(16, 32), seed=0
    )
    d = tmp_path_factory.mktemp("cls") / "digits_8"
    classifiers.save_classifier(model, d, {"dataset": "digits", **metrics})
    return d, x, y


# ---- utility ---------------------------------------------------------------------------------


def test_fd_of_a_set_with_itself_is_zero_and_grows_with_degradation(digits_classifier):
    d, x, _ = digits_classifier
    ref = x[:800]
    same = ev.frechet_distance(ref, ref, classifier_dir=d, dataset="digits")
    assert same["metric"] == "FD-digits-cls"
    assert abs(same["value"]) < 1e-6
    assert same["n_generated"] == same["n_reference"] == 800
    g = torch.Generator().manual_seed(0)
    values = []
    for sigma in (0.1, 0.3, 0.6, 1.0):
        noisy = (ref + sigma * torch.randn(ref.shape, generator=g)).clamp(-1, 1)
        values.append(ev.frechet_distance(noisy, ref, classifier_dir=d, dataset="digits")["value"])
    assert values == sorted(values) and values[0] > 1e-4
    # another sample of the same data is far closer than a degraded one
    other = ev.frechet_distance(x[800:1600], ref, classifier_dir=d, dataset="digits")["value"]
    assert other < values[-1]


def test_reference_statistics_give_torch_fidelitys_fd(digits_classifier, tmp_path):
    """The FD from a saved reference's statistics equals torch-fidelity's calculate_metrics on
    the two image sets (the computation every evaluation did before it read the statistics)."""
    import torch_fidelity

    d, x, _ = digits_classifier
    g = torch.Generator().manual_seed(1)
    gen = (x[:300] + 0.3 * torch.randn(x[:300].shape, generator=g)).clamp(-1, 1)
    ref = x[300:]
    direct = torch_fidelity.calculate_metrics(
        input1=ev.UInt8Images(ev.to_uint8(gen)), input2=ev.UInt8Images(ev.to_uint8(ref)),
        fid=True, batch_size=64, cuda=False, cache=False, save_cpu_ram=True, verbose=False,
        feature_extractor=ev.CLASSIFIER_EXTRACTOR, feature_layer_fid="features",
        feature_extractor_weights_path=str(d))["frechet_inception_distance"]
    path = tmp_path / "ref.safetensors"
    ev.save_fid_statistics(ev.fid_statistics(ref, classifier_dir=d), path)
    stats = ev.load_fid_statistics(path)
    out = ev.frechet_distance(gen, stats, classifier_dir=d, dataset="digits")
    assert out["value"] == direct > 0
    assert out["n_reference"] == len(ref) and out["n_generated"] == 300
    assert ev.frechet_distance(gen, ref, classifier_dir=d)["value"] == direct


def test_reference_statistics_of_another_extractor_or_a_bad_file_are_refused(
        digits_classifier, tmp_path):
    d, x, _ = digits_classifier
    path = tmp_path / "ref.safetensors"
    ev.save_fid_statistics(ev.fid_statistics(x[:100], classifier_dir=d), path)
    other = tmp_path / "other_classifier"
    import shutil

    shutil.copytree(d, other)
    with pytest.raises(ev.EvaluationError, match="rerun the rule fid_reference"):
        ev.frechet_distance(x[:50], ev.load_fid_statistics(path), classifier_dir=other)
    pickled = tmp_path / "pickled.safetensors"
    torch.save({"mu": torch.zeros(3)}, pickled)  # a pickle under the right name: never loaded
    with pytest.raises(ev.EvaluationError, match="not a FID statistics file"):
        ev.load_fid_statistics(pickled)
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"mu": np.zeros(4, np.float32), "sigma": np.zeros((3, 3))}, str(tmp_path / "b.st"),
              metadata={"n": "5", "feature_extractor": "{}"})
    with pytest.raises(ev.EvaluationError, match="do not describe one Gaussian"):
        ev.load_fid_statistics(tmp_path / "b.st")


def test_utility_labels_never_call_a_substitute_fid():
    assert ev.utility_label("inception", "cifar10") == "FID"
    assert ev.utility_label("classifier", "digits") == "FD-digits-cls"
    with pytest.raises(ValueError):
        ev.utility_label("clip", "digits")


def test_protocol_text_states_each_protocol_once_and_names_every_sampler():
    """A zoo sampled with three samplers under one protocol gets one sentence naming them (not
    one sentence a sampler); a protocol that differs in anything else gets its own sentence."""
    base = {"protocol.utility_metric": "FD-digits-cls", "protocol.fid_n_samples": 256,
            "protocol.fid_steps": None, "protocol.n_reference": 1797,
            "protocol.feature_extractor": "classifier", "protocol.asr_n_samples": 64,
            "protocol.asr_steps": None, "protocol.clip_sample": False,
            "protocol.mse_threshold": 0.01, "protocol.mse_range": "[-1, 1]"}
    rows = [dict(base, **{"protocol.fid_sampler": s, "protocol.asr_sampler": s})
            for s in ("ddpm", "dpmpp_o2", "ddim", "ddpm")]
    text = tables.protocol_text(pd.DataFrame(rows))
    assert text.count("Utility FD-digits-cls") == 1 and text.count("ASR (Eq. 15)") == 1
    assert text.count("each model's own sampler (ddpm, dpmpp_o2, ddim)") == 2
    assert "(ddpm, all steps)" in tables.protocol_text(pd.DataFrame(rows[:1]))
    rows[1]["protocol.fid_n_samples"] = 64
    text = tables.protocol_text(pd.DataFrame(rows))
    assert text.count("Utility FD-digits-cls") == 2
    assert "64 clean samples (dpmpp_o2, all steps)" in text
    assert "256 clean samples (each model's own sampler (ddpm, ddim), all steps)" in text


def test_inception_offline_names_the_config_key(monkeypatch):
    import urllib.error

    import torch_fidelity.feature_extractor_inceptionv3 as inc

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(inc, "load_state_dict_from_url", offline)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    with pytest.raises(ev.EvaluationError, match="evaluation.fid.inception_weights"):
        ev.frechet_distance(x, x, feature_extractor="inception")
    with pytest.raises(ev.EvaluationError, match="does not exist"):
        ev.frechet_distance(x, x, feature_extractor="inception", inception_weights="/nonexistent")


@pytest.mark.slow
def test_inception_fid_from_a_local_weights_file(tmp_path, monkeypatch):
    """The real Inception path with a weights file named in the config (random weights here:
    the real file cannot be downloaded on this machine)."""
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    with monkeypatch.context() as m:
        m.setattr(inc, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(inc.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        torch.manual_seed(0)
        net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "inception.pth"
    torch.save(net.state_dict(), weights)
    x = torch.rand(6, 3, 16, 16) * 2 - 1
    out = ev.frechet_distance(x, x, feature_extractor="inception", inception_weights=weights)
    assert out["metric"] == "FID" and abs(out["value"]) < 1e-3
    assert out["feature_extractor"]["weights"] == str(weights)


# ---- ASR, ACC, deltas -----------------------------------------------------------------------


def test_asr_image_counts_exactly_the_samples_strictly_below_the_threshold():
    target = torch.zeros(3, 4, 4)
    samples = torch.stack(
        [target] * 3  # MSE 0
        + [torch.full_like(target, 0.1)]  # MSE 0.01
        + [torch.full_like(target, 0.5)]  # MSE 0.25: on the threshold, not below it
        + [torch.full_like(target, 1.0)] * 3  # MSE 1
    )
    assert ev.mse_to_target(samples, target).tolist()[4] == 0.25
    assert ev.asr_image(samples, target, 0.25) == 4 / 8
    assert ev.asr_image(samples, target, 0.2500001) == 5 / 8
    assert ev.asr_image(samples, target, 1e-3) == 3 / 8
    with pytest.raises(ValueError):
        ev.asr_image(samples[:, :, :2], target, 0.1)


class MeanClassifier(nn.Module):
    """Class = round(mean pixel value * 10) (a hand-made classifier with known answers)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def logits(self, x):
        k = (x.mean(dim=(1, 2, 3)) * 10).round().long().clamp(0, 9)
        return nn.functional.one_hot(k, 10).float() + 0 * self.dummy


def test_asr_class_is_the_target_class_share():
    values = [0.3, 0.3, 0.3, 0.7, 0.3, 0.1, 0.9, 0.3]  # 5 of 8 are class 3
    samples = torch.stack([torch.full((3, 4, 4), v) for v in values])
    clf = MeanClassifier()
    assert ev.asr_class(samples, clf, 3) == 5 / 8
    assert ev.asr_class(samples, clf, 7) == 1 / 8
    assert ev.asr_class(samples, clf, 3, batch_size=3) == 5 / 8
    assert ev.class_target("class:7") == ("dataset", 7)
    assert ev.class_target("mnist:7") == ("mnist", 7)
    with pytest.raises(ValueError):
        ev.class_target("hat")


def test_acc_and_deltas():
    assert ev.detection_accuracy([True, False, True, True], [True, False, False, True]) == 0.75
    assert math.isnan(ev.detection_accuracy([], []))
    assert ev.delta(0.0, 0.9) == pytest.approx(-0.9)  # backdoor removed: ΔASR = -ASR_before
    assert ev.delta(5.5, 2.0) == pytest.approx(3.5)
    assert ev.delta(None, 1.0) is None and ev.delta(1.0, float("nan")) is None


# ---- one model state, end to end (tiny zoo) -------------------------------------------------


def _card(path, model_id, backdoored, recipe):
    """A card as fetch/train write it: the manifest row (schema defaults for every column the row
    leaves out) and the ground truth."""
    from diffcleanse.manifest import row_to_card

    row = row_to_card({
        "model_id": model_id, "source": "train", "model_type": "ddpm", "dataset": "digits",
        "image_size": recipe["image_size"], "attack": "baddiffusion" if backdoored else "none",
        "trigger": recipe["trigger"] if backdoored else "none",
        "target": recipe["target"] if backdoored else "none",
        "poison_rate": recipe["poison_rate"] if backdoored else 0.0, "seed": 0,
        "train_steps": recipe["steps"], "sampler": "ddpm", "group": "DDPM-D",
    })
    card = {
        "model_id": model_id,
        "manifest_row": row,
        "ground_truth": {
            "attack": row["attack"],
            "trigger": row["trigger"],
            "target": row["target"],
            "poison_rate": row["poison_rate"],
            "backdoored": backdoored,
        },
    }
    path.write_text(json.dumps(card))
    return path


@pytest.mark.slow
def test_evaluate_model_on_the_tiny_zoo(tiny_zoo, digits_classifier, tmp_path):
    from safetensors.torch import load_file, save_file

    from diffcleanse import patterns, reporting

    cls_dir, _, _ = digits_classifier
    recipe = tiny_zoo["recipe"]
    params = {
        "fid": {"feature_extractor": "classifier", "n_samples": 64, "batch_size": 64},
        "asr": {"n_samples": 32, "mse_threshold": 0.05},
    }
    size = recipe["image_size"]
    trig = tmp_path / "trigger.safetensors"
    save_file({"trigger": patterns.render_trigger(recipe["trigger"], size)}, str(trig))
    recs = {}
    for name, bd in (("backdoored", True), ("clean", False)):
        card = _card(tmp_path / f"{name}.json", f"tiny-{name}", bd, recipe)
        recs[name] = ev.evaluate_model(
            tiny_zoo[name],
            card,
            tmp_path / name / "metrics.json",
            tmp_path / name / "samples.safetensors",
            params,
            classifier_dir=str(cls_dir),
            inverted_trigger=str(trig),
        )
    bd, clean = recs["backdoored"], recs["clean"]
    assert bd["utility_metric"] == "FD-digits-cls" and bd["utility"] > 0
    assert bd["protocol"]["mse_threshold"] == 0.05 and bd["protocol"]["fid_n_samples"] == 64
    assert bd["protocol"]["clip_sample"] is False
    # the real trigger passed as the "inverted" one gives the same ASR (same noise, same trigger)
    assert bd["asr_real"] == bd["asr_inverted"] >= 0.5
    assert bd["clean_hit_rate"] <= 0.3
    assert clean["asr_real"] is None and clean["target_kind"] is None
    for key in ("params", "seed", "seconds", "diffcleanse_version"):
        assert key in bd
    grid = load_file(str(tmp_path / "backdoored" / "samples.safetensors"))
    assert set(grid) == {"clean", "backdoor_real", "backdoor_inverted"}
    # a rerun gives the same numbers (seeded from the config seed and the model id)
    again = ev.evaluate_model(
        tiny_zoo["backdoored"],
        tmp_path / "backdoored.json",
        tmp_path / "again.json",
        tmp_path / "again.safetensors",
        params,
        classifier_dir=str(cls_dir),
    )
    assert again["utility"] == pytest.approx(bd["utility"]) and again["asr_real"] == bd["asr_real"]
    # against the reference's statistics (rule fid_reference) instead of its images: the same FD
    stats = tmp_path / "reference.safetensors"
    ev.write_reference_statistics(stats, "digits", size, classifier_dir=str(cls_dir),
                                  batch_size=64)
    by_stats = ev.evaluate_model(
        tiny_zoo["backdoored"], tmp_path / "backdoored.json", tmp_path / "stats.json",
        tmp_path / "stats.safetensors", params, classifier_dir=str(cls_dir),
        reference_stats=str(stats),
    )
    assert by_stats["utility"] == bd["utility"]
    assert by_stats["details"]["utility"]["n_reference"] == bd["details"]["utility"]["n_reference"]
    out = tmp_path / "before_after.png"
    reporting.before_after(
        tmp_path / "backdoored" / "metrics.json",
        tmp_path / "backdoored" / "samples.safetensors",
        out,
        after_record=tmp_path / "clean" / "metrics.json",
        after_samples=tmp_path / "clean" / "samples.safetensors",
    )
    assert out.stat().st_size > 1000


def test_a_method_trigger_equal_to_the_chosen_one_is_not_sampled_twice(
        tiny_zoo, digits_classifier, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    from diffcleanse import patterns

    cls_dir, _, _ = digits_classifier
    recipe = tiny_zoo["recipe"]
    params = {"fid": {"feature_extractor": "classifier", "n_samples": 16, "batch_size": 16},
              "asr": {"n_samples": 16, "mse_threshold": 0.05}}
    real = patterns.render_trigger(recipe["trigger"], recipe["image_size"])
    chosen, same, other = (tmp_path / f"{n}.safetensors" for n in ("chosen", "same", "other"))
    save_file({"trigger": real}, str(chosen))
    save_file({"trigger": real.clone()}, str(same))  # another file, the same values
    save_file({"trigger": real + 1e-3}, str(other))
    card = _card(tmp_path / "card.json", "tiny-backdoored", True, recipe)
    calls = []
    sample = ev.sampling.sample
    monkeypatch.setattr(ev.sampling, "sample", lambda *a, **k: calls.append(k["desc"])
                        or sample(*a, **k))
    recs = {}
    for name, trig in (("same", same), ("other", other)):
        calls.clear()
        recs[name] = ev.evaluate_model(
            tiny_zoo["backdoored"], card, tmp_path / name / "metrics.json",
            tmp_path / name / "samples.safetensors", params, classifier_dir=str(cls_dir),
            inverted_trigger=str(chosen), method_triggers={"bbti": str(trig)})
        recs[name]["calls"] = list(calls)
    assert "backdoor (bbti)" not in recs["same"]["calls"]
    assert recs["other"]["calls"] == [*recs["same"]["calls"], "backdoor (bbti)"]
    by = recs["same"]["inverted_by_method"]["bbti"]
    assert by["asr"] == recs["same"]["asr_inverted"]
    assert by["l2_to_true_trigger"] == 0.0
    grid = load_file(str(tmp_path / "same" / "samples.safetensors"))
    assert torch.equal(grid["backdoor_bbti"], grid["backdoor_inverted"])


# ---- tables --------------------------------------------------------------------------------


def _record(
    model,
    state,
    *,
    attack="baddiffusion",
    group="DDPM-D",
    backdoored=True,
    utility=1.0,
    asr_real=None,
    asr_inverted=None,
    strategy=None,
    ratio=None,
    loss=None,
    dataset="digits",
    sampler="ddpm",
):
    return {
        "stage": "evaluate",
        "model": model,
        "state": state,
        "strategy": strategy,
        "ratio": ratio,
        "loss": loss,
        "attack": attack,
        "group": group,
        "dataset": dataset,
        "image_size": 16,
        "sampler": sampler,
        "backdoored": backdoored,
        "target_kind": "image" if backdoored else None,
        "utility_metric": "FD-digits-cls",
        "utility": utility,
        "asr_real": asr_real,
        "asr_inverted": asr_inverted,
        "clean_hit_rate": None,
        "seconds": 1.0,
        "trigger": "box_14" if backdoored else "none",
        "target": "hat" if backdoored else "none",
        "uniform_real": 0.01 if backdoored and state == "original" else None,
        "inverted_by_method": {"bbti": {"asr": asr_inverted, "uniform_score": 0.05,
                                        "l2_to_true_trigger": 12.0}}
        if backdoored and state == "original" else {},
        "protocol": {
            "utility_metric": "FD-digits-cls",
            "feature_extractor": "classifier",
            "fid_n_samples": 512,
            "fid_sampler": "ddpm",
            "fid_steps": None,
            "n_reference": 1797,
            "asr_n_samples": 128,
            "asr_sampler": "ddpm",
            "asr_steps": None,
            "mse_threshold": 0.01,
            "clip_sample": False,
            "mse_range": "[-1, 1]",
        },
    }


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def hand_made(tmp_path):
    """Records of a two-clean/two-backdoored digits zoo with known numbers."""
    evs, vds = [], []
    zoo = {
        "clean-a": (False, False),
        "clean-b": (False, True),  # (backdoored, flagged)
        "bd-1": (True, True),
        "bd-2": (True, True),
    }
    for m, (bd, fl) in zoo.items():
        attack = "baddiffusion" if bd else "none"
        evs.append(
            _write(
                tmp_path / f"ev/{m}/orig.json",
                _record(
                    m,
                    "original",
                    attack=attack,
                    backdoored=bd,
                    utility=1.0,
                    asr_real=0.9 if bd else None,
                    asr_inverted=0.6 if m == "bd-1" else 0.8 if bd else None,
                ),
            )
        )
        vds.append(
            _write(
                tmp_path / f"vd/{m}.json",
                {"model": m, "method": "bbti", "backdoored": fl, "mscr": 0.9 if fl else 0.1},
            )
        )
        if bd:
            for s, r in (("diffcleanse", "0.02"), ("diffpruning", "0.1")):
                evs.append(
                    _write(
                        tmp_path / f"ev/{m}/{s}/pruned.json",
                        _record(
                            m,
                            "pruned",
                            strategy=s,
                            ratio=r,
                            utility=1.5 if s == "diffcleanse" else 3.0,
                            asr_real=0.0 if s == "diffcleanse" else 0.5,
                        ),
                    )
                )
                for loss, u in (("p", 1.2), ("c", 1.4)):
                    evs.append(
                        _write(
                            tmp_path / f"ev/{m}/{s}/{loss}.json",
                            _record(
                                m,
                                "finetuned",
                                strategy=s,
                                ratio=r,
                                loss=loss,
                                utility=u,
                                asr_real=0.0,
                            ),
                        )
                    )
    bench = []
    for m in zoo:
        for rule, s in (("train_model", 60.0), ("invert_trigger", 30.0)):
            p = _write(tmp_path / f"bench/{rule}/{m}.tsv", {})
            p.write_text(f"s\th:m:s\n{s}\t0:01:00\n")
            extra = {"method": "bbti", "seed": "0"} if rule == "invert_trigger" else {}
            bench.append({"rule": rule, "model": m, "path": str(p), **extra})
    return evs, vds, bench, tmp_path


def _outputs(root, names=("table1", "table2", "table4", "table7")):
    out = {"evaluation_csv": root / "tables/evaluation.csv"}
    for n in names:
        out |= {f"{n}_csv": root / f"tables/{n}.csv", f"{n}_md": root / f"tables/{n}.md"}
    return out


def test_tables_from_hand_made_records(hand_made):
    evs, vds, bench, root = hand_made
    out = _outputs(root)
    res = tables.build_tables(evs, vds, out, benchmarks=bench)

    t1 = res["table1"]
    keys = list(zip(t1["Attack"], t1["Model"], strict=True))
    assert keys[: len(tables.PAPER_ROWS["table1"])] == tables.PAPER_ROWS["table1"]
    assert keys[-1] == ("BadDiff", "DDPM-D")  # the zoo's own group follows the paper's
    row = t1.iloc[-1]
    assert row["BBTI ACC"] == 0.75  # clean-b is a false positive
    assert row["BBTI ASR"] == pytest.approx(0.7)  # mean of 0.6 and 0.8
    assert row["Models"] == "2 clean / 2 bd" and row["Elijah ACC"] == tables.NOT_RUN
    assert (t1.iloc[: len(tables.PAPER_ROWS["table1"])]["BBTI ACC"] == tables.NO_MODEL).all()

    t2 = res["table2"]
    mine = t2[t2["Model"] == "DDPM-D"].set_index("State")
    assert mine.loc["pruned", "Diff-Cleanse ΔASR"] == pytest.approx(-0.9)
    assert mine.loc["pruned", "Diff-Pruning ΔASR"] == pytest.approx(-0.4)
    assert mine.loc["pruned", "Diff-Cleanse ΔFD-digits-cls"] == pytest.approx(0.5)
    assert mine.loc["fine-tuned (loss_p)", "Diff-Pruning ΔFD-digits-cls"] == pytest.approx(0.2)
    assert mine.loc["pruned", "Diff-Cleanse ratio"] == "0.02"
    trojdiff = t2[(t2["Attack"] == "TrojDiff") & (t2["Model"] == "DDIM-A")]
    assert trojdiff.iloc[0]["Diff-Cleanse ΔASR"] == tables.NO_MODEL

    t4 = res["table4"].set_index("Model")
    assert t4.loc["DDPM-D", "loss_c ΔFD-digits-cls"] == pytest.approx(0.4)
    assert t4.loc["DDPM-D", "loss_p ΔFD-digits-cls"] == pytest.approx(0.2)
    assert t4.loc["ODE-C", "loss_p ΔASR"] == tables.NO_MODEL

    t7 = res["table7"].set_index("Attack")
    assert list(t7.index) == ["BadDiff", "VillanDiff", "TrojDiff", "Clean"]
    assert t7.loc["BadDiff", "Training"] == 60.0 and t7.loc["BadDiff", "BBTI"] == 30.0
    assert t7.loc["VillanDiff", "Training"] == tables.NO_MODEL
    assert t7.loc["BadDiff", "Backdoor Removal"] == tables.NOT_RUN

    md = out["table1_md"].read_text()
    assert md.startswith("# Table 1") and "κ_m = 0.01" in md and "FD-digits-cls" in md
    assert "not comparable with published FIDs" in md and "512 clean samples" in md
    assert tables.NO_MODEL in md
    assert "60.00s" in out["table7_md"].read_text() and tables.fmt_seconds(7200) == "2.00h"
    csv = pd.read_csv(out["evaluation_csv"])
    assert len(csv) == len(evs) and "delta_asr_real" in csv.columns


def test_table3_with_and_without_the_entropy_loss(hand_made):
    evs, vds, _, root = hand_made
    abl = [
        _write(
            root / f"abl/{m}.json",
            {
                "model": m,
                "ablation": "entropy_loss",
                "value": False,
                "flagged": fl,
                "asr_inverted": a,
            },
        )
        for m, fl, a in (
            ("clean-a", True, None),
            ("clean-b", True, None),
            ("bd-1", True, 0.2),
            ("bd-2", False, 0.0),
        )
    ]
    out = {"table3_csv": root / "t3.csv", "table3_md": root / "t3.md"}
    t3 = tables.build_tables(evs, vds, out, entropy_ablation=abl)["table3"].set_index("Attack")
    assert t3.loc["BadDiff", "ℓ_s ACC"] == 0.25
    assert t3.loc["BadDiff", "ℓ_s ASR"] == pytest.approx(0.1)
    assert t3.loc["BadDiff", "ℓ_s + ℓ_e ACC"] == 0.75
    assert t3.loc["TrojDiff", "ℓ_s ACC"] == tables.NO_MODEL


def test_figures_write_png_and_pdf(hand_made, tmp_path):
    from diffcleanse import reporting

    evs, vds, _, _ = hand_made
    df, vd = tables.load_evaluations(evs), tables.load_verdicts(vds)
    paths = [tmp_path / "fig5.png", tmp_path / "fig5.pdf"]
    assert reporting.mscr_vs_asr(df, vd, paths) == 4
    values, skipped = reporting.entropy_sets(
        [("digits", 8), ("cifar10", 8)],
        n_images=100,
        n_random=100,
        data_root=str(tmp_path / "none"),
    )
    assert set(values) == {"digits@8", "random@8"} and "cifar10@8" in skipped
    assert values["random@8"].median() > values["digits@8"].median()
    reporting.entropy_boxplot(
        values, [tmp_path / "fig4.png", tmp_path / "fig4.pdf"], kappa_minus=0.1, kappa_plus=8.5
    )
    abl = pd.DataFrame(
        {
            "model": ["m", "m"],
            "value": [0.5, 0.9],
            "asr_real": [0.0, 0.1],
            "delta_utility": [0.3, 0.2],
            "utility_metric": ["FD-digits-cls"] * 2,
        }
    )
    assert reporting.threshold_figure(abl, [tmp_path / "fig6.png", tmp_path / "fig6.pdf"]) == 2
    for name in ("fig4", "fig5", "fig6"):
        for ext in ("png", "pdf"):
            assert (tmp_path / f"{name}.{ext}").stat().st_size > 1000


def test_removal_tables_tell_a_group_without_removal_from_a_missing_group(hand_made):
    evs, vds, _, root = hand_made
    originals = [p for p in evs if p.name == "orig.json"]
    out = _outputs(root / "no-removal", names=("table2", "table4"))
    res = tables.build_tables(originals, vds, out)
    t2 = res["table2"].set_index("Model")
    assert t2.loc["DDPM-D", "Diff-Cleanse ΔASR"] == tables.NO_REMOVAL
    assert t2.loc["ODE-C", "Diff-Cleanse ΔASR"] == tables.NO_MODEL
    assert res["table4"].set_index("Model").loc["DDPM-D", "loss_p ΔASR"] == tables.NO_REMOVAL


def test_table_i_lists_the_ground_truth_and_each_methods_trigger(hand_made):
    evs, vds, bench, root = hand_made
    out = _outputs(root, names=("tableI", "table1"))
    res = tables.build_tables(evs, vds, out, benchmarks=bench, methods=["bbti", "elijah"])
    t = res["tableI"]
    assert list(t.columns) == ["Model", "Trigger", "Target", "Method", "Uniform", "ASR", "L2 dist"]
    assert sorted(set(t["Model"])) == ["bd-1", "bd-2"]  # backdoored models only
    gt = t[t["Method"] == "GT"]
    assert gt["L2 dist"].tolist() == [0.0, 0.0] and gt["ASR"].tolist() == [0.9, 0.9]
    eli = t[t["Method"] == "Elijah"]
    assert eli["ASR"].tolist() == [tables.NOT_RUN] * 2  # elijah made no trigger in these records
    assert "PureDiffusion's Table I" in (root / "tables/tableI.md").read_text()
    t1 = res["table1"]
    assert "Combined ACC" in t1.columns and "Elijah ACC" in t1.columns
    assert t1.iloc[-1]["Elijah ACC"] == tables.NOT_RUN
