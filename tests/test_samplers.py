"""The sampler registry: every entry runs through the one loop ``denoise`` on its model type, starts
at the top of the schedule, never clips, and keeps a sample independent of its batch."""

from __future__ import annotations

import pytest
import torch

from diffcleanse import attacks, models, samplers

VP = [n for n in samplers.manifest_names() if samplers.get(n).family != "ve"]


@pytest.fixture(scope="module")
def vp_model():
    torch.manual_seed(0)
    unet = models.build_unet(8, (8, 16), attention=True, norm_num_groups=4, attention_head_dim=4)
    return unet.eval(), dict(models.build_scheduler(20).config)


@pytest.fixture(scope="module")
def ve_model():
    torch.manual_seed(0)
    unet = models.build_ncsn_unet(8, block_out_channels=(8, 16), norm_num_groups=4,
                                  attention_head_dim=4)
    return unet.eval(), dict(models.build_ncsn_scheduler(15, sigma_max=5.0).config)


@pytest.mark.parametrize("name", VP)
def test_vp_samplers_run_full_and_short_chains(name, vp_model):
    unet, cfg = vp_model
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    for steps in (None, 7):
        spec = samplers.SamplerSpec(name, steps=steps)
        sched = samplers.make_scheduler(cfg, spec)
        out = samplers.denoise(unet, cfg, x, spec, seeds=[0, 1])
        assert out.shape == x.shape and torch.isfinite(out).all(), (name, steps)
        assert sched.config.clip_sample is False or not hasattr(sched.config, "clip_sample")


def test_multistep_solvers_use_the_whole_schedule(vp_model):
    """The DDPM config's "leading" spacing would start DPM-Solver/DEIS/UniPC far below the top
    (T = 100, 50 steps: t = 50) or put every full-chain step at t = 0; the registry spaces them
    "trailing"."""
    cfg = dict(models.build_scheduler(100).config)
    for name in ("deis", "unipc", "dpmo1", "dpmo3", "dpmpp_o2"):
        for steps, first, last in ((None, 99, 0), (50, 99, 1), (20, 99, 4)):
            ts = samplers.make_scheduler(cfg, samplers.SamplerSpec(name, steps=steps)).timesteps
            assert (int(ts[0]), int(ts[-1]), len(set(ts.tolist()))) == (first, last, steps or 100)


def test_ve_sampler_runs_and_keeps_samples_independent_of_the_batch(ve_model):
    unet, cfg = ve_model
    spec = samplers.SamplerSpec("score_sde_ve")
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    both = samplers.denoise(unet, cfg, x, spec, seeds=[5, 6, 7])
    alone = samplers.denoise(unet, cfg, x[1:2], spec, seeds=[6])
    assert torch.isfinite(both).all()
    assert torch.allclose(both[1:2], alone, atol=1e-5)  # diffusers' corrector is per batch
    calls = []
    samplers.denoise(unet, cfg, x[:1], spec, seeds=[5],
                     on_step=lambda i, t, xi, out: calls.append(float(t)))
    sched = samplers.make_scheduler(cfg, spec)
    assert len(calls) == 2 * len(sched.timesteps)  # one correction and one prediction a step
    assert abs(calls[0] - float(sched.sigmas[0])) < 1e-4  # conditioned on sigma, from sigma_max
    with pytest.raises(ValueError, match="one seed per sample"):
        samplers.denoise(unet, cfg, x, spec)


def test_samplers_refuse_the_other_schedule(vp_model, ve_model):
    with pytest.raises(ValueError, match="cannot drive a VE noise schedule.*score_sde_ve"):
        samplers.make_scheduler(ve_model[1], samplers.SamplerSpec("ddim"))
    with pytest.raises(ValueError, match="cannot drive a VP noise schedule"):
        samplers.make_scheduler(vp_model[1], samplers.SamplerSpec("score_sde_ve"))


def test_attack_samplers_are_not_manifest_values_and_need_their_chain(vp_model):
    names = samplers.manifest_names()
    assert "trojdiff_ddpm" in samplers.SAMPLERS and "trojdiff_ddpm" not in names
    assert {"ddpm", "ddim", "pndm", "deis", "unipc", "heun", "score_sde_ve"} <= set(names)
    assert {f"dpmo{k}" for k in (1, 2, 3)} | {f"dpmpp_o{k}" for k in (1, 2, 3)} <= set(names)
    unet, cfg = vp_model
    with pytest.raises(ValueError, match="needs the trojan chain"):
        samplers.denoise(unet, cfg, torch.randn(1, 3, 8, 8), samplers.SamplerSpec("trojdiff_ddim"))


def test_every_record_states_sampler_steps_and_settings():
    d = samplers.SamplerSpec("dpmpp_o2", steps=20).describe()
    assert d["name"] == "dpmpp_o2" and d["steps"] == 20 and d["clip_sample"] is False
    assert d["settings"]["algorithm_type"] == "dpmsolver++" and d["scheduler"]
    from diffcleanse.attacks import trojdiff

    mu, mask = trojdiff.trigger_parts("patch", 8, 0.1)
    spec = attacks.BackdoorSpec(mu, torch.zeros(3, 8, 8), 0.5, "trojdiff", {"gamma": 0.1},
                                mask=mask)
    d = attacks.get("trojdiff").backdoor_sampler(samplers.SamplerSpec("ddpm"), spec).describe()
    assert d["name"] == "trojdiff_ddpm" and d["attack"] == "trojdiff"
    assert d["chain"]["gamma"] == 0.1 and d["chain"]["patch_pixels"] == int(mask.sum())
