"""``diffcleanse scan``: stage 1 on one model outside the workflow, with any or all methods.

Settings are the paper's protocol (BBTI with its Appendix D values, preceded by the exploration of
``SCAN_BBTI_DEFAULTS``; the pixels encoder because it needs no weights), or with ``config`` a
workflow config's ``inversion:`` and ``detection:`` sections
(validated against the workflow's schema, defaults filled in as Snakemake does); explicit options
override either. Each method runs with the workflow's seeds for (seed, model name, method, seed
index 0), so a scan and the workflow give the same numbers for the same settings.

Outputs (``out_dir``): ``record.json`` (the combined verdict: flagged when any method's trigger
reaches κ_d, every method's evidence kept), and the chosen trigger's ``trigger.safetensors``,
``trigger.png``, ``samples.png`` and ``samples.safetensors``; with several methods, each method's
own files under ``method~<name>/``. They appear all together or not at all. While a scan runs, its
resumable state lives in ``.<out_dir name>.state/`` beside ``out_dir``: an interrupted scan started
again with the same settings resumes from its last iteration (BBTI) and skips finished methods.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from diffcleanse import detection, samplers
from diffcleanse.inversion.base import InversionError

log = logging.getLogger(__name__)

SCAN_FILES = {"trigger": "trigger.safetensors", "trigger_png": "trigger.png",
              "samples_png": "samples.png", "samples": "samples.safetensors",
              "record": "record.json"}
# the paper's protocol (Appendix D) for BBTI; the library defaults are the paper's already
PAPER_BATCH_BY_SIZE = {32: 100, 64: 50, 256: 20}
# ... with one departure when no config is given: BBTI first samples 24 coarse random triggers,
# then 16 patches (one cell of a 2 x 2 grid at ±0.25, ±0.5) (inversion.bbti.explore,
# explore_patches; docs/detection.md: the paper's Algorithm 1 alone missed every BadDiffusion
# backdoor of both zoos, the exploration flagged them; --explore 0 is the paper's)
SCAN_BBTI_DEFAULTS = {"explore": 24, "explore_patches": [2]}


class ScanError(ValueError):
    """The scan cannot run as asked (a bad option, config or model)."""


def _with_defaults(schema: dict[str, Any], instance: dict[str, Any]) -> dict[str, Any]:
    """``instance`` validated against ``schema`` with every ``default`` filled in (recursively),
    as Snakemake's ``validate(..., set_default=True)`` does."""
    import jsonschema

    def set_defaults(validator, properties, inst, sch):
        if isinstance(inst, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in inst:
                    inst[key] = sub["default"]
        yield from jsonschema.Draft202012Validator.VALIDATORS["properties"](
            validator, properties, inst, sch)

    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator,
                                       {"properties": set_defaults})
    errors = sorted(cls(schema).iter_errors(instance), key=lambda e: list(e.path))
    if errors:
        e = errors[0]
        where = ".".join(map(str, e.path)) or "(top level)"
        raise ScanError(f"{where}: {e.message}")
    return instance


def load_scan_config(path: str | Path) -> dict[str, Any]:
    """The ``inversion:`` and ``detection:`` sections of a workflow config file (``--config``),
    validated against the workflow's config schema with its defaults."""
    import yaml

    from diffcleanse.manifest import load_schema

    path = Path(path)
    if not path.is_file():
        raise ScanError(f"config file {path} does not exist (--config)")
    cfg = yaml.safe_load(path.read_text())
    if not isinstance(cfg, dict) or not isinstance(cfg.get("inversion"), dict):
        raise ScanError(f"{path} has no `inversion:` section: pass a workflow config such as "
                        f"config.yaml (--config)")
    schema = load_schema("config.schema.yaml")
    out = {}
    for key in ("inversion", "detection"):
        section = dict(cfg.get(key) or {})
        if not isinstance(cfg.get(key, {}), dict):
            raise ScanError(f"{path}: `{key}:` must be a mapping (--config)")
        try:
            out[key] = _with_defaults(schema["properties"][key], section)
        except ScanError as err:
            raise ScanError(f"{path}: {key}.{err} (--config)") from err
    return out


def sampler_for(value: str | dict | None, size: int) -> str:
    """The scan's sampler from a config's ``inversion.sampler`` (``samplers.configured`` for a
    model known only by its image size); ``manifest`` and no setting mean ``ddpm``."""
    try:
        return samplers.configured(value, {"image_size": size}, "ddpm")
    except KeyError as err:
        raise ScanError(f"{err.args[0]} (--config), or name the sampler with --sampler") from None


def batch_for(value: int | dict, size: int, where: str) -> int:
    """A batch size given as a number or as a mapping image size -> batch."""
    if isinstance(value, dict):
        table = {int(k): int(v) for k, v in value.items()}
        if size not in table:
            raise ScanError(f"{where} gives no batch for {size}-pixel images (it has "
                            f"{', '.join(map(str, sorted(table)))}): set --batch-size")
        return table[size]
    return int(value)


def resolve_encoder(encoder: str | None, detect_cfg: dict[str, Any]) -> tuple[str, str]:
    """(encoder spec, clip model) from ``--encoder`` or the config's ``detection.encoder``."""
    clip_model = detect_cfg.get("clip_model", "ViT-B-32")
    if encoder:
        return encoder, clip_model
    kind = detect_cfg.get("encoder")
    if kind is None:
        return "pixels", clip_model
    if kind == "classifier":
        raise ScanError("the config's detection.encoder is `classifier`, which needs the "
                        "classifier of the model's dataset: pass --encoder classifier:<dir> (the "
                        "workflow's results/classifiers/<dataset>_<size>) or another --encoder "
                        "(pixels, clip:<weights>)")
    if kind == "clip":
        return f"clip:{detect_cfg.get('clip_pretrained') or 'openai'}", clip_model
    return str(kind), clip_model


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                     and not (out_dir / "record.json").is_file())):
        raise ScanError(f"{out_dir} exists and is not an earlier scan's output: choose --out")


def state_dir_for(out_dir: Path) -> Path:
    """Where an unfinished scan keeps its state (beside ``out_dir``)."""
    return out_dir.parent / f".{out_dir.name}.state"


def _progress(method: str, verbose: bool, total: int | None):
    """A progress callback: a tqdm bar on stderr, or one printed line per iteration or
    exploration candidate, each with its place in the method's budget (``total`` sampling
    rounds: candidates and iterations together)."""
    if not verbose:
        return True  # run_method's own tqdm bar
    t0 = time.time()
    rounds = itertools.count(1)

    def report(row: dict[str, Any]) -> None:
        n = next(rounds)
        extra = " ".join(f"{k} {row[k]:.4g}" for k in ("mscr", "loss", "trigger_norm")
                         if isinstance(row.get(k), float))
        start = f"start {row['start']} " if "start" in row else ""
        if row.get("phase") == "explore":
            kind = "patch candidate" if row.get("patch") else "candidate"
            where = f"{kind} {row['candidate']} (grid {row['grid']})"
        else:
            where = f"iteration {row.get('iteration', row.get('epoch', '?'))}"
        of = f" [{n}/{total}]" if total else ""
        print(f"  [{method}] {start}{where}{of}: {extra} ({time.time() - t0:.0f} s)", flush=True)

    return report


def scan_model(model: str, out_dir: str | Path, *, methods: list[str] | None = None,
               sampler: str | None = None, steps: int | None = None,
               encoder: str | None = None, target_kind: str = "image", seed: int = 0,
               allow_pickle: bool = False, image_size: int | None = None, device: str = "auto",
               threads: int | None = None, batch_size: int | None = None,
               method_overrides: dict[str, dict[str, Any]] | None = None,
               config: dict[str, Any] | None = None, verbose: bool = False,
               started: float | None = None) -> dict[str, Any]:
    """Scan one model (module doc); returns the combined record. Every check (model, channels,
    weights, encoder, settings) runs before anything is written."""
    from diffcleanse import encoders, models
    from diffcleanse.inversion import get_method
    from diffcleanse.inversion.run import inversion_record, run_method, save_outputs, seeds_for
    from diffcleanse.records import atomic_path, make_record, read_json, write_json

    t_start = started if started is not None else time.time()
    if threads:
        torch.set_num_threads(int(threads))
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    config = config or {}
    inv_cfg = dict(config.get("inversion") or {})
    det_cfg = dict(config.get("detection") or {})
    methods = list(methods or inv_cfg.get("methods") or ["bbti"])
    dev = str(samplers_device(device))
    own: dict[str, dict[str, Any]] = {}
    for m in methods:
        meth = get_method(m)
        base = (SCAN_BBTI_DEFAULTS if m == "bbti" and not config else {})
        own[m] = {**base, **(inv_cfg.get(m) or {}), **((method_overrides or {}).get(m) or {})}
        meth.make_spec(own[m], where=f"inversion.{m} (--config / options)")
    det_params = {k: v for k, v in det_cfg.items() if k != "population"}
    det_params["target_kind"] = target_kind
    detect = detection.spec_from_params(det_params)
    enc_spec, clip_model = resolve_encoder(encoder, det_cfg)
    local = models.fetch(model, allow_pickle=allow_pickle)
    t_load = time.time()
    dm = models.load_pipeline(local, allow_pickle=allow_pickle, device=dev)
    for m in methods:
        get_method(m).check_model(dm)
    if dm.space_shape[0] != 3 and dm.vae is None:
        raise InversionError(f"{model}: the model takes {dm.space_shape[0]}-channel inputs; the "
                             f"encoders need RGB (3 channels)")
    size = dm.space_shape[-1]
    if image_size is not None and size != image_size:
        raise InversionError(f"{model}: the model makes {size}-pixel images, not {image_size}")
    spec = samplers.SamplerSpec(name=sampler or sampler_for(inv_cfg.get("sampler"), size),
                                steps=steps or inv_cfg.get("steps"))
    batch = batch_size or batch_for(inv_cfg.get("batch_size", PAPER_BATCH_BY_SIZE.get(size, 16)),
                                    size, "inversion.batch_size")
    enc = encoders.make_encoder(enc_spec, clip_model=clip_model, device=dev)
    model_id = scan_model_id(model)
    state_root = state_dir_for(out_dir)
    load_seconds = time.time() - t_load
    results = {}
    for m in methods:
        done = state_root / m / "done"
        seeds = seeds_for(seed, model_id, m, 0)
        if (done / "record.json").is_file():  # finished before an interruption: keep it
            results[m] = (None, read_json(done / "record.json"), done)
            log.info("%s: kept the finished result in %s", m, done)
            continue
        (state_root / m).mkdir(parents=True, exist_ok=True)
        meth = get_method(m)
        prog = _progress(m, verbose, meth.budget(meth.make_spec(own[m])))
        res = run_method(dm, m, own[m], detect, enc, sampler=spec, batch_size=batch,
                         seed=seeds["method"], noise_seed=seeds["verdict_noise"], progress=prog,
                         state_dir=state_root / m)
        rec = inversion_record(res, model=model_id, sampler=spec, detect=detect, encoder=enc,
                               batch_size=batch, seeds=seeds, seed_index=0, params=own[m],
                               extra={"base_seed": seed, "model_dir": str(local),
                                      "model": str(model)})
        with atomic_path(done) as tmp:
            tmp.mkdir()
            save_outputs(res, {k: tmp / v for k, v in SCAN_FILES.items()}, rec)
        results[m] = (res, rec, done)
    order = {m: i for i, m in enumerate(methods)}
    best = max(results, key=lambda m: (results[m][1]["mscr"], -order[m]))
    flagged = [m for m in methods if results[m][1]["backdoored"]]
    combined = make_record(
        "scan", {"inversion": {"methods": methods, "batch_size": batch, **own},
                 "detection": detect.describe(), "encoder": enc.describe(),
                 "sampler": spec.describe(), "base_seed": seed},
        seed, 0.0, model=str(model), model_dir=str(local), methods=methods,
        backdoored=bool(flagged), verdict="backdoored" if flagged else "clean",
        flagged_by=flagged, trigger_method=best, mscr=results[best][1]["mscr"],
        kappa_d=detect.kappa_d, active_kappa=detect.active_kappa,
        rule="backdoored when any method's trigger reaches kappa_d (MSCR, model's sampler)",
        by_method={m: {k: results[m][1][k] for k in (
            "mscr", "verdict", "iterations", "seconds", "statistics", "unet_evals_per_second",
            "seeds", "trigger_norm")} | {"readings": results[m][1]["detection"]["readings"]}
            for m in methods},
        params_by_method={m: results[m][1]["details"]["spec"] for m in methods},
        sampler=spec.describe(), batch_size=batch, encoder=enc.name,
        load_seconds=round(load_seconds, 3))
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name in SCAN_FILES.values():
            if name != "record.json":
                shutil.copyfile(results[best][2] / name, tmp / name)
        if len(methods) > 1:
            for m in methods:
                shutil.copytree(results[m][2], tmp / f"method~{m}")
        combined["seconds"] = round(time.time() - t_start, 3)
        combined["seconds_note"] = "from process start: imports, loading, every method, writing"
        write_json(tmp / "record.json", combined)
    shutil.rmtree(state_root, ignore_errors=True)
    return combined


def scan_model_id(model: str) -> str:
    """The id a scan seeds with: the directory's name (its parent's for a workflow zoo model,
    ``results/models/<id>/model``) or the hub repo's name, as the workflow's model id would be."""
    p = Path(str(model).removeprefix("local:").removeprefix("hub:").split("@")[0].rstrip("/"))
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def samplers_device(name: str) -> torch.device:
    """The torch device (``auto``: CUDA when present); a missing GPU is a clear error."""
    from diffcleanse.sampling import resolve_device

    return resolve_device(name)


def scan_summary(record: dict[str, Any], out_dir: str | Path) -> str:
    """The lines ``diffcleanse scan`` prints."""
    s = record["sampler"]
    lines = [
        f"{record['model']}: {record['verdict'].upper()} (best MSCR {record['mscr']:.3f} "
        f"{'>=' if record['backdoored'] else '<'} κ_d {record['kappa_d']}, κ = "
        f"{record['active_kappa']}; trigger from {record['trigger_method']})",
        f"  encoder {record['encoder']}; {s['name']} {s['steps'] or 'all'} steps, clip_sample="
        f"{s['clip_sample']}; batch {record['batch_size']}; seed {record['seed']}; "
        f"precision {record.get('precision', 'fp32')}"]
    for m, r in record["by_method"].items():
        lines.append(f"  {m:13s} MSCR {r['mscr']:.3f} -> {r['verdict']:10s} "
                     f"{r['iterations']} iterations, {r['seconds']:.1f} s "
                     f"({r['unet_evals_per_second']:.0f} UNet evaluations/s)")
    lines.append(f"  {record['seconds']:.1f} s in all (start-up and loading included)")
    lines.append(f"  wrote {Path(out_dir) / 'record.json'}, trigger.safetensors, trigger.png, "
                 f"samples.png" + (", method~<name>/ per method" if len(record["methods"]) > 1
                                    else ""))
    return "\n".join(lines)
