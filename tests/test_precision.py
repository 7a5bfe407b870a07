"""The UNet evaluations' precision (config ``precision``): fp32 exact, bf16 autocast with fp32
outputs and fp32 weights and gradients, kept by copies; recorded in every record."""

from __future__ import annotations

import copy

import pytest
import torch

from diffcleanse import models, precision, records


@pytest.fixture(autouse=True)
def _fp32_after():
    yield
    precision.set_precision("fp32")


def _unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.build_unet(16, (16, 32), in_channels=1, norm_num_groups=8)


def _call(unet: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return unet(x, torch.full((len(x),), 50)).sample


def test_fp32_is_the_plain_model_and_strict():
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    precision.set_precision("fp32")
    a = _unet()
    assert not getattr(a, "_diffcleanse_bf16", False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    plain = models.UNet2DModel.from_config(a.config)
    plain.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(_call(a, x), _call(plain, x))


def test_bf16_runs_the_unet_in_bf16_and_returns_fp32():
    x = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _call(_unet(), x)  # fp32
    precision.set_precision("bf16")
    unet = _unet()  # same weights (same seed), built under bf16
    seen: list[torch.dtype] = []
    unet.conv_in.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    with torch.no_grad():
        out = _call(unet, x)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 1e-5 < rel < 0.05, rel  # bf16 rounding: not exact, close
    twin = copy.deepcopy(unet)  # fine-tuning's teacher, EMA copies
    with torch.no_grad():
        assert torch.equal(_call(twin, x), out)
    assert precision.attach(unet) is unet  # idempotent: one pair of hooks
    assert len(unet._forward_pre_hooks) == 1


def test_bf16_training_keeps_fp32_weights_and_gradients():
    precision.set_precision("bf16")
    unet = _unet().train()
    x = torch.randn(4, 1, 16, 16)
    loss = (_call(unet, x) - x).square().mean()
    assert loss.dtype == torch.float32
    loss.backward()
    p = unet.conv_in.weight
    assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_a_failed_call_leaves_no_autocast_behind():
    precision.set_precision("bf16")
    unet = _unet()
    with pytest.raises(RuntimeError):
        unet(torch.randn(2, 3, 16, 16), torch.tensor([1, 1]))  # 3 channels into a 1-channel UNet
    assert not torch.is_autocast_enabled("cpu")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    assert (a @ b).dtype == torch.float32


def test_records_name_the_precision_and_bad_names_are_refused():
    precision.set_precision("bf16")
    assert records.make_record("x", {}, 0, 1.0)["precision"] == "bf16"
    precision.set_precision("tf32")
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert records.make_record("x", {}, 0, 1.0)["precision"] == "tf32"
    with pytest.raises(ValueError, match="unknown precision 'fp16': one of fp32, tf32, bf16"):
        precision.set_precision("fp16")


def test_a_checkpoint_made_in_one_precision_is_not_resumed_in_another():
    """Training and fine-tuning resume only a checkpoint whose fingerprint matches; the
    precision joins it (fp32 leaves it as before, so older fp32 checkpoints stay valid)."""
    from diffcleanse.training import TrainConfig

    cfg = TrainConfig(steps=10)
    fp32 = cfg.fingerprint()
    assert "precision" not in fp32
    precision.set_precision("bf16")
    assert cfg.fingerprint() == {**fp32, "precision": "bf16"}
