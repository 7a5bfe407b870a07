"""Detection as a population: leave-one-model-out detectors, calibration, ROC, bootstrap, and the
combined verdict."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from diffcleanse import detection, population
from diffcleanse.population import DetectorSpec, PopulationError


def _toy(n_clean=4, n_bd=4, seed=0):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.normal(0, 1, (n_clean, 2)), rng.normal(4, 1, (n_bd, 2))])
    y = np.array([0] * n_clean + [1] * n_bd)
    return x, y


def test_random_forest_never_sees_the_model_it_judges(monkeypatch):
    """Every model's verdict comes from a forest fitted on the others: the fitted rows never
    include the judged row (a forest that saw it would recognise its label)."""
    from sklearn.ensemble import RandomForestClassifier

    x, y = _toy()
    x[:, 1] = np.arange(len(y))  # a feature that identifies each model
    seen = []
    real_fit = RandomForestClassifier.fit

    def fit(self, xs, ys):
        seen.append({tuple(r) for r in np.asarray(xs)})
        return real_fit(self, xs, ys)

    monkeypatch.setattr(RandomForestClassifier, "fit", fit)
    res = population.leave_one_out(x, y, DetectorSpec("random_forest", ("a", "b")), seed=0)
    assert len(seen) == len(y)
    for i, rows in enumerate(seen):
        assert tuple(x[i]) not in rows and len(rows) == len(y) - 1
    assert res["flagged"].dtype == bool and len(res["score"]) == len(y)


def test_random_forest_separates_separable_statistics_and_is_seeded():
    x, y = _toy()
    spec = DetectorSpec("random_forest", ("a", "b"))
    a = population.leave_one_out(x, y, spec, seed=3)
    b = population.leave_one_out(x, y, spec, seed=3)
    assert np.array_equal(a["score"], b["score"])
    assert population.accuracy(a["flagged"], y) == 1.0


def test_random_forest_says_how_many_models_it_needs():
    x, y = _toy(n_clean=2, n_bd=4)
    with pytest.raises(PopulationError, match="at least 2 clean and 2 backdoored.*at least 3"):
        population.leave_one_out(x, y, DetectorSpec("random_forest", ("a", "b")))


def test_threshold_is_calibrated_on_the_other_clean_models_only():
    # clean statistics 1, 2, 3; backdoored 10 and 2.5: a backdoored value never moves a threshold
    x = np.array([[1.0], [2.0], [3.0], [10.0], [2.5]])
    y = np.array([0, 0, 0, 1, 1])
    res = population.leave_one_out(x, y, DetectorSpec("threshold", ("kl",)))
    assert res["threshold"].tolist() == [3.0, 3.0, 2.0, 3.0, 3.0]
    assert res["flagged"].tolist() == [False, False, True, True, False]
    # lower-is-backdoored statistics (a uniform score): the smallest other clean value
    low = population.leave_one_out(-x, y, DetectorSpec("threshold", ("u",),
                                                       higher_is_backdoored=False))
    assert low["flagged"].tolist() == res["flagged"].tolist()
    with pytest.raises(PopulationError, match="clean model"):
        population.leave_one_out(np.array([[1.0], [5.0]]), np.array([0, 1]),
                                 DetectorSpec("threshold", ("kl",)))


def test_fixed_threshold_is_mscr_at_kappa_d():
    x = np.array([[0.1], [0.5], [0.49]])
    res = population.leave_one_out(x, np.array([0, 1, 1]), DetectorSpec("fixed", ("mscr",)),
                                   fixed_threshold=0.5)
    assert res["flagged"].tolist() == [False, True, False]


def test_roc_and_bootstrap():
    r = population.roc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert r["auc"] == 1.0 and r["tpr_at_fpr"] == 1.0
    r = population.roc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1])
    assert r["auc"] == 0.0
    assert np.isnan(population.roc([0.1, 0.2], [0, 0])["auc"])
    b = population.bootstrap([0.1, 0.3, 0.2, 0.8, 0.7, 0.9], [0, 0, 0, 1, 1, 1], n=200, seed=1)
    assert b["auc_ci"] == [1.0, 1.0] and b["resamples"] == 200
    b2 = population.bootstrap([0.1, 0.6, 0.2, 0.5, 0.7, 0.9], [0, 0, 0, 1, 1, 1], n=200, seed=1)
    assert b2["auc_ci"][0] < 1.0 <= b2["auc_ci"][1] + 1e-12
    assert b2 == population.bootstrap([0.1, 0.6, 0.2, 0.5, 0.7, 0.9], [0, 0, 0, 1, 1, 1],
                                      n=200, seed=1)


def _verdict(tmp_path, model, method, seed, mscr, kappa_d=0.5):
    d = tmp_path / model / method / str(seed)
    d.mkdir(parents=True)
    v = {"model": model, "method": method, "seed_index": seed, "mscr": mscr,
         "backdoored": mscr >= kappa_d, "kappa_d": kappa_d, "sampler": {"name": "ddpm"}}
    (d / "verdict.json").write_text(json.dumps(v))
    save_file({"trigger": torch.full((3, 4, 4), float(mscr))}, str(d / "trigger.safetensors"))
    return d / "verdict.json", d / "trigger.safetensors"


def test_combined_verdict_any_method_per_seed_and_half_the_seeds(tmp_path):
    from safetensors.torch import load_file

    grid = {("bbti", 0): 0.2, ("elijah", 0): 0.6, ("bbti", 1): 0.1, ("elijah", 1): 0.3,
            ("bbti", 2): 0.55, ("elijah", 2): 0.1}
    pairs = [_verdict(tmp_path, "m", meth, s, v) for (meth, s), v in grid.items()]
    rec = detection.combine_verdicts([p[0] for p in pairs], [p[1] for p in pairs],
                                     tmp_path / "v.json", tmp_path / "t.safetensors",
                                     methods=["bbti", "elijah"], seeds=["0", "1", "2"])
    assert rec["seeds_flagged"] == {"0": True, "1": False, "2": True}
    assert rec["backdoored"] and rec["share_of_seeds_flagged"] == pytest.approx(2 / 3)
    # the trigger kept for removal is the most effective one: elijah's of seed 0 (MSCR 0.6)
    assert (rec["trigger_method"], rec["trigger_seed_index"]) == ("elijah", 0)
    assert float(load_file(str(tmp_path / "t.safetensors"))["trigger"][0, 0, 0]) == \
        pytest.approx(0.6)
    assert rec["by_method"]["bbti"]["share_flagged"] == pytest.approx(1 / 3)


def test_combined_verdict_is_clean_when_fewer_than_half_the_seeds_flag(tmp_path):
    pairs = [_verdict(tmp_path, "m", "bbti", s, v) for s, v in enumerate([0.6, 0.1, 0.2])]
    rec = detection.combine_verdicts([p[0] for p in pairs], [p[1] for p in pairs],
                                     tmp_path / "v.json", tmp_path / "t.safetensors",
                                     methods=["bbti"], seeds=["0", "1", "2"])
    assert not rec["backdoored"] and rec["verdict"] == "clean"


def test_run_population_reads_each_methods_statistics_and_refuses_missing_ones():
    recs = [{"model": f"c{i}", "method": "terd", "seed_index": 0, "mscr": 0.1,
             "statistics": {"kl": float(i)}} for i in range(3)]
    recs += [{"model": "b0", "method": "terd", "seed_index": 0, "mscr": 0.2,
              "statistics": {"kl": 9.0}}]
    labels = {"c0": False, "c1": False, "c2": False, "b0": True}
    out = population.run_population(recs, labels, DetectorSpec("threshold", ("kl",)))
    seed0 = out["seeds"]["0"]
    assert seed0["b0"]["flagged"] and not seed0["c0"]["flagged"] and seed0["_accuracy"] == 0.75
    assert out["models"]["b0"]["share_flagged"] == 1.0
    with pytest.raises(PopulationError, match="no statistic uniformity"):
        population.run_population(recs, labels, DetectorSpec("threshold", ("uniformity",)))


def test_a_zoo_too_small_for_a_detector_is_refused_naming_what_it_needs():
    """Leave-one-model-out needs one model of the judged class more than the detector itself."""
    forest = population.DetectorSpec("random_forest", ("a", "b"))
    threshold = population.DetectorSpec("threshold", ("a",))
    assert forest.needs() == (3, 3) and threshold.needs() == (2, 0)
    assert population.DetectorSpec().needs() == (0, 0)  # a fixed threshold needs no zoo
    forest.check_zoo(3, 3)
    threshold.check_zoo(2, 0)
    with pytest.raises(population.PopulationError, match="at least 3 clean and 3 backdoored"):
        forest.check_zoo(2, 5, method="elijah")
    with pytest.raises(population.PopulationError, match="at least 2 clean models.*has 1 clean"):
        threshold.check_zoo(1, 4)
