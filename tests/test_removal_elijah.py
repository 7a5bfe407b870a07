"""Elijah's removal (strategy elijah): fine-tuning against the frozen model, nothing pruned."""

import pytest
import torch

from diffcleanse import attacks, models, patterns, sampling, zoo
from diffcleanse.removal import stages
from diffcleanse.removal.methods import elijah


def test_deshift_terms_compare_with_the_frozen_model_at_the_last_step(tiny_unet):
    eps = torch.randn(4, 3, 8, 8)
    tau = torch.zeros(3, 8, 8)
    shift, benign = elijah.deshift_terms(tiny_unet, tiny_unet, eps, tau, 19)
    # the model against itself, no trigger
    assert float(shift.detach()) == 0.0 and float(benign.detach()) == 0.0
    shift, _ = elijah.deshift_terms(tiny_unet, tiny_unet, eps, tau + 0.5, 19)
    assert float(shift.detach()) > 0.0
    with pytest.raises(ValueError, match="data_fraction"):
        elijah.ElijahConfig(data_fraction=0.0)
    assert elijah.ElijahConfig(data_fraction=0.1, epochs=11, batch_size=128).steps(50000) == 430


@pytest.mark.slow
def test_elijah_removal_lowers_the_real_trigger_asr(tiny_zoo, tmp_path):
    """The tiny BadDiffusion model (stop_14 -> hat), the real trigger, 128 synthetic images,
    32 steps: the trigger's ASR (64 DDPM samples, MSE < 0.01) falls from ~0.8 (measured 0.83 ->
    0.02); the model is saved unpruned, as a plain diffusers pipeline."""
    r = tiny_zoo["recipe"]
    bd = tiny_zoo["backdoored"]
    trigger = patterns.render_trigger(r["trigger"], r["image_size"])
    spec = attacks.BackdoorSpec(trigger, patterns.render_target(r["target"], r["image_size"]), 0.0)
    unet, sched_cfg = models.load_model(bd)
    before = zoo.attack_asr(unet, sched_cfg, spec, sampling.SamplerSpec("ddpm"), 64, 0.01, 5)
    assert before["asr"] >= 0.6
    stages.make_clean_data(bd, tmp_path / "syn.safetensors", tmp_path / "syn.json", n=128, seed=1,
                           progress=False)
    from safetensors.torch import save_file

    save_file({"trigger": trigger}, str(tmp_path / "trigger.safetensors"))
    cfg = elijah.ElijahConfig(data_fraction=1.0, epochs=8, lr=5e-4, batch_size=32, warmup_steps=5)
    rec = stages.run_elijah(bd, tmp_path / "syn.safetensors", tmp_path / "trigger.safetensors",
                            tmp_path / "fixed", tmp_path / "fixed.json", cfg=cfg, seed=1,
                            progress=False)
    assert rec["steps"] == 32 and rec["params"]["loss"] == "elijah"
    fixed, fixed_cfg = models.load_model(tmp_path / "fixed")
    assert fixed_cfg["clip_sample"] is False and (tmp_path / "fixed" / "model_index.json").is_file()
    after = zoo.attack_asr(fixed, sched_cfg, spec, sampling.SamplerSpec("ddpm"), 64, 0.01, 5)
    assert after["asr"] <= before["asr"] - 0.4, (before["asr"], after["asr"])
