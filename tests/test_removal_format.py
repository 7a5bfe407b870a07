"""The pruned-model format: checks before allocation; an export that loads without diffcleanse."""

import copy
import json
import subprocess
import sys
import time

import pytest
import torch
from blocked_import import BLOCK_DIFFCLEANSE
from safetensors.torch import load_file, save_file

from diffcleanse import models
from diffcleanse.removal import importance as imp
from diffcleanse.removal import portable, pruned_io, pruning

_PORTABLE = BLOCK_DIFFCLEANSE + """
import sys, torch
torch.set_num_threads(1)  # as the test process (conftest): the same reduction order
from safetensors.torch import load_file, save_file
model_dir, inputs, out = sys.argv[1:4]
sys.path.insert(0, model_dir)
import load_pruned
pipe = load_pruned.load_pipeline(model_dir)
x = load_file(inputs)
with torch.no_grad():
    y = pipe.unet(x["x"], x["t"]).sample
save_file({"y": y.contiguous(), "clip": torch.tensor(float(pipe.scheduler.config.clip_sample))},
          out)
"""


@pytest.fixture
def pruned_dir(tiny_unet, tmp_path):
    """A pruned tiny UNet saved as a repaired model (the bundle written), and the module."""
    g = torch.Generator().manual_seed(0)
    vectors = {}
    for kind in ("clean", "backdoor"):
        grads = {k: torch.rand(p.shape, generator=g) for k, p in tiny_unet.named_parameters()}
        vectors |= imp.taylor_vectors(tiny_unet, grads, kind)
    unet = copy.deepcopy(tiny_unet)
    pruning.prune_unet(unet, vectors, "diffcleanse", 0.2)
    sched = models.scheduler_from_config({**models.build_scheduler(20).config, "clip_sample": True})
    from diffcleanse.removal import stages

    d = tmp_path / "repaired"
    models.save_model(unet, stages.repaired_scheduler(dict(sched.config)), d)
    pruned_io.write_bundle(d, "test")
    return d, unet


def test_export_loads_without_diffcleanse_to_identical_outputs(pruned_dir, tmp_path):
    d, unet = pruned_dir
    assert {p.name for p in d.iterdir()} >= {"unet", "scheduler", "load_pruned.py", "README.md"}
    g = torch.Generator().manual_seed(3)
    x = {"x": torch.randn(3, 3, 8, 8, generator=g), "t": torch.tensor([0, 7, 19])}
    save_file(x, str(tmp_path / "in.safetensors"))
    subprocess.run([sys.executable, "-c", _PORTABLE, str(d), str(tmp_path / "in.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True, timeout=300)
    got = load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        want = unet(x["x"], x["t"]).sample
        again = models.load_pipeline(d).unet(x["x"], x["t"]).sample
    assert torch.equal(again, want)
    assert torch.equal(got["y"], want)
    assert float(got["clip"]) == 0.0  # the saved scheduler says clip_sample: false
    assert json.loads((d / "scheduler" / "scheduler_config.json").read_text())["clip_sample"] \
        is False
    assert 'load_pruned.load_pipeline("' + str(d) in (d / "README.md").read_text()


def test_an_unpruned_repair_is_a_plain_diffusers_pipeline(tiny_unet, tmp_path):
    from diffusers import DDPMPipeline

    from diffcleanse.removal import stages

    d = tmp_path / "plain"
    models.save_model(tiny_unet, stages.repaired_scheduler(dict(models.build_scheduler(20).config)),
                      d)
    info = pruned_io.write_bundle(d, "test")
    assert not info["pruned"] and (d / "model_index.json").is_file()
    pipe = DDPMPipeline.from_pretrained(d)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 5])
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t).sample, tiny_unet(x, t).sample)


def _edit_shapes(d, fn):
    path = d / "unet" / "pruned_shapes.json"
    spec = json.loads(path.read_text())
    fn(spec["modules"])
    path.write_text(json.dumps(spec))


def test_shapes_that_do_not_match_the_weights_are_refused(pruned_dir):
    d, _ = pruned_dir
    name = next(k for k, v in json.loads((d / "unet/pruned_shapes.json").read_text())["modules"]
                .items() if v["type"] == "Conv2d")

    def grow(mods):
        mods[name]["out_channels"] += 1

    _edit_shapes(d, grow)
    with pytest.raises(portable.PrunedFormatError, match="do not match pruned_shapes.json"):
        portable.load_unet(d)  # the loader shipped with the model
    with pytest.raises(models.ModelLoadError, match="does not match"):
        models.load_model(d)  # diffcleanse's own load refuses it too


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.__setitem__(next(iter(m)), {**m[next(iter(m))], "type": "Linear"}),
     "the shapes say 'Linear'"),
    (lambda m: m.__setitem__("down_blocks.9.conv", {"type": "Conv2d"}), "does not build"),
    (lambda m: [v.__setitem__("out_channels", 10**12) for v in m.values()
                if v["type"] == "Conv2d"], r"must be an integer in \[1, \d+\]"),
    (lambda m: [v.__setitem__("in_channels", -3) for v in m.values() if v["type"] == "Conv2d"],
     r"must be an integer in \[1, \d+\]"),
    (lambda m: [v.__setitem__("group_sizes", [10**9] * 4) for v in m.values()
                if v["type"] == "GroupNorm"], "not a pruning of"),
])
def test_absurd_shapes_are_refused_before_any_allocation(pruned_dir, edit, message):
    d, _ = pruned_dir
    _edit_shapes(d, edit)
    t0 = time.time()
    with pytest.raises(portable.PrunedFormatError, match=message):
        portable.load_unet(d)
    assert time.time() - t0 < 30


def test_a_config_that_asks_for_an_absurd_model_is_refused(pruned_dir):
    d, _ = pruned_dir
    cfg_path = d / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["block_out_channels"] = [400_000, 400_000]
    cfg["norm_num_groups"] = 4
    cfg_path.write_text(json.dumps(cfg))
    t0 = time.time()
    with pytest.raises(portable.PrunedFormatError, match="asks for .* parameters"):
        portable.load_unet(d)
    assert time.time() - t0 < 60


def test_a_broken_shapes_file_is_refused(pruned_dir):
    d, _ = pruned_dir
    (d / "unet" / "pruned_shapes.json").write_text("{not json")
    with pytest.raises(portable.PrunedFormatError, match="not JSON"):
        portable.load_unet(d)
    (d / "unet" / "pruned_shapes.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(portable.PrunedFormatError, match="unknown format 'other/9'"):
        portable.load_unet(d)
