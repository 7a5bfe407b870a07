"""Loading and saving models (no pickles), sampling, and training with resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from diffcleanse import attacks, data, models, patterns, sampling, training


def test_save_load_roundtrip_and_both_layouts(tmp_path, tiny_unet):
    sched = models.build_scheduler(50)
    models.save_model(tiny_unet, sched, tmp_path / "m")
    assert (tmp_path / "m/unet/diffusion_pytorch_model.safetensors").is_file()
    unet, cfg = models.load_model(tmp_path / "m")
    assert cfg["num_train_timesteps"] == 50 and cfg["clip_sample"] is False
    for (n, a), (_, b) in zip(
        tiny_unet.state_dict().items(), unet.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), n
    flat = tmp_path / "flat"  # google/ddpm-cifar10-32 keeps unet and scheduler in one folder
    tiny_unet.save_pretrained(flat)
    sched.save_pretrained(flat)
    unet2, _ = models.load_model(flat)
    assert torch.equal(next(unet2.parameters()), next(tiny_unet.parameters()))


def test_pickle_only_checkpoint_is_refused_unless_opted_in(tmp_path, tiny_unet):
    d = tmp_path / "p"
    tiny_unet.save_pretrained(d / "unet", safe_serialization=False)
    models.build_scheduler(50).save_pretrained(d / "scheduler")
    assert not list((d / "unet").glob("*.safetensors"))
    with pytest.raises(models.ModelLoadError, match="allow_pickle"):
        models.load_model(d)
    unet, _ = models.load_model(d, allow_pickle=True)
    assert unet.config.sample_size == 8


def test_bad_models_give_clear_errors(tmp_path, tiny_unet):
    with pytest.raises(models.ModelLoadError, match="does not exist"):
        models.load_model(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(models.ModelLoadError, match="not a diffusers model directory"):
        models.load_model(tmp_path / "empty")
    sched = models.build_scheduler(50)
    models.save_model(tiny_unet, sched, tmp_path / "ok")
    with pytest.raises(models.ModelLoadError, match="takes 3 channels"):
        models.load_model(tmp_path / "ok", expected_channels=1)
    with torch.no_grad():
        next(tiny_unet.parameters()).fill_(float("nan"))
    models.save_model(tiny_unet, sched, tmp_path / "nan")
    with pytest.raises(models.ModelLoadError, match="NaN"):
        models.load_model(tmp_path / "nan")


def test_hub_id_offline_fails_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelLoadError, match="local:<dir>"):
        models.fetch("hub:google/ddpm-cifar10-32@main")


def test_sampling_is_seeded_and_backdoor_input_differs(tiny_unet):
    sched = models.build_scheduler(20)
    spec = sampling.SamplerSpec("ddpm")
    a = sampling.sample(tiny_unet, sched.config, 3, spec=spec, seed=1, progress=False)
    b = sampling.sample(tiny_unet, sched.config, 3, spec=spec, seed=1, progress=False, batch_size=2)
    c = sampling.sample(tiny_unet, sched.config, 3, spec=spec, seed=2, progress=False)
    assert a.shape == (3, 3, 8, 8) and float(a.abs().max()) <= 1
    assert torch.equal(a[:2], b[:2]) and not torch.equal(a, c)
    r = patterns.render_trigger("box_14", 8)
    d = sampling.sample(
        tiny_unet,
        sched.config,
        3,
        spec=sampling.SamplerSpec("ddim", 5),
        trigger=r,
        seed=1,
        progress=False,
    )
    assert not torch.allclose(
        d,
        sampling.sample(
            tiny_unet, sched.config, 3, spec=sampling.SamplerSpec("ddim", 5), seed=1, progress=False
        ),
    )
    with pytest.raises(ValueError, match="trigger has shape"):
        sampling.sample(tiny_unet, sched.config, 1, trigger=torch.zeros(1, 8, 8), progress=False)


def test_training_resumes_exactly_after_a_stop(tmp_path, tiny_unet):
    x, _ = data.load_digits(8)
    sched = models.build_scheduler(20)
    spec = attacks.BackdoorSpec(
        patterns.render_trigger("box_14", 8), patterns.render_target("hat", 8), 0.5
    )
    cfg = training.TrainConfig(steps=12, batch_size=4, checkpoint_every=4, seed=3, warmup_steps=2)
    torch.manual_seed(0)
    start = tiny_unet.__class__.from_config(tiny_unet.config)
    init = {k: v.clone() for k, v in start.state_dict().items()}
    full_model = tiny_unet.__class__.from_config(tiny_unet.config)
    full_model.load_state_dict(init)
    full, h_full = training.train(full_model, sched, x, cfg, attack=spec, progress=False)
    part_model = tiny_unet.__class__.from_config(tiny_unet.config)
    part_model.load_state_dict(init)
    _, h1 = training.train(
        part_model,
        sched,
        x,
        cfg,
        attack=spec,
        progress=False,
        checkpoint_dir=tmp_path / "ck",
        stop_after=6,
    )
    assert (
        h1["stopped_at"] == 6 and json.loads((tmp_path / "ck/state.json").read_text())["step"] == 6
    )
    assert any(k.startswith("opt.") for k in load_file(tmp_path / "ck/state.safetensors"))
    fresh = tiny_unet.__class__.from_config(tiny_unet.config)  # different init: must be overwritten
    resumed, h2 = training.train(
        fresh, sched, x, cfg, attack=spec, progress=False, checkpoint_dir=tmp_path / "ck"
    )
    assert h2["resumed_from"] == 6
    assert h2["losses"] == pytest.approx(h_full["losses"], rel=1e-5)
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    other = training.TrainConfig(steps=12, batch_size=4, checkpoint_every=4, seed=4)
    _, h3 = training.train(
        tiny_unet, sched, x, other, progress=False, checkpoint_dir=tmp_path / "ck", stop_after=1
    )
    assert h3["resumed_from"] == 0  # a checkpoint of other parameters is not resumed


def test_a_resumed_training_reports_the_attacks_statistics_of_every_step(tmp_path, tiny_unet):
    """The adaptive attack logs its activation gap per step; the card's ``final_activation_gap``
    averages them. A resumed run must carry the steps before its checkpoint (a CI run of f5633fd
    found the card of a killed and resumed ``train_adaptive`` job differing in that mean)."""
    x, _ = data.load_digits(8)
    sched = models.build_scheduler(20)
    params = {"base": "baddiffusion", "lambda": 0.5, "layers": "", "psi": 1.0, "solver": "sde"}
    spec = attacks.BackdoorSpec(patterns.render_trigger("box_14", 8),
                                patterns.render_target("hat", 8), 0.5, "adaptive", params)
    cfg = training.TrainConfig(steps=8, batch_size=4, checkpoint_every=4, seed=3, warmup_steps=2)
    init = {k: v.clone() for k, v in tiny_unet.state_dict().items()}

    def fresh():
        m = tiny_unet.__class__.from_config(tiny_unet.config)
        m.load_state_dict(init)
        return m

    _, full = training.train(fresh(), sched, x, cfg, attack=spec, progress=False)
    assert len(full["stats"]["activation_gap"]) == 8
    training.train(fresh(), sched, x, cfg, attack=spec, progress=False,
                   checkpoint_dir=tmp_path / "ck", stop_after=4)
    _, resumed = training.train(fresh(), sched, x, cfg, attack=spec, progress=False,
                                checkpoint_dir=tmp_path / "ck")
    assert resumed["resumed_from"] == 4
    assert resumed["stats"]["activation_gap"] == pytest.approx(full["stats"]["activation_gap"],
                                                               rel=1e-5)
