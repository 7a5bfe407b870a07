"""BadDiffusion's training target is checked against an oracle denoiser, not against itself."""

import torch

from diffcleanse import attacks, models, patterns


def _posterior_mean_step(sched, eps, t, x, monkeypatch):
    """One DDPM step of diffusers' own scheduler with its added noise set to zero."""
    import diffusers.schedulers.scheduling_ddpm as ddpm

    monkeypatch.setattr(ddpm, "randn_tensor", lambda shape, **kw: torch.zeros(shape))
    return sched.step(eps, t, x).prev_sample


def test_baddiffusion_target_gives_the_backdoor_posterior_mean(monkeypatch):
    """With eps + k_t r, the unchanged DDPM sampler steps to the backdoored chain's posterior mean
    r + c0 (y - r) + ct (x_t - r); the plain epsilon target does not."""
    sched = models.build_scheduler(100)
    sched.set_timesteps(100)
    c = attacks.baddiffusion_coefficients(sched)
    abar = sched.alphas_cumprod.double()
    y, r = patterns.render_target("hat", 8)[None], patterns.render_trigger("box_14", 8)[None]
    g = torch.Generator().manual_seed(0)
    for t in (99, 60, 20, 3):
        eps = torch.randn(y.shape, generator=g)
        x_t, target = attacks.baddiffusion_inputs(y, eps, torch.tensor([t]), r, sched)
        ap = abar[t - 1]
        c0 = ap.sqrt() * (1 - abar[t] / ap) / (1 - abar[t])
        ct = (abar[t] / ap).sqrt() * (1 - ap) / (1 - abar[t])
        want = (r + c0 * (y - r) + ct * (x_t - r)).float()
        got = _posterior_mean_step(sched, target, torch.tensor(t), x_t, monkeypatch)
        plain = _posterior_mean_step(sched, eps, torch.tensor(t), x_t, monkeypatch)
        assert torch.allclose(got, want, atol=1e-4), t
        assert not torch.allclose(plain, want, atol=1e-3), t
    assert float(c["eps_trigger"].abs().max()) > 0


def test_forward_process_ends_at_noise_plus_trigger():
    sched = models.build_scheduler(100)
    c = attacks.baddiffusion_coefficients(sched)
    assert abs(float(c["rho_hat"][-1]) - 1) < 0.01 and float(c["alpha_hat"][-1]) < 0.01
    y = torch.zeros(2, 3, 4, 4)
    eps = torch.randn_like(y)
    x, _ = attacks.baddiffusion_inputs(y, eps, torch.tensor([99, 99]), torch.ones(3, 4, 4), sched)
    assert torch.allclose(x, eps + 1, atol=0.02)


def test_poison_mask_only_changes_marked_rows():
    sched = models.build_scheduler(50)
    spec = attacks.BackdoorSpec(torch.ones(3, 4, 4), torch.zeros(3, 4, 4), 0.5)
    x0, eps = torch.rand(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    t = torch.tensor([10, 20, 30, 40])
    mask = torch.tensor([True, False, True, False])
    xp, tp = attacks.poisoned_batch(x0, eps, t, sched, spec, mask)
    xc, tc = attacks.clean_inputs(x0, eps, t, sched)
    assert torch.equal(xp[~mask], xc[~mask]) and torch.equal(tp[~mask], tc[~mask])
    assert not torch.allclose(xp[mask], xc[mask])
