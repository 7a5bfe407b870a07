"""The interface every trigger-inversion method implements, and what they share.

A method (``InversionMethod``) gets a ``Context``: the model (a ``models.DiffusionModel``, frozen),
the model's own backdoor sampler (never clipping), a fixed batch of clean noise with its per-sample
step-noise seeds (the *verdict batch*, the same for every method of one run so that their MSCRs
compare), its own seed, the encoder and detection thresholds, a progress callback and an optional
directory for resumable state. It returns a ``MethodResult``: the inverted trigger (an additive
offset in the space the model denoises: backdoor input = noise + trigger), its history and any
JSON-able details. The runner (``inversion.run``) then draws the verdict samples from
``noise + trigger`` with the model's sampler, computes MSCR (the common evidence, so that every
method's trigger can flag a model), and asks the method for its own statistics
(``InversionMethod.statistics``), the features its population detector uses (Elijah's uniformity
and total variation, TERD's KL statistic, PureDiffusion's uniform score).

A new method is one module with a subclass and its ``Spec`` dataclass, one entry in
``inversion.METHODS``, and its tests.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffcleanse import detection, samplers
from diffcleanse.encoders import Encoder
from diffcleanse.models import DiffusionModel
from diffcleanse.population import DetectorSpec

Progress = Callable[[dict[str, Any]], None]


class InversionError(RuntimeError):
    """Inversion cannot run on this model (or with these settings), or diverged."""


@dataclass
class Context:
    """What a method may use. ``noise`` is on the model's device."""

    model: DiffusionModel
    sampler: samplers.SamplerSpec
    noise: torch.Tensor  # (B, C, H, W) the verdict batch of clean noise
    noise_seeds: list[int]  # per-sample step-noise seeds of that batch
    seed: int  # the method's own seed (derived from the config seed, model id, method, seed index)
    detect: detection.DetectionSpec
    encoder: Encoder | None = None
    progress: Progress | None = None
    state_dir: Path | None = None  # where a method may keep state to resume from (scan)

    @property
    def unet(self) -> torch.nn.Module:
        """The frozen denoiser."""
        return self.model.unet

    @property
    def device(self) -> torch.device:
        """The model's device."""
        return self.noise.device

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the space the model denoises (the trigger's shape)."""
        return self.model.space_shape

    def generator(self, *parts: object) -> torch.Generator:
        """A CPU generator seeded by the method's seed and ``parts`` (reproducible draws)."""
        from diffcleanse.records import derive_seed

        return torch.Generator().manual_seed(derive_seed(self.seed, *parts))

    def sample_from(self, x_T: torch.Tensor, *, seeds: list[int] | None = None,
                    spec: samplers.SamplerSpec | None = None, grad: bool = False,
                    steps_limit: int | None = None, decode: bool = True) -> torch.Tensor:
        """The model's reverse process from ``x_T`` (default seeds: the verdict batch's, repeated
        to the batch), decoded to images unless ``decode`` is False or ``steps_limit`` stops the
        chain early; unclipped; with ``grad`` differentiable (each UNet call checkpointed)."""
        if seeds is None:
            reps, rem = divmod(len(x_T), len(self.noise_seeds))
            if rem:
                raise ValueError(f"{len(x_T)} samples are not a multiple of the verdict batch "
                                 f"({len(self.noise_seeds)}): pass their seeds")
            seeds = self.noise_seeds * reps
        x = samplers.denoise(self.unet, self.model.scheduler_config, x_T, spec or self.sampler,
                             seeds=seeds, grad=grad, steps_limit=steps_limit)
        return self.model.decode(x) if decode and steps_limit is None else x

    def backdoor_samples(self, trigger: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Samples from ``verdict noise + trigger`` (``sample_from``'s options apply)."""
        return self.sample_from(self.noise + trigger.to(self.device), **kwargs)

    def report(self, row: dict[str, Any]) -> None:
        """Hand one iteration's numbers to the progress callback (if any)."""
        if self.progress is not None:
            self.progress(row)


@dataclass
class MethodResult:
    """What a method returns (the runner adds the verdict samples, MSCR and timings)."""

    trigger: torch.Tensor  # (C, H, W), additive offset: backdoor input = noise + trigger
    iterations: int
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_early: bool = False
    samples: torch.Tensor | None = None  # verdict samples, if the method already drew them
    details: dict[str, Any] = field(default_factory=dict)  # JSON-able extras for the record
    # extras saved beside the trigger
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class InversionMethod(ABC):
    """One trigger-inversion method. Subclasses set ``name``, ``Spec`` (a frozen dataclass of every
    hyperparameter, with the paper's defaults) and ``invert``; ``statistics`` is optional."""

    name: ClassVar[str]
    Spec: ClassVar[type]
    label: ClassVar[str] = ""  # how tables name it (Elijah, BBTI, ...)
    model_types: ClassVar[tuple[str, ...]] = ("ddpm",)
    uses_encoder: ClassVar[bool] = False  # True when ``invert`` needs ``ctx.encoder``
    features: ClassVar[tuple[str, ...]] = ()  # names ``statistics`` returns
    # the method's own detector over its statistics (``population``): default MSCR >= κ_d
    detector: ClassVar[DetectorSpec] = DetectorSpec("fixed", ("mscr",))

    def make_spec(self, params: dict[str, Any] | None = None, *, where: str = "inversion"
                  ) -> Any:
        """The method's spec from config params; an unknown key is an error naming it."""
        params = dict(params or {})
        names = {f.name for f in dataclasses.fields(self.Spec)}
        unknown = sorted(set(params) - names)
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {', '.join(unknown)} for inversion "
                             f"method {self.name} (its settings: {', '.join(sorted(names))})")
        return self.Spec(**params)

    def check_model(self, model: DiffusionModel) -> None:
        """Refuse a model type this method does not support, naming what it does support."""
        if model.model_type not in self.model_types:
            raise InversionError(f"inversion method {self.name} does not support model type "
                                 f"{model.model_type!r} (it supports "
                                 f"{', '.join(self.model_types)})")

    @abstractmethod
    def invert(self, ctx: Context, spec: Any) -> MethodResult:
        """Find a trigger for ``ctx.model``."""

    def detector_for(self, spec: Any) -> DetectorSpec:
        """The detector for runs made with ``spec`` (its feature names may depend on the
        settings, e.g. the perceptual distance); default: the ``detector`` class attribute."""
        return self.detector

    def budget(self, spec: Any) -> int | None:
        """The most iterations ``invert`` may report (for progress bars); None if unknown."""
        return None

    def statistics(self, ctx: Context, spec: Any, result: MethodResult, samples: torch.Tensor
                   ) -> dict[str, float]:
        """The method's own statistics of its trigger (features of its population detector),
        given the verdict samples (decoded, unclipped). Default: none."""
        return {}

    def describe(self, spec: Any) -> dict[str, Any]:
        """JSON-able description of a spec."""
        return {"method": self.name, **dataclasses.asdict(spec)}


class UNetCounter:
    """Counts UNet rows evaluated (one image at one timestep) through a forward hook."""

    def __init__(self, unet: torch.nn.Module):
        self.rows = 0
        self._h = unet.register_forward_hook(self._hook)

    def _hook(self, module, args, out) -> None:
        self.rows += int(args[0].shape[0])

    def close(self) -> None:
        """Remove the hook."""
        self._h.remove()
