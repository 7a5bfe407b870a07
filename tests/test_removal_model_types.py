"""Removal keeps a model's type: an LDM repaired by the workflow's stages (clean data, importance,
prune, fine-tune; Elijah) keeps its autoencoder and still decodes images, an NCSN keeps its VE
schedule, and both export to their type's diffusers pipeline, loadable without diffcleanse."""

import json
import subprocess
import sys

import pytest
import torch
from blocked_import import BLOCK_DIFFCLEANSE
from safetensors.torch import load_file, save_file

from diffcleanse import data, models
from diffcleanse.removal import finetune as ft
from diffcleanse.removal import stages
from diffcleanse.removal.importance import ImportanceConfig
from diffcleanse.removal.methods.elijah import ElijahConfig

ARCH = {"block_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": 4}
PIPELINE = {"ldm": "LDMPipeline", "ncsn": "ScoreSdeVePipeline"}

_PORTABLE = BLOCK_DIFFCLEANSE + """
import json, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
model_dir, inputs, out = sys.argv[1:4]
sys.path.insert(0, model_dir)
import load_pruned
pipe = load_pruned.load_pipeline(model_dir)
x = load_file(inputs)
with torch.no_grad():
    y = pipe.unet(x["x"], x["t"]).sample
    z = pipe.vqvae.decode(x["x"]).sample if hasattr(pipe, "vqvae") else y.clone()
save_file({"y": y.contiguous(), "z": z.contiguous()}, out)
print(json.dumps({"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__}))
"""


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny LDM (VQ autoencoder briefly trained on 8 px digits, UNet over 3x4x4 latents) and a
    tiny NCSN, saved in their layouts."""
    x = data.load_digits(8)[0][:256]
    root = tmp_path_factory.mktemp("types")
    vae = models.train_vqvae(x, steps=40, batch_size=32, block_out_channels=(16, 32), seed=0)
    torch.manual_seed(0)
    ldm = models.DiffusionModel(models.build_unet(4, in_channels=3, **ARCH),
                                dict(models.build_scheduler(20).config), "ldm", vae)
    ldm.save(root / "ldm")
    torch.manual_seed(0)
    ncsn = models.DiffusionModel(models.build_ncsn_unet(8, **ARCH),
                                 dict(models.build_ncsn_scheduler(20, sigma_max=5.0).config),
                                 "ncsn")
    ncsn.save(root / "ncsn")
    return {"ldm": root / "ldm", "ncsn": root / "ncsn"}


def _n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("mtype", ["ldm", "ncsn"])
def test_pruned_and_finetuned_model_keeps_its_type(model_dirs, mtype, tmp_path):
    src = model_dirs[mtype]
    original = models.load_pipeline(src)
    d = tmp_path
    stages.make_clean_data(src, d / "data.safetensors", d / "data.json", source="real", n=32,
                           dataset="digits", data_root=str(d), progress=False)
    clean = stages.load_images(d / "data.safetensors")
    assert tuple(clean.shape[1:]) == original.space_shape  # latents for the LDM
    if mtype == "ncsn":
        assert float(clean.min()) >= 0.0  # an NCSN denoises pixels in [0, 1]
    trigger = 0.5 * torch.randn(original.space_shape, generator=torch.Generator().manual_seed(1))
    save_file({"trigger": trigger}, str(d / "trigger.safetensors"))
    stages.run_importance(src, d / "data.safetensors", d / "trigger.safetensors",
                          d / "imp.safetensors", d / "imp.json", cfg=ImportanceConfig(batch_size=4),
                          kinds=("clean", "backdoor"))
    stages.run_prune(src, d / "imp.safetensors", d / "pruned", d / "prune.json",
                     strategy="diffcleanse", ratio=0.2)
    stages.run_finetune(d / "pruned", src, d / "data.safetensors", d / "ft", d / "ft.json",
                        cfg=ft.FinetuneConfig(epochs=1, batch_size=16, loss="p"), progress=False)
    for out in (d / "pruned", d / "ft"):
        got = models.load_pipeline(out)
        assert got.model_type == mtype, out
        assert _n_params(got.unet) < _n_params(original.unet)
        assert got.scheduler_config["_class_name"] == original.scheduler_config["_class_name"]
        if mtype == "ldm":
            for k, v in original.vae.state_dict().items():
                assert torch.equal(got.vae.state_dict()[k], v), k
            with torch.no_grad():
                assert got.decode(clean[:2]).shape == (2, 3, 8, 8)
    index = json.loads((d / "ft" / "model_index.json").read_text())
    assert index["_class_name"] == PIPELINE[mtype]
    assert PIPELINE[mtype] in (d / "ft" / "README.md").read_text()

    # the export loads without diffcleanse, as its type's pipeline, to the same numbers
    x = {"x": clean[:2].contiguous(), "t": torch.tensor([3, 7])}
    save_file(x, str(d / "in.safetensors"))
    args = [str(d / "ft"), str(d / "in.safetensors"), str(d / "out.safetensors")]
    proc = subprocess.run([sys.executable, "-c", _PORTABLE, *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shown = json.loads(proc.stdout.strip().splitlines()[-1])
    assert shown == {"pipeline": PIPELINE[mtype],
                     "scheduler": original.scheduler_config["_class_name"]}
    ours = models.load_pipeline(d / "ft")
    with torch.no_grad():
        y = ours.unet(x["x"], x["t"]).sample
    y_portable = load_file(str(d / "out.safetensors"))
    assert torch.allclose(y_portable["y"], y, atol=1e-6)
    if mtype == "ldm":
        with torch.no_grad():
            z = ours.vae.decode(x["x"]).sample
        assert torch.allclose(y_portable["z"], z, atol=1e-6)


def test_elijah_repair_of_an_ldm_is_a_plain_ldm_pipeline(model_dirs, tmp_path):
    """Unpruned (Elijah's removal): a diffusers LDMPipeline directory as it stands."""
    from diffusers import LDMPipeline

    src, d = model_dirs["ldm"], tmp_path
    original = models.load_pipeline(src)
    stages.make_clean_data(src, d / "data.safetensors", d / "data.json", source="synthetic",
                           n=16, sampler="ddpm", steps=4, progress=False)
    save_file({"trigger": torch.zeros(original.space_shape)}, str(d / "trigger.safetensors"))
    stages.run_elijah(src, d / "data.safetensors", d / "trigger.safetensors", d / "fixed",
                      d / "fixed.json", cfg=ElijahConfig(data_fraction=1.0, epochs=1,
                                                         batch_size=8), progress=False)
    pipe = LDMPipeline.from_pretrained(d / "fixed")
    assert type(pipe.vqvae).__name__ == type(original.vae).__name__
    assert models.load_pipeline(d / "fixed").model_type == "ldm"
    assert "LDMPipeline.from_pretrained" in (d / "fixed" / "README.md").read_text()
