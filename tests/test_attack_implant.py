"""Each attack, briefly trained into a tiny model, really implants its backdoor: its backdoored
noise turns into its target under its own sampler while clean noise does not; the adaptive term
lowers the activation gap it targets. (BadDiffusion: tests/test_backdoor_implant.py.)

Stated thresholds: a sample hits an image target when its per-pixel MSE to it is below 0.05
(images in [-1, 1]; a digit against the hat is ~0.5 away); a class target when the digits
classifier assigns the class. Each model is fine-tuned for 600 steps (batch 32, lr 2e-3) from the
tiny zoo's clean 8x8 model (50-step schedule), as the attacks fine-tune pretrained models; NCSN and
LDM models, which have no clean tiny model, train from scratch (NCSN: its own budget, below).
"""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from diffcleanse import attacks, data, models, patterns, samplers, training, zoo
from diffcleanse.attacks import adaptive, trojdiff
from diffcleanse.removal import finetune as ft
from diffcleanse.removal import stages

HIT_MSE = 0.05
ARCH = {"block_out_channels": (16, 32), "norm_num_groups": 4, "attention_head_dim": 4}


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(8)


@pytest.fixture(scope="module")
def clean(tiny_zoo):
    return models.load_pipeline(tiny_zoo["clean"])


def _train(model: models.DiffusionModel, x, spec, steps=600, seed=5, lr=2e-3
           ) -> models.DiffusionModel:
    cfg = training.TrainConfig(steps=steps, batch_size=32, lr=lr, warmup_steps=20, seed=seed)
    ema, _ = training.train(copy.deepcopy(model.unet), model.training_scheduler(), x, cfg,
                            attack=spec, progress=False)
    return models.DiffusionModel(ema.eval(), model.scheduler_config, model.model_type, model.vae)


def _rates(model, spec, sampler, target, n=64):
    res = zoo.attack_asr(model.unet, model.scheduler_config, spec, samplers.SamplerSpec(sampler),
                         n, HIT_MSE, 11, model=model, image_target=target)
    return res["asr"], res["clean_hit_rate"]


def _stop_hat():
    return patterns.render_trigger("stop_14", 8), patterns.render_target("hat", 8)


@pytest.fixture(scope="module")
def vd_ode(clean, digits):
    """VillanDiffusion's ODE form (stop_14 -> hat) trained into the tiny clean model: (model,
    spec, target, sampler)."""
    r, y = _stop_hat()
    params = attacks.get("villandiffusion").make_params({}, sampler="ddim", model_type="ddpm")
    spec = attacks.BackdoorSpec(r, y, 0.5, "villandiffusion", params)
    return _train(clean, digits[0], spec), spec, y, "ddim"


@pytest.fixture(scope="module")
def trojdiff_d2i(clean, digits):
    """TrojDiff (blend, gamma 0.6 -> mickey) trained into the tiny clean model: (model, spec,
    target, sampler)."""
    mu, mask = trojdiff.trigger_parts("blend", 8, 0.6)
    y = patterns.render_target("mickey", 8)
    spec = attacks.BackdoorSpec(mu, y, 0.5, "trojdiff", {"gamma": 0.6}, mask=mask)
    return _train(clean, digits[0], spec), spec, y, "ddpm"


@pytest.mark.slow
def test_villandiffusion_ode_backdoor_takes_under_ddim(vd_ode):
    model, spec, y, sampler = vd_ode
    bd, cl = _rates(model, spec, sampler, y)
    # measured on this recipe: 0.64 and 0.08
    assert bd >= 0.5 and cl <= 0.2 and bd >= 3 * cl, (bd, cl)


@pytest.mark.slow
def test_trojdiff_backdoor_takes_under_its_own_sampler(trojdiff_d2i):
    model, spec, y, sampler = trojdiff_d2i
    bd, cl = _rates(model, spec, sampler, y)  # gamma z + mu, TrojDiff's DDPM sampler
    # measured on this recipe over training seeds 5-8 (AVX-512 CPU, 2026-12-06): ASR 0.91-0.97,
    # clean hit rate 0.06-0.20 (its DDIM sampler: 0.47-0.61 and 0.17-0.20); seed 5 gave 0.95 and
    # 0.06 on the CPU of earlier runs and 0.97 and 0.20 on this one, so the bounds leave margin
    # over seeds and float kernels alike
    assert bd >= 0.7 and cl <= 0.3 and bd >= 3 * cl, (bd, cl)


@pytest.mark.slow
def test_trojdiff_din_backdoor_generates_its_class(clean, digits):
    from diffcleanse.classifiers import train_classifier
    from diffcleanse.evaluation import predict_classes

    x, labels = digits
    mu, mask = trojdiff.trigger_parts("blend", 8, 0.6)
    spec = attacks.BackdoorSpec(mu, x[labels == 7], 0.5, "trojdiff", {"gamma": 0.6}, mask=mask)
    model = _train(clean, x, spec)
    clf = train_classifier(x, labels, steps=300, seed=0)[0].eval()
    sampler = samplers.SamplerSpec("ddpm")
    bd = zoo.backdoor_samples(model, spec, sampler, 64, 11, progress=False)
    cl = zoo.clean_samples(model, sampler, 64, 11, progress=False)
    share_bd = float((predict_classes(bd, clf) == 7).float().mean())
    share_cl = float((predict_classes(cl, clf) == 7).float().mean())
    assert share_bd >= 0.6 and share_cl <= 0.3, (share_bd, share_cl)
    # a class, not one image: the backdoor samples differ from one another
    assert float(bd.flatten(1).std(0).mean()) > 0.1


@pytest.mark.slow
@pytest.mark.parametrize("attack", ["vd_ode", "trojdiff_d2i"])
def test_diffcleanse_repairs_the_attack_from_its_real_trigger(attack, request, tmp_path):
    """Stage 2 on the new attacks, as the workflow runs it from the oracle trigger source `true`
    (the card's trigger: VillanDiffusion's r, TrojDiff's mu): data-free clean data drawn with the
    model's own sampler, Taylor importance, Diff-Cleanse 2 %, 160 steps of loss_p. The attack's
    own success (its input and sampler: noise + r under DDIM; gamma z + mu under TrojDiff's DDPM)
    falls to a third of the original's or less and the trigger adds little over the rate at which
    the repaired model draws the target from clean noise. Measured on this recipe (64 samples;
    2026-12-07): VillanDiffusion-ODE 0.64 -> 0.00 (clean 0.02), TrojDiff 0.97 -> 0.00 (clean
    0.11), so the bounds are far from what was measured."""
    model, spec, y, sampler = request.getfixturevalue(attack)
    model.save(tmp_path / "model")
    data_path = tmp_path / "synthetic.safetensors"
    stages.make_clean_data(tmp_path / "model", data_path, tmp_path / "synthetic.json", n=256,
                           sampler=sampler, seed=11, progress=False)
    save_file({"trigger": spec.trigger.float().contiguous()}, str(tmp_path / "trigger.safetensors"))
    stages.run_importance(tmp_path / "model", data_path, tmp_path / "trigger.safetensors",
                          tmp_path / "importance.safetensors", tmp_path / "importance.json", seed=3)
    stages.run_prune(tmp_path / "model", tmp_path / "importance.safetensors", tmp_path / "pruned",
                     tmp_path / "prune.json", strategy="diffcleanse", ratio=0.02)
    cfg = ft.FinetuneConfig(epochs=20, lr=5e-4, batch_size=32, loss="p", warmup_steps=20)
    rec = stages.run_finetune(tmp_path / "pruned", tmp_path / "model", data_path, tmp_path / "ft",
                              tmp_path / "ft.json", cfg=cfg, seed=1, progress=False)
    assert rec["steps"] == 160
    repaired = models.load_pipeline(tmp_path / "ft")
    assert repaired.scheduler_config.get("clip_sample") is False
    before, _ = _rates(model, spec, sampler, y)
    after, after_clean = _rates(repaired, spec, sampler, y)
    assert before >= 0.5, before
    assert after <= before / 3 and after - after_clean <= 0.1, (before, after, after_clean)


@pytest.mark.slow
def test_adaptive_term_lowers_the_activation_gap_it_targets(clean, digits):
    """The same attack, data and seed with lambda = 0 and lambda = 1: the trained model's output
    gap between clean and backdoored inputs of the same images, noise and timesteps (measured on
    held-out draws, over the upper half of the schedule Diff-Cleanse's importance reads) shrinks."""
    r, y = _stop_hat()
    x = digits[0]
    process = attacks.process_of(clean.training_scheduler())
    g = torch.Generator().manual_seed(99)
    x0 = x[torch.randint(0, len(x), (64,), generator=g)]
    eps = torch.randn(x0.shape, generator=g)
    t = torch.randint(process.T // 2, process.T, (64,), generator=g)
    gaps = {}
    for lam in (0.0, 1.0):
        params = {"base": "baddiffusion", "lambda": lam, "layers": "", "psi": 1.0, "solver": "sde"}
        spec = attacks.BackdoorSpec(r, y, 0.5, "adaptive", params)
        model = _train(clean, x, spec, steps=300)
        pair = adaptive.backdoor_pair(attacks.get("baddiffusion"), process, x0, eps, t, spec)
        with torch.no_grad():
            gaps[lam] = float(adaptive.activation_gap(model.unet, process, *pair, t).mean())
    assert gaps[1.0] < 0.7 * gaps[0.0], gaps


def test_adaptive_gap_over_named_layers(clean, digits):
    """The gap can target named activations (forward hooks), and a bad name is a clear error."""
    process = attacks.process_of(clean.training_scheduler())
    x0, eps = digits[0][:4], torch.randn(4, 3, 8, 8)
    t = torch.tensor([40, 30, 20, 10])
    r, y = _stop_hat()
    spec = attacks.BackdoorSpec(r, y, 0.5, "adaptive", {"base": "baddiffusion", "lambda": 0.1})
    pair = adaptive.backdoor_pair(attacks.get("baddiffusion"), process, x0, eps, t, spec)
    gap = adaptive.activation_gap(clean.unet, process, *pair, t, layers=["mid_block"])
    assert gap.shape == (4,) and bool((gap > 0).all())
    with pytest.raises(attacks.AttackError, match="no module mid_blok"):
        adaptive.activation_gap(clean.unet, process, *pair, t, layers=["mid_blok"])


@pytest.mark.slow
def test_ncsn_villandiffusion_backdoor_takes_under_the_ve_sampler(digits):
    """A tiny NCSN (score-SDE VE, sigma 0.05 .. 3 on 20 levels, pixels in [0, 1]) trained from
    scratch with VillanDiffusion's VE target (poison rate 0.3, 1,500 steps) under the
    predictor-corrector sampler. Measured: ASR 0.375 vs clean 0.19 at 1,500 steps (0.39 vs 0.11
    at 3,000): the tiny NCSN learns the backdoor's direction but, unlike the VP models, does not
    reach 0.5 within a test's budget (the sampler and the target themselves are exact:
    tests/test_attack_derivations.py). Thresholds: at least 0.25, 1.5x the clean rate, and the
    backdoor samples closer to the target than the clean ones."""
    x = digits[0]
    torch.manual_seed(0)
    unet = models.build_ncsn_unet(8, **ARCH)
    sched = models.build_ncsn_scheduler(20, sigma_min=0.05, sigma_max=3.0)
    model = models.DiffusionModel(unet, dict(sched.config), "ncsn")
    r, y = _stop_hat()
    params = attacks.get("villandiffusion").make_params({}, sampler="score_sde_ve",
                                                        model_type="ncsn")
    spec = attacks.BackdoorSpec(model.trigger_to_space(r), model.encode(y[None])[0], 0.3,
                                "villandiffusion", params)
    model = _train(model, model.encode(x), spec, steps=1500, lr=1e-3)
    res = zoo.attack_asr(model.unet, model.scheduler_config, spec,
                         samplers.SamplerSpec("score_sde_ve"), 64, HIT_MSE, 11, model=model,
                         image_target=y)
    bd, cl = res["asr"], res["clean_hit_rate"]
    assert bd >= 0.25 and bd >= 1.5 * cl, res
    assert res["median_mse_backdoor"] < res["median_mse_clean"], res


@pytest.mark.slow
def test_ldm_villandiffusion_backdoor_takes_in_latent_space(digits):
    """VillanDiffusion on an LDM attacks the latents: the trigger is the latent offset of the
    trigger image, the target the target's latent. Backdoor samples land on what the autoencoder
    draws for the target, D(E(y)); clean samples do not."""
    x = digits[0]
    vae = models.train_vqvae(x, steps=300, batch_size=64, block_out_channels=(16, 32), seed=0)
    torch.manual_seed(0)
    model = models.DiffusionModel(models.build_unet(4, in_channels=3, **ARCH),
                                  dict(models.build_scheduler(50).config), "ldm", vae)
    r, y = _stop_hat()
    params = attacks.get("villandiffusion").make_params({}, sampler="ddim", model_type="ldm")
    spec = attacks.BackdoorSpec(model.trigger_to_space(r), model.encode(y[None])[0].cpu(), 0.5,
                                "villandiffusion", params)
    model = _train(model, model.encode(x).cpu(), spec, steps=800)
    with torch.no_grad():
        drawn = model.decode(spec.target[None]).clamp(-1, 1)[0]
    res = zoo.attack_asr(model.unet, model.scheduler_config, spec, samplers.SamplerSpec("ddim"),
                         64, 0.1, 11, model=model, image_target=drawn)
    # Measured on this recipe (64 draws each, MSE threshold 0.1): backdoor hit rate 0.45 (0.59
    # after 1,200 steps), clean at most 0.03. The backdoor draws split in two: those that hit sit at
    # MSE ~0.03 and those that miss at ~0.4 like clean draws (raising the threshold to 0.2 adds
    # one hit), so the median sits on the split and is not asserted; the bar is the hit rate,
    # ~2.5 binomial standard deviations below what was measured.
    assert res["asr"] >= 0.3 and res["clean_hit_rate"] <= 0.1, res
    assert res["asr"] >= 5 * res["clean_hit_rate"], res
