"""benchmarks/inversion.py's landscape and Elijah shift readings on the tiny backdoored model."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from diffcleanse import detection, encoders, models, patterns, samplers
from diffcleanse.inversion import bbti
from diffcleanse.inversion.base import Context
from diffcleanse.inversion.elijah import shift_coefficient
from diffcleanse.inversion.run import verdict_batch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_inversion",
                                                  REPO / "benchmarks/inversion.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_inversion"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_landscape_and_shift_read_the_backdoor(bench, tiny_zoo):
    """Along c·r_true the verdict batch turns into the target (MSCR and ASR rise from c = 0 to
    c = 1, BBTI's loss falls), and the first-step noise shift at the true trigger is smaller than at
    a random trigger of the same norm (the property Elijah's λ = 0.5 rests on)."""
    model = models.load_pipeline(tiny_zoo["backdoored"])
    size = model.space_shape[-1]
    r_true = patterns.render_trigger("stop_14", size)
    target = patterns.render_target("hat", size)
    noise, seeds = verdict_batch(model.space_shape, 8, 0, "cpu")
    ctx = Context(model=model, sampler=samplers.SamplerSpec("ddpm"), noise=noise,
                  noise_seeds=seeds, seed=0, detect=detection.DetectionSpec(),
                  encoder=encoders.make_encoder("pixels"))
    spec = bbti.BBTISpec(range_loss=True)
    zero = bench.landscape(ctx, r_true, spec, target, 0.01, 0.0)
    full = bench.landscape(ctx, r_true, spec, target, 0.01, 1.0)
    assert full["asr"] >= 0.75 and full["asr"] > zero["asr"]
    assert full["mscr"] > zero["mscr"] and full["loss"] < zero["loss"]
    g = torch.Generator().manual_seed(0)
    rand = r_true.flatten()[torch.randperm(r_true.numel(), generator=g)].reshape(r_true.shape)
    lam_true = shift_coefficient(model.unet, model.scheduler_config, r_true, 32, 0)
    lam_rand = shift_coefficient(model.unet, model.scheduler_config, rand, 32, 0)
    assert lam_true < lam_rand - 0.2
