"""A briefly trained BadDiffusion model really carries its backdoor (the zoo is not fake)."""

import pytest
import torch

from diffcleanse import models, patterns, sampling

# Stated thresholds: a sample "hits" the target when its per-pixel MSE to it is below 0.05 (images
# in [-1, 1]; a digit against the hat has MSE ~0.5). The tiny model trains for 2,000 steps only.
HIT_MSE = 0.05


def _hits(samples: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((samples - target) ** 2).mean(dim=(1, 2, 3)) < HIT_MSE


@pytest.fixture
def backdoored(tiny_zoo):
    """(unet, scheduler config, trigger, target) of the tiny zoo's BadDiffusion model."""
    r = tiny_zoo["recipe"]
    unet, cfg = models.load_model(tiny_zoo["backdoored"])
    trigger = patterns.render_trigger(r["trigger"], r["image_size"])
    target = patterns.render_target(r["target"], r["image_size"])
    return unet, cfg, trigger, target


@pytest.mark.slow
def test_noise_plus_trigger_lands_on_target_and_clean_noise_does_not(tiny_zoo, backdoored):
    unet, cfg, trigger, target = backdoored
    spec = sampling.SamplerSpec("ddpm")
    bd = sampling.sample(unet, cfg, 64, spec=spec, trigger=trigger, seed=11, progress=False)
    clean = sampling.sample(unet, cfg, 64, spec=spec, seed=11, progress=False)
    bd_rate, clean_rate = (
        float(_hits(bd, target).float().mean()),
        float(_hits(clean, target).float().mean()),
    )
    # measured on this recipe: 0.84 and 0.20 (a 2,000-step model still leaks the target sometimes)
    assert bd_rate >= 0.6 and clean_rate <= 0.3 and bd_rate >= 3 * clean_rate
    # the clean model does not answer the trigger at all
    cu, ccfg = models.load_model(tiny_zoo["clean"])
    ctrl = sampling.sample(cu, ccfg, 64, spec=spec, trigger=trigger, seed=11, progress=False)
    assert float(_hits(ctrl, target).float().mean()) == 0.0


@pytest.mark.slow
def test_clipping_the_predicted_x0_hides_the_backdoor(backdoored):
    """DESIGN.md: diffusers' default clip_sample=True erases the trigger term. We never clip."""
    unet, cfg, trigger, target = backdoored
    kw = {"trigger": trigger, "seed": 11, "progress": False}
    free = sampling.sample(unet, cfg, 64, spec=sampling.SamplerSpec("ddpm"), **kw)
    clipped = sampling.sample(
        unet, cfg, 64, spec=sampling.SamplerSpec("ddpm", clip_sample=True), **kw
    )
    assert float(_hits(clipped, target).float().mean()) < float(_hits(free, target).float().mean())
