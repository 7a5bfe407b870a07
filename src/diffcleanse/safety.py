"""Checks on untrusted inputs, made before any code from them runs or anything large is allocated.

The models this toolkit scans may come from attackers. ``check_model_dir`` looks at a model
directory with bounded reads only (file metadata, JSON configs of at most ``Limits.max_json_bytes``,
and the first bytes of each weights file) and refuses, with a message naming the file and the
problem:

* entries that are not plain files or folders (FIFOs, devices) and symlinks that point outside the
  model directory (a hub cache snapshot may link into its own repository folder, nothing else);
* a ``*.safetensors`` file that is really a pickle or a ``torch.save`` zip (unpickling runs code);
* a safetensors file that is truncated, whose header is malformed, or that declares absurd shapes
  (the header -- 8-byte little-endian length + JSON -- is checked against the file size and
  ``Limits`` before safetensors or torch allocate anything);
* a component config (``unet/config.json``) whose ``_class_name`` is not a model class this package
  loads, whose sizes are out of bounds, or whose parameter shapes (built on the meta device, so
  nothing is allocated) do not match the weights' header; pruned models are compared with their
  recorded shapes;
* a scheduler config whose schedule the samplers (``diffcleanse.samplers``) cannot run: an unknown
  ``beta_schedule``, a ``prediction_type`` other than epsilon, a learned variance, NaN/inf or
  out-of-range betas; every sampler of the registry is built from it as a probe.

``hub_snapshot`` resolves a hub id and revision with bounded waits: offline (``HF_HUB_OFFLINE``)
it reads the local cache only and says which revisions the cache holds; online it asks the hub
with a timeout, so a revision that does not exist, or a hub that does not answer, fails at once.

``open_image`` opens an image file (a ``file:`` trigger/target, an image of a ``folder:`` dataset)
from a safe list of formats, with its size and pixel count bounded before it is decoded
(decompression bombs). ``check_manifest_paths`` confines the manifest's local paths (``local:``,
``folder:``, ``file:``, ``tensor:``) to the data root when ``data.confine_local`` is set.

Errors are :class:`InputRefused` (a ``ValueError``); callers wrap them in their own error types.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# safetensors dtypes and their sizes in bytes (the format's full list)
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8, "C64": 8,
}
# Model classes a component config may name (other model types register theirs).
MODEL_CLASSES: set[str] = {"UNet2DModel", "VQModel", "AutoencoderKL"}
# Scheduler classes of variance-exploding (score-based) models, checked by their sigmas.
VE_SCHEDULERS: set[str] = {"ScoreSdeVeScheduler", "KarrasVeScheduler"}
IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")  # no EPS (it runs Ghostscript)
SCHEDULER_FILES = ("scheduler_config.json",)


class InputRefused(ValueError):
    """An untrusted input was refused; ``path`` names the file, the message the problem."""

    def __init__(self, path: str | os.PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


@dataclass(frozen=True)
class Limits:
    """Bounds on what an untrusted model directory or image may declare."""

    max_entries: int = 10_000  # files and folders in a model directory
    max_json_bytes: int = 1 << 20  # a config file
    max_header_bytes: int = 100 << 20  # a safetensors JSON header (the format's own limit)
    max_ndim: int = 8
    max_dim: int = 1 << 31
    max_tensor_bytes: int = 16 << 30
    max_weights_bytes: int = 64 << 30  # all tensors of one file
    max_config_int: int = 1 << 16  # any integer in a model config (channels, layers, groups)
    max_sample_size: int = 4096  # pixels (or latent cells) per side
    max_timesteps: int = 100_000
    max_image_bytes: int = 64 << 20
    max_image_pixels: int = 4096 * 4096


LIMITS = Limits()


# ---------------------------------------------------------------- small helpers


def _within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def read_json(path: str | os.PathLike[str], limits: Limits = LIMITS) -> Any:
    """Parse a JSON file of at most ``limits.max_json_bytes``; NaN/Infinity are refused."""
    p = Path(path)
    try:
        st = os.stat(p)
    except OSError as err:
        raise InputRefused(p, f"cannot be read ({err.strerror})") from err
    if not stat.S_ISREG(st.st_mode):
        raise InputRefused(p, "is not a plain file")
    if st.st_size > limits.max_json_bytes:
        raise InputRefused(
            p, f"is {st.st_size:,} bytes; a config may hold at most {limits.max_json_bytes:,}"
        )
    with open(p, "rb") as fh:
        raw = fh.read(limits.max_json_bytes + 1)
    bad: list[str] = []

    def constant(name: str) -> float:
        bad.append(name)
        return float("nan")

    try:
        obj = json.loads(raw.decode("utf-8"), parse_constant=constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputRefused(p, f"is not valid JSON ({err})") from err
    if bad:
        where = next(_non_finite(obj), "?")
        raise InputRefused(p, f"holds a non-finite number ({bad[0]} at {where})")
    return obj


def _non_finite(obj: Any, where: str = "") -> Iterator[str]:
    if isinstance(obj, float) and not math.isfinite(obj):
        yield where or "top level"
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _non_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _non_finite(v, f"{where}[{i}]")


def _big_ints(obj: Any, bound: int, where: str = "") -> Iterator[tuple[str, int]]:
    if isinstance(obj, bool):
        return
    if isinstance(obj, int) and abs(obj) > bound:
        yield where or "top level", obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _big_ints(v, bound, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, list):
        if len(obj) > bound:
            yield where, len(obj)
            return
        for i, v in enumerate(obj):
            yield from _big_ints(v, bound, f"{where}[{i}]")


# ---------------------------------------------------------------- the directory tree


def hub_link_root(path: Path) -> Path:
    """The folder symlinks of ``path`` may point into: the model directory itself, or for a hub
    cache snapshot (``models--org--name/snapshots/<commit>``) its repository folder (blobs)."""
    real = path.resolve()
    for p in (real, *real.parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--"):
            return p.parent.parent
    return real


def check_tree(path: str | os.PathLike[str], limits: Limits = LIMITS,
               link_root: Path | None = None) -> list[Path]:
    """Every entry under ``path`` is a plain file or folder, or a symlink that resolves inside
    ``link_root`` (default: ``hub_link_root(path)``); returns the regular files (bounded walk)."""
    root = Path(path)
    if not root.exists():
        raise InputRefused(root, "does not exist")
    real_root = root.resolve()
    allowed = link_root.resolve() if link_root is not None else hub_link_root(root)
    if not real_root.is_dir():
        raise InputRefused(root, "is not a directory")
    files: list[Path] = []
    count = 0
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as err:
            raise InputRefused(d, f"cannot be listed ({err.strerror})") from err
        for e in entries:
            count += 1
            if count > limits.max_entries:
                raise InputRefused(root, f"holds more than {limits.max_entries:,} entries")
            p = Path(e.path)
            if e.is_symlink():
                target = Path(os.path.realpath(p))
                if not _within(target, allowed):
                    raise InputRefused(
                        p, f"is a symlink to {target}, outside the model directory {allowed}; "
                        f"refused (copy the file into the directory if you trust it)"
                    )
                if not target.exists():
                    raise InputRefused(p, f"is a broken symlink (to {target})")
            try:
                st = os.stat(p)
            except OSError as err:
                raise InputRefused(p, f"cannot be read ({err.strerror})") from err
            if stat.S_ISDIR(st.st_mode):
                if e.is_symlink():
                    raise InputRefused(p, "is a symlinked folder; refused (copy it instead)")
                stack.append(p)
            elif stat.S_ISREG(st.st_mode):
                files.append(p)
            else:
                raise InputRefused(p, "is not a plain file (a FIFO, socket or device); refused")
    return files


# ---------------------------------------------------------------- safetensors headers


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as a safetensors header declares it."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _sniff(head: bytes) -> str | None:
    """What a file that should be safetensors really is, when recognisably something else."""
    if head[8:9] == b"{":  # a safetensors header starts right after its 8-byte length
        return None
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (torch.save's format, whose data.pkl is a pickle)"
    if head[:1] == b"\x80" and len(head) > 1 and 2 <= head[1] <= 5:
        return f"a pickle (protocol {head[1]})"
    if head[:1] in (b"(", b"c", b"}", b"]"):
        return "a pickle (text protocol)"
    return None


def safetensors_header(path: str | os.PathLike[str],
                       limits: Limits = LIMITS) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, read with bounded reads and checked against the
    file's size and ``limits``; raises InputRefused for a disguised pickle, truncation, a malformed
    header or absurd shapes."""
    p = Path(path)
    size = os.stat(p).st_size
    with open(p, "rb") as fh:
        head = fh.read(16)
        what = _sniff(head)
        if what:
            raise InputRefused(
                p, f"is named .safetensors but is {what}; unpickling it could run arbitrary "
                f"code, so it is refused whatever allow_pickle says"
            )
        if len(head) < 8:
            raise InputRefused(p, f"is {size} bytes: truncated (a safetensors file starts with an "
                                  f"8-byte header length)")
        (n,) = struct.unpack("<Q", head[:8])
        if n > limits.max_header_bytes:
            raise InputRefused(p, f"declares a {n:,}-byte header (limit "
                                  f"{limits.max_header_bytes:,}): not a safetensors file")
        if 8 + n > size:
            raise InputRefused(p, f"declares a {n:,}-byte header but the file has {size:,} "
                                  f"bytes: truncated or not a safetensors file")
        fh.seek(8)
        raw = fh.read(n)
    if not raw.lstrip()[:1] == b"{":
        raise InputRefused(p, "has no JSON header: not a safetensors file")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputRefused(p, f"has a malformed header ({err})") from err
    if not isinstance(header, dict):
        raise InputRefused(p, "has a header that is not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r}"
        if not (isinstance(spec, dict) and {"dtype", "shape", "data_offsets"} <= spec.keys()):
            raise InputRefused(p, f"{where}: header entry lacks dtype/shape/data_offsets")
        dtype, shape, offs = spec["dtype"], spec["shape"], spec["data_offsets"]
        if dtype not in DTYPE_BYTES:
            raise InputRefused(p, f"{where}: unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool)
                                                and d >= 0 for d in shape)):
            raise InputRefused(p, f"{where}: shape {shape!r} is not a list of sizes >= 0")
        if len(shape) > limits.max_ndim or any(d > limits.max_dim for d in shape):
            raise InputRefused(p, f"{where}: absurd shape {shape} (at most {limits.max_ndim} "
                                  f"dimensions of at most {limits.max_dim:,})")
        nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
        if nbytes > limits.max_tensor_bytes:
            raise InputRefused(p, f"{where}: absurd shape {shape} declares {nbytes:,} bytes "
                                  f"(limit {limits.max_tensor_bytes:,})")
        if not (isinstance(offs, list) and len(offs) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
                and 0 <= offs[0] <= offs[1]):
            raise InputRefused(p, f"{where}: bad data_offsets {offs!r}")
        if offs[1] - offs[0] != nbytes:
            raise InputRefused(p, f"{where}: shape {shape} of {dtype} needs {nbytes:,} bytes but "
                                  f"its data_offsets span {offs[1] - offs[0]:,}")
        out[name] = TensorInfo(dtype, tuple(shape), offs[0], offs[1])
    declared = sum(t.end - t.begin for t in out.values())
    if declared > limits.max_weights_bytes:
        raise InputRefused(p, f"declares {declared:,} bytes of tensors (limit "
                              f"{limits.max_weights_bytes:,})")
    pos = 0
    for name, t in sorted(out.items(), key=lambda kv: kv[1].begin):
        if t.begin != pos:
            raise InputRefused(p, f"tensor {name!r}: data starts at {t.begin:,}, expected {pos:,} "
                                  f"(overlapping or gapped tensors)")
        pos = t.end
    if pos > data_bytes:
        raise InputRefused(p, f"is truncated: its header declares {pos:,} bytes of tensor data, "
                              f"the file holds {data_bytes:,}")
    if pos < data_bytes:
        raise InputRefused(p, f"holds {data_bytes - pos:,} bytes after its last tensor "
                              f"(not a well-formed safetensors file)")
    return out


# ---------------------------------------------------------------- configs vs weights


def register_model_class(name: str) -> None:
    """Allow another diffusers model class in component configs (new model types)."""
    MODEL_CLASSES.add(name)


def _meta_model(folder: Path, config: dict[str, Any], limits: Limits):
    """The model the config (and a pruned model's shapes) builds, on the meta device: nothing
    is allocated and no weights are read."""
    import diffusers
    import torch

    cls_name = config.get("_class_name")
    cls = getattr(diffusers, str(cls_name))
    cfg = {k: v for k, v in config.items() if not k.startswith("_")}
    try:
        with torch.device("meta"):
            model = cls.from_config(cfg)
            pruned = folder / "pruned_shapes.json"
            if pruned.is_file():
                from diffcleanse.removal.pruned_io import FORMAT, apply_shapes

                spec = read_json(pruned, limits)
                if not isinstance(spec, dict) or spec.get("format") != FORMAT:
                    raise InputRefused(pruned, f"unknown format (this version reads {FORMAT})")
                big = next(_big_ints(spec, limits.max_config_int), None)
                if big:
                    raise InputRefused(pruned, f"{big[0]} = {big[1]:,} is out of bounds")
                apply_shapes(model, spec["modules"])
    except InputRefused:
        raise
    except Exception as err:  # diffusers rejects the config (unknown block type, bad sizes)
        raise InputRefused(folder / "config.json",
                           f"does not describe a valid {cls_name} ({type(err).__name__}: {err})"
                           ) from err
    return model


def _as_loaded(model, declared: dict[str, TensorInfo]) -> dict[str, TensorInfo]:
    """The header's tensor names as diffusers will load them: checkpoints saved before its
    attention refactor (``query``/``key``/``value``/``proj_attn``, e.g. google/ddpm-cifar10-32)
    are renamed by the model's own ``_fix_state_dict_keys_on_load``; keys the class ignores on
    load are dropped."""
    out = dict(declared)
    fix = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix is not None:
        out = dict(fix(out) or out)
    ignore = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    return {k: v for k, v in out.items() if not any(re.search(p, k) for p in ignore)}


def check_component(folder: str | os.PathLike[str], *, allow_pickle: bool = False,
                    limits: Limits = LIMITS) -> dict[str, Any]:
    """Check one model component folder (``unet/``, ``vae/`` or a flat model): its config names
    a known class with bounded sizes, its safetensors headers are sound, and the config (plus a
    pruned model's shapes) builds exactly the tensors the weights hold. Returns the config."""
    folder = Path(folder)
    cfg_file = folder / "config.json"
    config = read_json(cfg_file, limits)
    if not isinstance(config, dict):
        raise InputRefused(cfg_file, "is not a JSON object")
    cls_name = config.get("_class_name")
    if cls_name not in MODEL_CLASSES:
        raise InputRefused(cfg_file, f"_class_name {cls_name!r} is not a model class this "
                                     f"package loads ({', '.join(sorted(MODEL_CLASSES))})")
    big = next(_big_ints(config, limits.max_config_int), None)
    if big:
        raise InputRefused(cfg_file, f"{big[0]} = {big[1]:,} is out of bounds (at most "
                                     f"{limits.max_config_int:,})")
    size = config.get("sample_size")
    sizes = size if isinstance(size, list) else [size]
    if any(isinstance(s, int) and s > limits.max_sample_size for s in sizes):
        raise InputRefused(cfg_file, f"sample_size {size} is larger than "
                                     f"{limits.max_sample_size} per side")
    weights = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" and p.is_file())
    if not weights:  # pickle-only or none: the loader refuses them, or loads them when the
        return config  # caller opted in (a pickle's shapes cannot be read without unpickling)
    declared: dict[str, TensorInfo] = {}
    for w in weights:
        declared.update(safetensors_header(w, limits))
    header_file = weights[0] if len(weights) == 1 else folder
    model = _meta_model(folder, config, limits)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    declared = _as_loaded(model, declared)
    missing = sorted(set(expected) - set(declared))
    unexpected = sorted(set(declared) - set(expected))
    wrong = sorted(k for k in set(expected) & set(declared) if expected[k] != declared[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensors have other shapes than the config builds "
                         f"(first: {k} is {list(declared[k].shape)} in the weights, "
                         f"{list(expected[k])} by the config)")
        if missing:
            parts.append(f"{len(missing)} tensors the config needs are missing "
                         f"(first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensors are not in the config's model "
                         f"(first: {unexpected[0]})")
        raise InputRefused(header_file, f"does not match {cfg_file.name} ({cls_name}): "
                                        + "; ".join(parts))
    return config


# ---------------------------------------------------------------- scheduler configs


def _probe_samplers() -> list[Any]:
    from diffcleanse import samplers

    return [s for s in samplers.SAMPLERS.values() if s.family != "ve"]


def check_scheduler_config(config: Mapping[str, Any], path: str | os.PathLike[str] | None = None,
                           limits: Limits = LIMITS) -> None:
    """Refuse a noise schedule the samplers cannot run (see the module doc); ``path`` names the
    file in the message. Every non-VE sampler of ``diffcleanse.samplers`` is built from it."""
    cls_name = config.get("_class_name", "DDPMScheduler")
    T = config.get("num_train_timesteps", 1000)
    if not (isinstance(T, int) and not isinstance(T, bool) and 2 <= T <= limits.max_timesteps):
        raise InputRefused(path, f"num_train_timesteps {T!r} must be a whole number in "
                                 f"[2, {limits.max_timesteps:,}]")
    bad = next(_non_finite(dict(config)), None)
    if bad:
        raise InputRefused(path, f"{bad} is not a finite number")
    if cls_name in VE_SCHEDULERS or "sigma_max" in config:
        lo, hi = config.get("sigma_min"), config.get("sigma_max")
        if lo is not None and hi is not None and not (0 < float(lo) < float(hi)):
            raise InputRefused(path, f"sigma_min {lo} / sigma_max {hi}: need 0 < sigma_min < "
                                     f"sigma_max")
        return
    pred = config.get("prediction_type", "epsilon")
    if pred != "epsilon":
        raise InputRefused(path, f"prediction_type {pred!r}: the samplers and attacks here read "
                                 f"the denoiser's output as epsilon (prediction_type 'epsilon')")
    var = config.get("variance_type")
    if isinstance(var, str) and var.startswith("learned"):
        raise InputRefused(path, f"variance_type {var!r}: a learned variance needs the denoiser's "
                                 f"second output half, which the samplers do not read")
    betas = config.get("trained_betas")
    if betas is not None:
        if not (isinstance(betas, list) and len(betas) == T
                and all(isinstance(b, (int, float)) and 0 < b < 1 for b in betas)):
            raise InputRefused(path, f"trained_betas must be {T} numbers in (0, 1)")
    else:
        lo, hi = config.get("beta_start", 1e-4), config.get("beta_end", 0.02)
        if not (isinstance(lo, (int, float)) and isinstance(hi, (int, float))
                and 0 < lo < 1 and 0 < hi < 1):
            raise InputRefused(path, f"beta_start {lo!r} / beta_end {hi!r} must be in (0, 1)")
    import warnings

    import numpy as np

    from diffcleanse.samplers import SamplerSpec

    base = {k: v for k, v in config.items() if not k.startswith("_")}
    for entry in _probe_samplers():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sched = entry.make(base, SamplerSpec(entry.name, steps=min(T, 10)))
        except Exception as err:  # diffusers: "... is not implemented for <class>"
            raise InputRefused(path, f"sampler {entry.name!r} ({entry.scheduler}) cannot use this "
                                     f"schedule (beta_schedule "
                                     f"{config.get('beta_schedule', 'linear')!r}): "
                                     f"{type(err).__name__}: {err}") from err
        if entry.name == "ddpm":
            ac = np.asarray(sched.alphas_cumprod, dtype=np.float64)
            if not (np.isfinite(ac).all() and (ac > 0).all() and (ac <= 1).all()
                    and (np.diff(ac) <= 0).all()):
                raise InputRefused(path, "the schedule's cumulative alphas are not finite, "
                                         "in (0, 1] and non-increasing")


# ---------------------------------------------------------------- the entry point


def model_components(path: Path) -> list[Path]:
    """Folders of ``path`` that hold a component config (``config.json``): the flat layout's
    root, and ``unet/``, ``vae/``, ... of the pipeline layout."""
    out = [path] if (path / "config.json").is_file() else []
    out += sorted(d for d in path.iterdir() if d.is_dir() and (d / "config.json").is_file())
    return out


def check_model_dir(path: str | os.PathLike[str], allow_pickle: bool = False, *,
                    limits: Limits = LIMITS) -> None:
    """Refuse a hostile model directory before anything of it is loaded (see the module doc).

    Checks the tree (entry kinds, symlinks), every JSON file's size, every component folder
    (class, sizes, safetensors headers against the config's shapes) and every scheduler config.
    Pickle files are not opened: whether they may be loaded is the loader's ``allow_pickle``.
    """
    root = Path(path)
    files = check_tree(root, limits)
    for f in files:
        if f.suffix == ".json":
            read_json(f, limits)
        elif f.suffix == ".safetensors":
            safetensors_header(f, limits)
    comps = model_components(root)
    for comp in comps:
        config = read_json(comp / "config.json", limits)
        if isinstance(config, dict) and str(config.get("_class_name", "")).endswith("Scheduler"):
            continue  # a flat layout's scheduler saved as config.json
        check_component(comp, allow_pickle=allow_pickle, limits=limits)
    for f in files:
        if f.name in SCHEDULER_FILES:
            cfg = read_json(f, limits)
            if not isinstance(cfg, dict):
                raise InputRefused(f, "is not a JSON object")
            check_scheduler_config(cfg, f, limits)


# ---------------------------------------------------------------- the hub


def hub_offline() -> bool:
    """Whether hub access is switched off (``HF_HUB_OFFLINE``, read now, or huggingface_hub's
    own flag, which it reads once at import)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def cached_revisions(repo: str, cache_dir: str | os.PathLike[str] | None = None) -> dict[str, str]:
    """Revisions of ``repo`` in the local hub cache: ref name (or commit) -> commit."""
    from huggingface_hub import constants

    base = Path(cache_dir or constants.HF_HUB_CACHE) / ("models--" + repo.replace("/", "--"))
    out: dict[str, str] = {}
    refs = base / "refs"
    if refs.is_dir():
        for f in sorted(p for p in refs.rglob("*") if p.is_file()):
            out[f.relative_to(refs).as_posix()] = f.read_text()[:64].strip()
    snaps = base / "snapshots"
    if snaps.is_dir():
        for d in sorted(snaps.iterdir()):
            if d.name not in out.values():
                out[d.name] = d.name
    return out


def hub_snapshot(repo: str, revision: str | None, allow_patterns: list[str], *,
                 cache_dir: str | None = None, endpoint: str | None = None,
                 timeout: float | None = None, offline: bool | None = None) -> Path:
    """A local snapshot of ``repo`` at ``revision`` with bounded waits.

    Offline: the cache only (at once), or an error naming the revisions the cache holds. Online:
    the revision is resolved with one request of at most ``timeout`` seconds (default
    ``HF_HUB_ETAG_TIMEOUT``, 10 s): a revision or repository that does not exist is reported at
    once; a hub that cannot be reached or does not answer falls back to the cache.
    """
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    name = f"{repo}@{revision}" if revision else repo
    offline = hub_offline() if offline is None else offline
    timeout = float(constants.HF_HUB_ETAG_TIMEOUT if timeout is None else timeout)
    where = endpoint or constants.ENDPOINT
    fix = (f"download it where there is internet (hf download {repo}"
           f"{' --revision ' + revision if revision else ''}) and point HF_HOME at that cache, "
           f"or use local:<dir>")

    def from_cache(reason: str) -> Path:
        try:
            return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns,
                                          cache_dir=cache_dir, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError) as err:
            cached = cached_revisions(repo, cache_dir)
            held = (", ".join(f"{k} -> {v[:12]}" if k != v else k[:12] for k, v in cached.items())
                    if cached else "nothing")
            raise InputRefused(None, f"hub model {name}: {reason}, and revision "
                                     f"{revision or 'main'!r} is not in the local hub cache "
                                     f"(which holds {held} of {repo}). Use a cached revision, "
                                     f"or {fix}.") from err

    if offline:
        return from_cache("HF_HUB_OFFLINE is set, so the hub was not asked")
    api = HfApi(endpoint=endpoint)
    try:
        info = api.model_info(repo, revision=revision, timeout=timeout)
    except RevisionNotFoundError as err:
        raise InputRefused(None, f"hub model {name}: revision {revision!r} does not exist in "
                                 f"{repo} on {where}; give an existing branch, tag or commit "
                                 f"after @") from err
    except RepositoryNotFoundError as err:
        raise InputRefused(None, f"hub model {name}: repository {repo!r} does not exist on "
                                 f"{where} (or is private or gated: log in with hf auth login)"
                           ) from err
    except Exception as err:  # no route, DNS failure, a hub that does not answer, 5xx
        http = type(err).__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2",
                                                      "requests", "urllib3")
        if not (http or isinstance(err, (HfHubHTTPError, OSError))):
            raise
        kind = (f"did not answer within {timeout:g} s" if "Timeout" in type(err).__name__ else
                f"could not be reached ({type(err).__name__})")
        return from_cache(f"the hub at {where} {kind}; HF_HUB_OFFLINE=1 skips the hub at once")
    return Path(snapshot_download(repo, revision=info.sha, allow_patterns=allow_patterns,
                                  cache_dir=cache_dir, endpoint=endpoint, etag_timeout=timeout))


# ---------------------------------------------------------------- images and local paths


def open_image(path: str | os.PathLike[str], *, limits: Limits = LIMITS,
               what: str = "image file"):
    """A decoded PIL image from an untrusted file: a safe format (``IMAGE_FORMATS``), at most
    ``limits.max_image_bytes`` on disk and ``limits.max_image_pixels`` pixels, checked from the
    header before the pixels are decoded; the first frame of animations."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise InputRefused(p, f"{what} does not exist (or is not a plain file)")
    size = p.stat().st_size
    if size > limits.max_image_bytes:
        raise InputRefused(p, f"{what} is {size:,} bytes (limit {limits.max_image_bytes:,})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our bound is tighter
        try:
            im = Image.open(p, formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as err:
            raise InputRefused(p, f"{what} is a decompression bomb, refused before decoding "
                                  f"({err})") from err
        except UnidentifiedImageError as err:
            raise InputRefused(p, f"{what} is not an image in a supported format "
                                  f"({', '.join(IMAGE_FORMATS)})") from err
        except OSError as err:
            raise InputRefused(p, f"{what} cannot be read ({err})") from err
    with im:
        w, h = im.size
        if w * h > limits.max_image_pixels or w <= 0 or h <= 0:
            raise InputRefused(p, f"{what} declares {w}x{h} pixels (limit "
                                  f"{limits.max_image_pixels:,} pixels), refused before "
                                  f"decoding (a decompression bomb?)")
        try:
            im.seek(0)
            im.load()
        except (OSError, ValueError, SyntaxError) as err:
            raise InputRefused(p, f"{what} cannot be decoded ({err}): truncated or corrupt"
                               ) from err
        return im.copy()


def _manifest_paths(row: Mapping[str, Any]) -> Iterable[tuple[str, str]]:
    source = str(row.get("source") or "")
    if source.startswith("local:"):
        yield "source", source.removeprefix("local:")
    dataset = str(row.get("dataset") or "")
    if dataset.startswith("folder:"):
        yield "dataset", dataset.removeprefix("folder:")
    for col in ("trigger", "target"):
        value = str(row.get(col) or "")
        if value.startswith("file:"):
            yield col, value.removeprefix("file:")
        elif value.startswith("tensor:"):  # tensor:<key>:<file.safetensors>
            yield col, value.removeprefix("tensor:").partition(":")[2]


def check_confined(path: str | os.PathLike[str], root: str | os.PathLike[str],
                   what: str = "path") -> Path:
    """``path`` (symlinks resolved, relative to the working directory) lies inside ``root``."""
    real, real_root = Path(os.path.realpath(path)), Path(os.path.realpath(root))
    if not _within(real, real_root):
        raise InputRefused(path, f"{what} resolves to {real}, outside the data root "
                                 f"{real_root} (data.confine_local is true: move it under "
                                 f"data.root, or set data.confine_local: false)")
    return real


def check_manifest_paths(rows: Iterable[Mapping[str, Any]], data_root: str | os.PathLike[str],
                         confine: bool) -> None:
    """With ``confine``, every local path of the manifest (``local:`` sources, ``folder:``
    datasets, ``file:`` and ``tensor:`` triggers and targets) must lie inside ``data_root``; all
    offending rows are reported at once."""
    if not confine:
        return
    problems = []
    for row in rows:
        for col, value in _manifest_paths(row):
            try:
                check_confined(value, data_root, f"{row.get('model_id')}: column {col}")
            except InputRefused as err:
                problems.append(str(err))
    if problems:
        raise InputRefused(None, f"{len(problems)} manifest path(s) escape the data root:\n  - "
                                 + "\n  - ".join(problems))
