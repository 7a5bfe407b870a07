"""The arithmetic of UNet evaluations: fp32, TF32 or bf16 autocast (config ``precision``).

One setting per process (a workflow job, a scan), like its thread count: ``set_precision`` at the
start, then every UNet that ``models`` loads or builds is ``attach``-ed. Only the denoiser's own
evaluations run in bf16: samplers' updates, losses, optimiser states, the FID's feature extractor
and the classifiers stay fp32.

- ``fp32``: strict float32 (TF32 off for matmuls and cuDNN convolutions; torch's own default lets
  cuDNN convolutions use TF32 on Ampere and later GPUs).
- ``tf32``: TF32 tensor cores for CUDA matmuls and convolutions (10-bit mantissa inputs, fp32
  accumulation). CUDA only: on CPU it is fp32.
- ``bf16``: ``torch.autocast(dtype=torch.bfloat16)`` around each UNet call, outputs cast back to
  fp32; weights and gradients stay fp32 (mixed precision, no loss scaling needed for bf16). On
  this project's CPU (AMX) a bare forward of the default UNet took 0.72 × its fp32 time, whole
  sampling chains 0.83–1.13 × (docs/cluster.md, "Precision").

The setting is per job: ``fid_reference`` takes it too, so that the FID's two sides are made by
the same convolutions (TF32 or not).

Every record names the precision it was made with (``records.make_record``).
"""

from __future__ import annotations

from typing import Any

PRECISIONS = ("fp32", "tf32", "bf16")
_current = "fp32"


def check(name: str) -> str:
    """``name`` if it is a precision, else a ValueError naming the choices."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: one of {', '.join(PRECISIONS)} "
                         f"(config `precision`, --precision)")
    return name


def set_precision(name: str) -> str:
    """Make ``name`` this process's precision (TF32 flags now; bf16 on UNets ``attach``-ed from
    now on); returns it."""
    import torch

    global _current
    _current = check(name)
    torch.backends.cuda.matmul.allow_tf32 = name == "tf32"
    torch.backends.cudnn.allow_tf32 = name == "tf32"
    return name


def current() -> str:
    """This process's precision (``fp32`` unless ``set_precision`` said otherwise)."""
    return _current


def _cast_back(out: Any) -> Any:
    """A UNet output with its tensors back in fp32 (diffusers' output class or a tuple)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.float()
    if isinstance(out, tuple):
        return tuple(_cast_back(o) for o in out)
    return type(out)(**{k: _cast_back(v) for k, v in out.items()})


def attach(unet: Any) -> Any:
    """Give ``unet`` this process's precision: with bf16, each call runs under bf16 autocast and
    returns fp32 (hooks, so copies, EMA and pruned models keep it; idempotent)."""
    if _current != "bf16" or getattr(unet, "_diffcleanse_bf16", False):
        return unet
    import torch

    stack: list[Any] = []

    def enter(module: Any, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["sample"]
        ctx = torch.autocast(device_type=x.device.type, dtype=torch.bfloat16)
        ctx.__enter__()
        stack.append(ctx)

    def leave(module: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        if stack:  # always called, also when the call failed (then ``out`` is None)
            stack.pop().__exit__(None, None, None)
        return None if out is None else _cast_back(out)

    unet.register_forward_pre_hook(enter, with_kwargs=True)
    unet.register_forward_hook(leave, with_kwargs=True, always_call=True)
    unet._diffcleanse_bf16 = True
    return unet
