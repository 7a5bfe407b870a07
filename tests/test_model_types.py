"""Model types (DDPM, NCSN, LDM): save in their diffusers layouts, load back through
``models.load_pipeline`` (safetensors only), map images to and from the space they denoise, sample
with their samplers, and train (clean and attacked) through the one training loop."""

from __future__ import annotations

import json
import os

import pytest
import torch

from diffcleanse import attacks, data, models, samplers, training, zoo

ARCH = {"block_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": 4}


@pytest.fixture(scope="module")
def digits8():
    return data.load_digits(8)[0]


@pytest.fixture(scope="module")
def tiny_ldm(digits8):
    vae = models.train_vqvae(digits8[:512], steps=60, batch_size=32, block_out_channels=(16, 32))
    unet = models.build_unet(4, in_channels=3, **ARCH)
    return models.DiffusionModel(unet, dict(models.build_scheduler(20).config), "ldm", vae)


@pytest.fixture(scope="module")
def tiny_ncsn():
    torch.manual_seed(0)
    unet = models.build_ncsn_unet(8, **ARCH)
    return models.DiffusionModel(unet, dict(models.build_ncsn_scheduler(20, sigma_max=5.0).config),
                                 "ncsn")


def test_ncsn_round_trip_layout_and_space(tmp_path, tiny_ncsn):
    tiny_ncsn.save(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == (
        "ScoreSdeVePipeline")
    assert models.model_type_of(tmp_path / "m") == "ncsn"
    m = models.load_pipeline(tmp_path / "m")
    assert m.model_type == "ncsn" and m.unet.config.time_embedding_type == "fourier"
    assert m.scheduler_config["_class_name"] == "ScoreSdeVeScheduler"
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.allclose(m.decode(m.encode(x)), x) and float(m.encode(x).min()) >= 0
    r = torch.ones(3, 8, 8)
    assert torch.allclose(m.trigger_to_space(r), r / 2)  # an image offset is half in [0, 1]
    for a, b in zip(m.unet.state_dict().values(), tiny_ncsn.unet.state_dict().values(),
                    strict=True):
        assert torch.equal(a, b)
    sched = m.training_scheduler()
    assert type(sched).__name__ == "ScoreSdeVeScheduler"
    assert attacks.process_of(sched).kind == "ve"


def test_ldm_round_trip_layout_and_space(tmp_path, tiny_ldm, digits8):
    tiny_ldm.save(tmp_path / "m")
    assert sorted(os.listdir(tmp_path / "m")) == ["model_index.json", "scheduler", "unet", "vqvae"]
    m = models.load_pipeline(tmp_path / "m")
    assert m.model_type == "ldm" and m.space_shape == (3, 4, 4)
    assert abs(m.scaling_factor - tiny_ldm.scaling_factor) < 1e-6
    z = m.encode(digits8[:64])
    assert z.shape == (64, 3, 4, 4)
    assert 0.5 < float(z.std()) < 2.0  # the scaling factor gives the diffusion unit-scale latents
    rec = m.decode(z)
    assert rec.shape == (64, 3, 8, 8)
    assert float(((rec - digits8[:64]) ** 2).mean()) < 0.5  # a (tiny, briefly trained) autoencoder
    r = m.trigger_to_space(torch.zeros(3, 8, 8))
    assert r.shape == (3, 4, 4) and float(r.abs().max()) == 0.0  # no trigger, no offset
    # and the denoiser samples its latent space with every VP sampler of the registry
    out = samplers.denoise(m.unet, m.scheduler_config, torch.randn(2, 3, 4, 4),
                           samplers.SamplerSpec("dpmpp_o2", steps=5))
    assert m.decode(out).shape == (2, 3, 8, 8)


def test_ldm_autoencoder_weights_must_be_safetensors(tmp_path, tiny_ldm):
    tiny_ldm.save(tmp_path / "m")
    st = tmp_path / "m" / "vqvae" / "diffusion_pytorch_model.safetensors"
    st.rename(st.with_suffix(".bin"))
    with pytest.raises(models.ModelLoadError, match="only pickle weights.*allow_pickle"):
        models.load_pipeline(tmp_path / "m")
    (tmp_path / "m" / "vqvae" / "diffusion_pytorch_model.bin").unlink()
    with pytest.raises(models.ModelLoadError, match="no weights file"):
        models.load_pipeline(tmp_path / "m")


def test_fetch_model_keeps_the_model_type(tmp_path, tiny_ncsn):
    tiny_ncsn.save(tmp_path / "src")
    row = {"model_id": "n", "source": f"local:{tmp_path / 'src'}", "model_type": "ncsn",
           "attack": "none", "trigger": "none", "target": "none", "poison_rate": 0.0}
    zoo.fetch_model(row, tmp_path / "out", tmp_path / "card.json")
    assert models.load_pipeline(tmp_path / "out").model_type == "ncsn"
    with pytest.raises(models.ModelLoadError, match="holds a ncsn model.*'ddpm'"):
        zoo.fetch_model({**row, "model_type": "ddpm"}, tmp_path / "out2", tmp_path / "c2.json")


def test_ve_training_learns_the_score(tiny_ncsn, digits8):
    """A few hundred VE steps lower the denoising score-matching loss (-sigma s vs eps)."""
    import copy

    unet = copy.deepcopy(tiny_ncsn.unet)
    sched = tiny_ncsn.training_scheduler()
    x = tiny_ncsn.encode(digits8)
    cfg = training.TrainConfig(steps=150, batch_size=32, lr=2e-3, warmup_steps=10, seed=0)
    _, hist = training.train(unet, sched, x, cfg, progress=False)
    first, last = sum(hist["losses"][:20]) / 20, sum(hist["losses"][-20:]) / 20
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize(("mtype", "sampler", "attack"), [
    ("ncsn", "score_sde_ve", "villandiffusion"),
    ("ldm", "dpmpp_o2", "villandiffusion"),
    ("ddpm", "ddim", "trojdiff"),
])
def test_zoo_trains_each_model_type_from_a_manifest_row(tmp_path, mtype, sampler, attack):
    """A manifest row of each model type trains from scratch (an LDM first trains its
    autoencoder), is saved in its layout, loads back, and its card states the attack check."""
    row = {"model_id": f"m-{mtype}", "source": "train", "init": "", "model_type": mtype,
           "dataset": "digits", "image_size": 8, "attack": attack,
           "trigger": "blend" if attack == "trojdiff" else "stop_14",
           "target": "mickey" if attack == "trojdiff" else "hat", "poison_rate": 0.5, "seed": 0,
           "train_steps": 20, "sampler": sampler,
           "attack_params": "gamma=0.6" if attack == "trojdiff" else "", "group": ""}
    params = {"data_root": str(tmp_path), "unet": dict(ARCH), "scheduler":
              {"num_train_timesteps": 10}, "ncsn": {"sigma_max": 5.0},
              "autoencoder": {"steps": 10, "batch_size": 16, "block_out_channels": [16, 32]},
              "batch_size": 8, "lr": 1e-3, "finetune_lr": 1e-3, "warmup_steps": 2,
              "ema_decay": 0.99, "grad_clip": 1.0, "checkpoint_every": 10,
              "attack_check": {"n_samples": 2, "mse_threshold": 0.01}}
    card = zoo.train_model(row, params, tmp_path / "model", tmp_path / "card.json",
                           init_dir=None, checkpoint_dir=tmp_path / "ckpt")
    m = models.load_pipeline(tmp_path / "model")
    assert m.model_type == mtype and card["training"]["model_type"] == mtype
    chk = card["attack_check"]
    assert chk["n_samples"] == 2 and 0.0 <= chk["asr"] <= 1.0
    if attack == "trojdiff":
        assert chk["sampler"]["name"] == "trojdiff_ddim"
        assert card["ground_truth"]["gamma"] == 0.6 and chk["backdoor_input"].startswith("gamma")
    if mtype == "ldm":
        assert "target_rendering_mse" in chk


def test_snapshots_belong_to_the_training_that_published_them(tmp_path):
    """Fig. 14's snapshots are stashed beside the checkpoints (so a killed and resumed training
    still publishes all of them) under a key of the training's parameters: a rerun with another
    snapshot interval trains afresh and publishes only its own; a rerun with the same parameters
    resumes from the final checkpoint and publishes the same snapshots again."""
    row = {"model_id": "snap", "source": "train", "init": "", "model_type": "ddpm",
           "dataset": "digits", "image_size": 8, "attack": "none", "trigger": "none",
           "target": "none", "poison_rate": 0.0, "seed": 0, "train_steps": 20,
           "sampler": "ddpm", "attack_params": "", "group": ""}
    params = {"data_root": str(tmp_path), "unet": dict(ARCH), "scheduler":
              {"num_train_timesteps": 10}, "batch_size": 8, "lr": 1e-3, "finetune_lr": 1e-3,
              "warmup_steps": 2, "ema_decay": 0.99, "grad_clip": 1.0, "checkpoint_every": 10,
              "attack_check": {"n_samples": 2, "mse_threshold": 0.01}}

    def run(every: int, name: str) -> tuple[dict, set[str]]:
        snaps = tmp_path / f"snapshots-{name}"
        card = zoo.train_model(row, {**params, "snapshot_every": every}, tmp_path / name,
                               tmp_path / f"{name}.json", init_dir=None,
                               checkpoint_dir=tmp_path / "ckpt", snapshot_dir=snaps)
        return card, {p.name for p in snaps.iterdir()}

    card, first = run(5, "a")
    assert first == {"step~5", "step~10", "step~15", "step~20"}
    card, second = run(10, "b")
    assert card["training"]["resumed_from_step"] == 0 and second == {"step~10", "step~20"}
    card, third = run(10, "c")
    assert card["training"]["resumed_from_step"] == 20 and third == second
    w = "unet/diffusion_pytorch_model.safetensors"
    assert (tmp_path / "snapshots-b/step~20" / w).read_bytes() == \
        (tmp_path / "snapshots-c/step~20" / w).read_bytes()
