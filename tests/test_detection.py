"""Stage 1: MSCR, the BBTI losses, encoders, classifiers, and BBTI on the tiny zoo."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from diffcleanse import (
    classifiers,
    data,
    detection,
    encoders,
    inversion,
    models,
    patterns,
    sampling,
)

# ---------------------------------------------------------------- MSCR on hand-made embeddings


def test_mscr_all_identical_is_one():
    z = torch.tensor([[1.0, 2.0, 3.0]]).repeat(10, 1)
    assert detection.mscr(z, 0.9) == 1.0


def test_mscr_all_orthogonal_is_one_over_n():
    z = torch.eye(12)
    assert detection.mscr(z, 0.9) == pytest.approx(1 / 12)


@pytest.mark.parametrize("k", [1, 3, 7, 20])
def test_mscr_planted_cluster_of_k(k):
    n, d = 20, 64
    g = torch.Generator().manual_seed(k)
    z = torch.eye(d)[:n] * 5  # mutually orthogonal background
    centre = torch.randn(d, generator=g)
    z[:k] = centre + 0.01 * torch.randn(k, d, generator=g)  # k near-identical embeddings
    assert detection.mscr(z, 0.9) == pytest.approx(k / n)


def test_mscr_counts_mutual_similarity_not_chains():
    # a chain a~b, b~c but not a~c: the largest mutually similar set has 2 members, not 3
    a = torch.tensor([1.0, 0.0])
    c = torch.tensor([math.cos(1.0), math.sin(1.0)])  # 57 degrees from a
    b = torch.tensor([math.cos(0.5), math.sin(0.5)])  # 29 degrees from both (cos 0.88)
    z = torch.stack([a, b, c])
    assert detection.mscr(z, 0.85) == pytest.approx(2 / 3)
    assert detection.mscr(z, 0.5) == 1.0


def test_mscr_threshold_is_strict_and_scale_free():
    z = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    assert detection.mscr(z, 0.9) == pytest.approx(2 / 3)
    assert detection.mscr(z, 0.999999) == pytest.approx(2 / 3)  # cos exactly 1 > κ
    assert detection.mscr(z, -1.0) == 1.0  # cos 0 > -1


def test_mscr_is_fast_on_a_hundred_random_embeddings():
    import time

    z = torch.randn(100, 8, generator=torch.Generator().manual_seed(0))
    t0 = time.time()
    v = detection.mscr(z, 0.3)  # a dense random graph: the hard case for the exact search
    assert 0 < v < 1 and time.time() - t0 < 5


def test_verdict_uses_kappa_d_and_target_kind():
    z = torch.cat([torch.ones(5, 4), torch.eye(4) * 3, -torch.ones(1, 4)])  # 5 of 10 identical
    v = detection.verdict(z, detection.DetectionSpec(kappa_d=0.5))
    assert v["mscr"] == 0.5 and v["backdoored"]
    assert not detection.verdict(z, detection.DetectionSpec(kappa_d=0.6))["backdoored"]
    assert detection.DetectionSpec(target_kind="class").active_kappa == 0.75
    with pytest.raises(ValueError, match="target_kind"):
        detection.DetectionSpec(target_kind="any")


# ---------------------------------------------------------------- losses


def test_similarity_loss_bounds():
    assert float(detection.similarity_loss(torch.ones(6, 3))) == pytest.approx(0.0, abs=1e-6)
    # orthogonal: only the diagonal contributes, 1 - N/N^2
    assert float(detection.similarity_loss(torch.eye(4))) == pytest.approx(1 - 1 / 4)


def test_entropy_in_bits_and_differentiable():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert float(detection.image_entropy(flat)) == pytest.approx(0.0, abs=1e-3)
    two = torch.full((1, 3, 16, 16), -1.0)
    two[..., :8] = 1.0  # half the pixels at each end: exactly one bit
    assert float(detection.image_entropy(two)) == pytest.approx(1.0, abs=1e-3)
    noise = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    h = detection.image_entropy(noise)
    assert (h > 8.5).all() and (h <= math.log2(768) + 1e-6).all()  # uniform noise: above κ+
    x = noise.clone().requires_grad_(True)
    detection.entropy_loss(x).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_entropy_loss_band():
    flat = torch.zeros(2, 3, 8, 8)
    assert float(detection.entropy_loss(flat)) == pytest.approx(0.1, abs=1e-3)  # κ- - 0
    digit = data.load_digits(16)[0][:4]
    assert float(detection.entropy_loss(digit)) == 0.0  # real digits lie inside the band


def test_bbti_loss_balances_lambda_and_ablation_switch():
    x = torch.zeros(4, 3, 8, 8, requires_grad=True)  # flat images: ℓ_e > 0
    z = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    loss, parts = detection.bbti_loss(x, z)
    assert parts["lambda"] * parts["loss_entropy"] == pytest.approx(parts["loss_similarity"])
    loss_s, parts_s = detection.bbti_loss(x, z, use_entropy=False)
    assert parts_s["loss_entropy"] == 0
    assert float(loss.detach()) == pytest.approx(2 * float(loss_s.detach()))


# ---------------------------------------------------------------- encoders and classifiers


@pytest.fixture(scope="module")
def digits_classifier(tmp_path_factory):
    x, y = data.load_digits(8)
    model, metrics = classifiers.train_classifier(x, y, steps=150, seed=0)
    path = tmp_path_factory.mktemp("clf") / "digits_8"
    classifiers.save_classifier(model, path, {"dataset": "digits", "image_size": 8, **metrics})
    return path, metrics


def test_classifier_learns_digits_and_round_trips_without_pickle(digits_classifier):
    path, metrics = digits_classifier
    assert metrics["holdout_accuracy"] > 0.8
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "weights.safetensors"]
    model = classifiers.load_classifier(path)
    x, _ = data.load_digits(8)
    assert model.features(x[:5]).shape == (5, model.feature_dim)
    assert model.logits(x[:5]).shape == (5, 10)
    assert model.features(data.load_digits(16)[0][:2]).shape == (2, model.feature_dim)  # resized


def test_classifier_errors_are_clear(tmp_path):
    with pytest.raises(classifiers.ClassifierLoadError, match="train_classifier"):
        classifiers.load_classifier(tmp_path)
    with pytest.raises(encoders.EncoderUnavailable, match="classifier"):
        encoders.make_encoder("classifier")


def _separation(enc, size):
    """Mean cosine within a digit class minus across classes (positive = separates)."""
    x, y = data.load_digits(size)
    with torch.no_grad():
        s = detection.cosine_matrix(enc(x[:300]))
    same = y[:300, None] == y[None, :300]
    return float(s[same].mean() - s[~same].mean())


def test_encoders_interface_and_separation(digits_classifier):
    path, _ = digits_classifier
    for spec in ("pixels", f"classifier:{path}"):
        enc = encoders.make_encoder(spec)
        x = data.load_digits(8)[0][:4].requires_grad_(True)
        z = enc(x)
        assert z.ndim == 2 and z.shape[0] == 4
        z.sum().backward()  # differentiable to the images
        assert x.grad is not None and enc.describe()["name"] == enc.name
        assert _separation(enc, 8) > 0.1, spec
    assert encoders.make_encoder(f"classifier:{path}").name == "classifier:digits_8"


def test_clip_offline_errors_name_the_config_key(tmp_path):
    with pytest.raises(encoders.EncoderUnavailable, match="detection.clip_pretrained"):
        encoders.ClipEncoder("ViT-B-32", str(tmp_path / "missing.safetensors"))
    with pytest.raises(encoders.EncoderUnavailable, match="detection.clip_pretrained"):
        encoders.ClipEncoder("ViT-B-32", None)  # a random CLIP is refused
    with pytest.raises(encoders.EncoderUnavailable, match="detection.clip_pretrained"):
        encoders.ClipEncoder("ViT-B-32", "openai")  # HF_HUB_OFFLINE: cannot download


@pytest.mark.slow
def test_clip_encoder_from_a_local_weights_file(tmp_path):
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    weights = tmp_path / "vit-b-32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    enc = encoders.make_encoder(f"clip:{weights}")
    z = enc(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert z.shape == (2, 512) and enc.describe()["pretrained"] == str(weights)
    assert enc.name == f"clip:ViT-B-32:{weights}"


# ---------------------------------------------------------------- BBTI on the tiny zoo
# The tiny zoo (8x8, 50 steps; its BadDiffusion model is weak: 25% of clean-noise samples already
# show the hat) with the paper's protocol (BBTISpec's defaults: black-box gradient, r ~ N(0, 1)),
# the pixel encoder and batch 16. With the partial-derivative sign (`blackbox_partial`) its MSCR
# stays short of the paper's κ_d = 0.5 within the test budget (~0.31 after 18 iterations, real
# hats) while the clean model stays at 1/16-1/8, so the flag test runs at κ_d = 0.3: a claim
# about separation on this weak backdoor, not about κ_d. The total derivative (`blackbox`, the
# default, +1 for BadDiffusion) does not find this model's hat within 30 iterations (MSCR 0.06:
# README "Detection" compares the variants).
TINY = {"max_iters": 30, "gradient": "blackbox_partial"}
TINY_KAPPA_D = 0.3
# the inverted trigger's ASR must exceed the rate at which clean noise alone lands on the hat by
# this much (64 fresh samples; measured 0.22 vs 0.125 on 32)
ASR_MARGIN = 0.05


def _invert(path, kappa_d, batch_size=16, seed=0, **bbti):
    model = models.load_pipeline(path)
    return inversion.run_method(model, "bbti", {**TINY, **bbti},
                                detection.DetectionSpec(kappa_d=kappa_d),
                                encoders.make_encoder("pixels"),
                                sampler=sampling.SamplerSpec("ddpm"), batch_size=batch_size,
                                seed=seed, noise_seed=seed, progress=False)


@pytest.fixture(scope="module")
def tiny_bbti(tiny_zoo):
    return {name: _invert(tiny_zoo[name], kappa_d=TINY_KAPPA_D)
            for name in ("backdoored", "clean")}


@pytest.mark.slow
def test_bbti_flags_the_backdoored_model_and_not_the_clean_one(tiny_bbti):
    bd, cl = tiny_bbti["backdoored"], tiny_bbti["clean"]
    assert bd.verdict["backdoored"] and bd.stopped_early, bd.history
    assert not cl.verdict["backdoored"] and cl.iterations == TINY["max_iters"]
    assert bd.verdict["mscr"] >= cl.verdict["mscr"] + 0.2


@pytest.mark.slow
def test_inverted_trigger_reproduces_the_target(tiny_bbti, tiny_zoo):
    r = tiny_zoo["recipe"]
    target = patterns.render_target(r["target"], r["image_size"])
    bd = tiny_bbti["backdoored"]
    unet, cfg = models.load_model(tiny_zoo["backdoored"])
    # fresh noise, not the noise the trigger was optimised on
    x = sampling.sample(unet, cfg, 64, trigger=bd.trigger, seed=123, progress=False)
    asr = float((((x - target) ** 2).mean(dim=(1, 2, 3)) < 0.01).float().mean())
    leak = sampling.sample(unet, cfg, 64, seed=123, progress=False)  # clean noise, no trigger
    leak_rate = float((((leak - target) ** 2).mean(dim=(1, 2, 3)) < 0.01).float().mean())
    assert asr >= leak_rate + ASR_MARGIN, (asr, leak_rate)


def test_blackbox_gradient_is_eq1s_total_derivative():
    """X_T = ε + r and Eq. 1 (X_T = α̂ X_0 + β̂ ε + ρ̂ r) give X_0 = (ε + r − β̂ε − ρ̂r)/α̂: the total
    derivative dX_0/dr is (1 − ρ̂)/α̂, exactly 1 for BadDiffusion (ρ̂_T = 1 − α̂_T), while the partial
    at fixed X_T is −ρ̂/α̂ (the opposite sign)."""
    from diffcleanse.inversion import bbti

    sched = models.build_scheduler(100)
    cfg = dict(sched.config)
    c = bbti.eq1_coefficients(cfg)
    a, rho = c["alpha_hat_T"], c["rho_hat_T"]
    beta = math.sqrt(1 - a * a)
    eps = torch.randn(5)
    r = torch.randn(5, requires_grad=True)
    x0 = (eps + r - beta * eps - rho * r) / a  # Eq. 1 solved for X_0 with X_T = ε + r
    x0.sum().backward()
    assert torch.allclose(r.grad, torch.full_like(r, bbti.blackbox_scale("blackbox", cfg)))
    assert bbti.blackbox_scale("blackbox", cfg) == pytest.approx(1.0)
    r2 = torch.randn(5, requires_grad=True)
    x_T = (eps + r2).detach()  # held fixed: only the explicit ρ̂ r term moves
    ((x_T - beta * eps - rho * r2) / a).sum().backward()
    assert torch.allclose(r2.grad, torch.full_like(r2, bbti.blackbox_scale("blackbox_partial",
                                                                           cfg)))
    assert bbti.blackbox_scale("blackbox_partial", cfg) < 0


@pytest.mark.parametrize("gradient", ["blackbox", "blackbox_partial"])
def test_blackbox_gradients_run_the_papers_protocol(tiny_zoo, gradient):
    """One no-grad sampling pass per iteration, nothing else; the two differ only in sign."""
    res = _invert(tiny_zoo["clean"], 0.5, max_iters=2, batch_size=4, gradient=gradient,
                  early_stop=False)
    assert res.unet_rows == 2 * 50 * 4 and res.iterations == 2


def test_restarts_share_the_budget_and_range_loss_is_recorded(tiny_zoo):
    res = _invert(tiny_zoo["clean"], 0.5, max_iters=4, batch_size=4, restarts=2,
                  range_loss=True, init_scale=0.1, early_stop=False)
    assert [row["start"] for row in res.history] == [0, 0, 1, 1]
    # each start draws its own trigger at the given scale
    assert res.history[2]["trigger_norm"] < 0.1 * 3 * 8 * 2
    assert all("loss_range" in row and "lambda_range" in row for row in res.history)
    with pytest.raises(ValueError, match=r"inversion.bbti.restarts \(--restarts\)"):
        inversion.BBTISpec(max_iters=2, restarts=3)


@pytest.mark.parametrize("gradient", ["blackbox", "whitebox", "zeroth_order"])
def test_batched_restarts_give_the_results_of_one_by_one(tiny_zoo, gradient):
    """R starts as one batch of R x B samples, each with its own Adam and its own stop, give the
    trigger, history and verdict of the same starts run one after another (issue 14)."""
    kw = {"max_iters": 9, "restarts": 3, "gradient": gradient, "whitebox_steps": 10,
          "batch_size": 8, "seed": 5, "zo_directions": 2}
    a = _invert(tiny_zoo["backdoored"], 0.3, batched=True, **kw)
    b = _invert(tiny_zoo["backdoored"], 0.3, batched=False, **kw)
    assert a.stopped_early == b.stopped_early and a.verdict["mscr"] == b.verdict["mscr"]
    assert [(r["start"], r["iteration"], r["mscr"]) for r in a.history] == \
        [(r["start"], r["iteration"], r["mscr"]) for r in b.history]
    assert torch.allclose(a.trigger, b.trigger, atol=1e-5)
    assert torch.allclose(a.samples, b.samples, atol=1e-4)
    # batching does not add evaluations
    assert a.unet_rows <= b.unet_rows + 50 * 8 * 3 * 10 * (5 if gradient == "zeroth_order" else 1)


def test_same_seed_same_trigger_and_record(tiny_zoo):
    a = _invert(tiny_zoo["clean"], 0.5, max_iters=2, batch_size=4)
    b = _invert(tiny_zoo["clean"], 0.5, max_iters=2, batch_size=4)
    assert torch.equal(a.trigger, b.trigger) and torch.equal(a.samples, b.samples)
    assert a.verdict == b.verdict and a.trigger.shape == (3, 8, 8)


def test_whitebox_gradient_runs_and_counts_unet_evaluations(tiny_zoo):
    res = _invert(tiny_zoo["clean"], 0.5, max_iters=2, batch_size=4, gradient="whitebox",
                  whitebox_steps=5, early_stop=False)
    # 2 iterations x 5 steps x 4 images forward (+ the same again recomputed by checkpointing
    # for the backward), then the verdict's full 50-step chain
    assert res.unet_rows >= 2 * 5 * 4 + 50 * 4 and res.iterations == 2


def test_invert_model_writes_outputs_atomically_and_refuses_bad_models(tiny_zoo, tmp_path):
    out = {k: tmp_path / "inv" / v for k, v in inversion.OUTPUT_FILES.items()}
    inv = {"batch_size": 4, "sampler": "ddpm", "bbti": {"max_iters": 2}}
    det = {"encoder": "pixels", "kappa": 0.9, "kappa_class": 0.75, "kappa_d": 0.5,
           "target_kind": "image"}
    rec = inversion.invert_model(tiny_zoo["clean"], out, inv, det, model_id="tiny-clean",
                                 progress=False)
    assert json.loads(out["record"].read_text())["mscr"] == rec["mscr"]
    assert load_file(str(out["trigger"]))["trigger"].shape == (3, 8, 8)
    assert rec["sampler"]["name"] == "ddpm" and rec["sampler"]["clip_sample"] is False
    assert rec["sampler"]["scheduler"] == "DDPMScheduler" and rec["method"] == "bbti"
    assert rec["encoder"] == "pixels" and rec["params"]["encoder"]["kind"] == "pixels"
    assert rec["seed_index"] == 0 and set(rec["seeds"]) == {"method", "verdict_noise"}
    assert set(rec["detection"]["readings"]) == {"clique", "pairs", "unbanded"}
    # the detect step recomputes the verdict from the saved samples
    v = detection.detect_from_inversion(out["record"], out["samples"], tmp_path / "v.json", det)
    assert v["mscr"] == rec["mscr"] and v["verdict"] == rec["verdict"]
    bad = {k: tmp_path / "bad" / v for k, v in inversion.OUTPUT_FILES.items()}
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        inversion.invert_model(tmp_path / "missing", bad, inv, det, model_id="x")
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        inversion.invert_model(tiny_zoo["clean"], bad, {**inv, "sampler": "nope"}, det,
                               model_id="x")
    with pytest.raises(ValueError, match="unknown setting.*max_iter"):
        inversion.invert_model(tiny_zoo["clean"], bad, {**inv, "bbti": {"max_iter": 2}}, det,
                               model_id="x")
    with pytest.raises(ValueError, match="unknown inversion method 'nope'"):
        inversion.invert_model(tiny_zoo["clean"], bad, inv, det, model_id="x", method="nope")
    assert not (tmp_path / "bad").exists()


def test_blank_samples_do_not_make_a_cluster():
    """A clean model driven to blank images must not be flagged: out-of-band samples (entropy
    below κ-) do not form MSCR clusters; the plain MSCR is still recorded."""
    from diffcleanse import data
    from diffcleanse.detection import DetectionSpec, mscr, verdict

    digits, _ = data.load_digits(8)
    blank = -torch.ones(8, 3, 8, 8)
    images = torch.cat([blank, digits[:8]])
    z = torch.cat([torch.ones(8, 4), torch.eye(8, 4) * 3 + torch.randn(8, 4) * 0.01])
    z[8:12] = torch.eye(4)  # four distinct digits
    z[12:] = -torch.eye(4)
    v = verdict(z, DetectionSpec(), images)
    assert v["mscr_unfiltered"] == 0.5 and v["out_of_band"] == 8
    assert v["mscr"] == 1 / 16 and not v["backdoored"]
    assert verdict(z, DetectionSpec(entropy_band=False), images)["backdoored"]
    valid = torch.tensor([False] * 8 + [True] * 8)
    assert mscr(torch.ones(16, 4), 0.9, valid) == 0.5
    assert mscr(torch.ones(4, 4), 0.9, torch.zeros(4, dtype=torch.bool)) == 0.0


def test_saturated_samples_do_not_make_a_cluster():
    """Samples the model draws far outside the data range (a strong offset saturates it) are
    natural targets: they do not form MSCR clusters, though their entropy is in the band."""
    from diffcleanse.detection import DetectionSpec, out_of_range_fraction, verdict

    g = torch.Generator().manual_seed(0)
    white = 5 + torch.rand(8, 3, 8, 8, generator=g)  # unclipped, far above 1
    white[:, :, :2, :2] = torch.rand(8, 3, 2, 2, generator=g) * 2 - 1  # speckles: in-band entropy
    digits = torch.rand(8, 3, 8, 8, generator=g) * 2 - 1
    images = torch.cat([white, digits])
    assert out_of_range_fraction(images[:8]).min() > 0.9
    assert out_of_range_fraction(images[8:]).max() == 0
    z = torch.cat([torch.ones(8, 16), torch.eye(8, 16)])
    v = verdict(z, DetectionSpec(), images)
    assert v["mscr_unfiltered"] == 0.5 and v["out_of_band"] == 8 and not v["backdoored"]
    assert verdict(z, DetectionSpec(range_band=False), images)["backdoored"]


def test_range_loss_pulls_samples_back_into_the_data_range():
    x = torch.tensor([[[[0.5, 1.5], [-3.0, 0.0]]]], requires_grad=True)
    loss = detection.range_loss(x, margin=0.0)
    loss.backward()
    assert float(loss) == pytest.approx((0.5 + 2.0) / 4)
    assert x.grad.flatten().tolist() == pytest.approx([0.0, 0.25, -0.25, 0.0])
    # balanced: λ_r·ℓ_r equals ℓ_s in size; a fixed weight is used as given
    z = torch.randn(2, 4)
    _, parts = detection.bbti_loss(x.detach(), z, use_entropy=False, raw=x.detach(),
                                   range_margin=0.0)
    assert parts["lambda_range"] * parts["loss_range"] == pytest.approx(parts["loss_similarity"])
    _, parts = detection.bbti_loss(x.detach(), z, use_entropy=False, raw=x.detach(),
                                   range_margin=0.0, range_weight=3.0)
    assert parts["lambda_range"] == 3.0


# ---------------------------------------------------------------- the zeroth-order search
def test_zeroth_order_estimate_points_down_a_linear_loss():
    """For ℓ(r) = w·r the antithetic estimate is mean_k (w·d_k) d_k, whose expectation is w; at a
    coarse grid the directions are constant over each cell."""
    from diffcleanse.inversion import bbti

    spec = bbti.BBTISpec(gradient="zeroth_order", zo_directions=400, zo_resolutions=(4,))
    g = torch.Generator().manual_seed(0)
    d = bbti.coarse_directions(spec, (3, 4, 4), 0, g)
    w = torch.randn(1, 3, 4, 4, generator=g)
    sigma = spec.zo_sigma
    losses = torch.cat([((w * (sigma * d)).flatten(1)).sum(1), (-(w * sigma * d)).flatten(1)
                        .sum(1)])
    est = bbti.zo_gradient(losses, d, sigma)
    assert float(torch.nn.functional.cosine_similarity(est.flatten(), w.flatten(), dim=0)) > 0.9
    coarse = bbti.BBTISpec(gradient="zeroth_order", zo_directions=3, zo_resolutions=(2, 4),
                           zo_stage_iters=2)
    assert [coarse.zo_resolution(i) for i in range(5)] == [2, 2, 4, 4, 4]
    d2 = bbti.coarse_directions(coarse, (3, 8, 8), 0, g)
    assert d2.shape == (3, 3, 8, 8)
    assert torch.equal(d2[:, :, :4, :4], d2[:, :, :1, :1].expand(-1, -1, 4, 4))
    assert not torch.equal(d2[:, :, :4, :4], d2[:, :, 4:, 4:])


def test_zeroth_order_settings_are_checked():
    for bad, match in (({"zo_directions": 0}, "zo_directions"), ({"zo_sigma": 0}, "zo_sigma"),
                       ({"zo_resolutions": []}, "zo_resolutions")):
        with pytest.raises(ValueError, match=match):
            inversion.BBTISpec(gradient="zeroth_order", **bad)


def test_zeroth_order_costs_2k_plus_1_passes_and_no_backward(tiny_zoo):
    res = _invert(tiny_zoo["clean"], 0.5, max_iters=2, batch_size=4, gradient="zeroth_order",
                  zo_directions=2, early_stop=False)
    assert res.unet_rows == 2 * 50 * 4 * 5 and res.iterations == 2
    assert [row["zo_resolution"] for row in res.history] == [2, 2]


def test_exploration_settings_are_checked():
    for bad, match in (({"explore": -1}, "explore"), ({"explore_scale": 0}, "explore_scale"),
                       ({"explore_resolutions": [0]}, "explore_resolutions"),
                       ({"explore_colours": ["blue"]}, "explore_colours")):
        with pytest.raises(ValueError, match=match):
            inversion.BBTISpec(**bad)


def test_exploration_pool_starts_with_the_init_and_is_constant_per_cell():
    from diffcleanse.inversion import bbti

    spec = inversion.BBTISpec(explore=5, explore_scale=0.5, explore_resolutions=(1, 2),
                              trigger_bound=2.0)
    r0 = torch.randn(1, 3, 8, 8)
    pool, grids = bbti.explore_candidates(spec, r0, torch.Generator().manual_seed(0))
    assert pool.shape == (5, 3, 8, 8) and grids == [0, 1, 2, 1, 2]
    assert torch.equal(pool[0], r0[0].clamp(-2, 2))
    assert torch.equal(pool[1], pool[1, :1, :1, :1].expand(3, 8, 8))  # grey: one value
    assert torch.equal(pool[2, :, :4, :4], pool[2, :, :1, :1].expand(-1, 4, 4))  # rgb, 2 x 2
    assert not torch.equal(pool[2, 0], pool[2, 1])
    assert torch.equal(pool[3, 0], pool[3, 2])  # grey again, one cell
    assert pool[1:].abs().max() <= 0.5
    again, _ = bbti.explore_candidates(spec, r0, torch.Generator().manual_seed(0))
    assert torch.equal(pool, again)


def test_patch_candidates_are_one_cell_at_each_value_and_sign():
    from diffcleanse.inversion import bbti

    spec = inversion.BBTISpec(explore=1, explore_patches=(1, 2), explore_patch_values=(0.25, 1.0))
    pool, grids = bbti.patch_candidates(spec, (3, 8, 8))
    assert pool.shape == (spec.patch_count((3, 8, 8)), 3, 8, 8) == (20, 3, 8, 8)
    assert spec.patch_count() == 20 and grids == [1] * 4 + [2] * 16
    # the grid-1 patch is the whole image: +0.25, -0.25, +1, -1
    assert [float(p.mean()) for p in pool[:4]] == [0.25, -0.25, 1.0, -1.0]
    for k, p in enumerate(pool[4:]):
        cell, rest = divmod(k, 4)
        v = (0.25, -0.25, 1.0, -1.0)[rest]
        i, j = divmod(cell, 2)
        block = p[:, 4 * i:4 * i + 4, 4 * j:4 * j + 4]
        assert torch.equal(block, torch.full_like(block, v))  # every channel, the whole cell
        assert float(p.abs().sum()) == pytest.approx(abs(v) * 3 * 16)  # zero elsewhere
    # a grid finer than the image is capped at one cell per pixel
    assert inversion.BBTISpec(explore=1, explore_patches=(8,)).patch_count((3, 4, 4)) == 16 * 4
    # no exploration, no patches
    assert inversion.BBTISpec(explore=0, explore_patches=(2,)).patch_count() == 0


def test_patches_come_after_the_random_pool_and_leave_it_unchanged():
    from diffcleanse.inversion import bbti

    r0 = torch.randn(1, 3, 8, 8)
    plain = inversion.BBTISpec(explore=6)
    with_patches = inversion.BBTISpec(explore=6, explore_patches=(2,))
    a, ga = bbti.explore_candidates(plain, r0, torch.Generator().manual_seed(3))
    b, gb = bbti.explore_candidates(with_patches, r0, torch.Generator().manual_seed(3))
    assert len(b) == 6 + with_patches.patch_count() == 6 + 16
    assert torch.equal(a, b[:6]) and ga == gb[:6] and gb[6:] == [2] * 16
    assert torch.equal(b[6:], bbti.patch_candidates(with_patches, (3, 8, 8))[0])
    assert inversion.BBTI().budget(with_patches) == with_patches.max_iters + 22


def test_patch_settings_are_checked():
    for bad, match in (({"explore_patches": [0]}, "explore_patches"),
                       ({"explore_patches": [2], "explore_patch_values": []},
                        "explore_patch_values"),
                       ({"explore_patches": [2], "explore_patch_values": [-0.5]},
                        "explore_patch_values")):
        with pytest.raises(ValueError, match=match):
            inversion.BBTISpec(**bad)


def test_exploration_samples_its_pool_then_starts_from_the_best(tiny_zoo):
    res = _invert(tiny_zoo["clean"], 0.9, max_iters=2, batch_size=4, explore=3,
                  early_stop=False)
    rows = res.history
    assert [r.get("phase") for r in rows] == ["explore"] * 3 + [None] * 2
    assert res.unet_rows == (3 + 2) * 50 * 4 and res.iterations == 2
    assert res.details["explore_candidates"] == 3
    best = min(rows[:3], key=lambda r: (-r["mscr"], r["loss"]))
    assert rows[3]["trigger_norm"] == pytest.approx(best["trigger_norm"], rel=1e-5)


def test_patch_candidates_are_sampled_after_the_random_ones_and_marked(tiny_zoo):
    res = _invert(tiny_zoo["clean"], 0.9, max_iters=1, batch_size=4, explore=2,
                  explore_patches=(1,), explore_patch_values=(0.5,), early_stop=False)
    explore = [r for r in res.history if r.get("phase") == "explore"]
    assert [r["candidate"] for r in explore] == [0, 1, 2, 3]
    assert [bool(r.get("patch")) for r in explore] == [False, False, True, True]
    assert res.details["explore_candidates"] == 4 and res.unet_rows == (4 + 1) * 50 * 4
    # the whole-image patches of ±0.5 over 3 x 8 x 8 values
    assert [r["trigger_norm"] for r in explore[2:]] == pytest.approx([0.5 * 192 ** 0.5] * 2)


def test_a_candidate_that_reaches_kappa_d_flags_before_any_step(tiny_zoo):
    # κ_d below 1/B: any in-band candidate is a cluster of at least one sample out of B
    res = _invert(tiny_zoo["clean"], 0.01, max_iters=4, batch_size=4, explore=3, init_scale=0.1)
    assert res.stopped_early and res.iterations == 0 and res.verdict["backdoored"]
    assert len(res.history) == 1 and res.history[0]["candidate"] == 0
    # the pool is sampled in one batch (up to 8 candidates); the verdict reuses the flagged samples
    assert res.unet_rows == 3 * 50 * 4


def test_batched_restarts_with_exploration_give_the_results_of_one_by_one(tiny_zoo):
    kw = {"max_iters": 6, "restarts": 2, "gradient": "zeroth_order", "batch_size": 8,
          "seed": 5, "zo_directions": 2, "explore": 3}
    a = _invert(tiny_zoo["backdoored"], 0.3, batched=True, **kw)
    b = _invert(tiny_zoo["backdoored"], 0.3, batched=False, **kw)
    assert a.stopped_early == b.stopped_early and a.verdict["mscr"] == b.verdict["mscr"]
    key = [(r["start"], r["iteration"], r.get("candidate"), r["mscr"]) for r in a.history]
    assert key == [(r["start"], r["iteration"], r.get("candidate"), r["mscr"])
                   for r in b.history]
    assert torch.allclose(a.trigger, b.trigger, atol=1e-5)
