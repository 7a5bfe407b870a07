"""What a workflow plan costs: UNet image-evaluations per stage, counted from the config and the
manifest, times what one evaluation costs on a device (measured), plus a fixed cost per job.

Every heavy stage of the chain is, to first order, a number of UNet calls on single images: a
batch of B samples through S sampler steps is B·S·c image-evaluations, with c the UNet calls per
step of the sampler (1 for DDPM and DDIM, about 2 for Heun; ``unet_calls`` counts them by
running the sampler); an optimiser step on a batch of B is B evaluations with a backward pass.
``plan_work`` counts, per model and rule, the evaluations without gradient (``forward``) and with
one (``backward``, each a forward and a backward pass) that the config asks for:

* ``train_model`` (``train_adaptive`` for the adaptive attack's rows): ``train_steps ×
  train.batch_size`` backward (rows trained here);
* ``invert_trigger``: BBTI's ``max_iters`` iterations (an upper bound: a model flagged early stops
  sooner) of the verdict batch through the backdoor sampler's chain, ``2·zo_directions + 1`` such
  passes per iteration for ``zeroth_order`` and a backward through ``whitebox_steps`` steps for
  ``whitebox`` (its checkpointing counted as the extra forward it is), plus ``explore`` passes per
  start for the candidates sampled before the first step; Elijah's epochs of one UNet
  call at T on its batch plus one verdict pass; TERD's stage 1 (two calls per row) and stage 2
  (its ``refine_steps`` chain and four calls per row, the chain's checkpoint recomputes counted
  as forwards) on its batch, plus one verdict pass; per seed (PureDiffusion: start-up only);
* ``clean_data``: the synthetic clean images through the clean sampler's chain;
* ``importance``: the importance batch through one ascending pass over the clean timesteps (t > T,
  or every timestep when a score or Diff-Pruning's prefix needs them: an upper bound) and one over
  the backdoor timesteps, per trigger source;
* ``finetune``: ``FinetuneConfig.steps`` optimiser steps on the batch, with loss_p's frozen
  teacher as one more forward per image;
* ``evaluate``: per model state (original, every pruned and fine-tuned state), the FID samples and
  for backdoored models the ASR samples with the real and the inverted trigger (and, for the
  original state, with each inversion method's trigger), through the chain;
* ``gallery``: its clean and triggered samples; ``ablate_entropy_loss`` (Table 3): BBTI again
  without l_e, and the ASR of its trigger; ``ablate_threshold`` (Fig. 6): the importance at each
  threshold and the pruned state's evaluation; ``removal_ablation``: per job a measurement of the
  original, then per seed an importance pass and per variant a measured pruned state, a loss_p
  fine-tuning and a measured fine-tuned state.

Rules not listed cost their jobs' fixed start-up only (``UNMODELLED`` names the heavier ones
among them). Stage 1's verdicts are not known before it runs: removal is counted on every
backdoored model of the manifest (``run_on: flagged`` runs it on the flagged ones), or on the
models that ``run_on`` lists. Seconds per
evaluation come from ``measure_rates`` (a plain batched forward, and forward+backward, of each
architecture with random weights on the device, at the batch each stage uses) or a rates file
measured elsewhere (``benchmarks/cost_model.py --rates``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from diffcleanse import permodel

# Architectures of the hub models the paper's zoo starts from (their published diffusers configs;
# random weights are enough for speed). Rows trained from scratch use config models.unet instead.
HUB_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "hub-ddpm-32": {  # google/ddpm-cifar10-32, 35.7 M parameters
        "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
        "block_out_channels": (128, 256, 256, 256),
        "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        "timesteps": 1000,
    },
    "hub-ddpm-256": {  # google/ddpm-celebahq-256 and its EMA twin, 113.7 M parameters
        "sample_size": 256, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
        "block_out_channels": (128, 128, 256, 256, 512, 512),
        "down_block_types": ("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
        "timesteps": 1000,
    },
    "hub-ldm-256": {  # CompVis/ldm-celebahq-256: the UNet on 3 x 64 x 64 latents
        "sample_size": 64, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
        "block_out_channels": (224, 448, 672, 896), "attention_head_dim": 32,
        "down_block_types": ("DownBlock2D",) + ("AttnDownBlock2D",) * 3,
        "up_block_types": ("AttnUpBlock2D",) * 3 + ("UpBlock2D",),
        "timesteps": 1000,
    },
}
# Heavy rules whose work this model does not count (their jobs count at the fixed cost only).
UNMODELLED = ("adaptive_snapshot_eval", "elijah_removal", "fid_reference", "train_classifier",
              "train_target_classifier")


@dataclass
class Work:
    """The UNet image-evaluations of one rule for one model (summed over its jobs)."""

    rule: str
    model: str
    arch: str
    forward: float = 0.0
    backward: float = 0.0
    jobs: int = 1
    sampled: float = 0.0  # the part of ``forward`` that is sampler steps (grows with steps)
    batch: int = 1  # the batch the evaluations run in (per-image cost falls with the batch)


@dataclass
class Rate:
    """Seconds per image-evaluation of one architecture on one device."""

    forward_s: float
    backward_s: float
    batch: int
    params: int
    note: str = ""


@dataclass
class Plan:
    """Every model's work, and what was left out."""

    work: list[Work] = field(default_factory=list)
    architectures: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


_COUNTS: dict[tuple[str, str, int], int] = {}


def _count_calls(sampler: str, model_type: str, steps: int) -> int:
    """UNet calls of a full ``steps``-step chain of ``sampler``, counted on a tiny model."""
    key = (sampler, model_type, steps)
    if key in _COUNTS:
        return _COUNTS[key]
    import torch

    from diffcleanse import models, samplers

    torch.manual_seed(0)
    if model_type == "ncsn" or samplers.get(sampler).family == "ve":
        unet = models.build_ncsn_unet(8, block_out_channels=(8, 16), attention=False,
                                      norm_num_groups=4)
        sched = models.build_ncsn_scheduler(steps)
    else:
        unet = models.build_unet(8, (8, 16), attention=False, norm_num_groups=4)
        sched = models.build_scheduler(steps)
    calls = 0

    def count(*_: Any) -> None:
        nonlocal calls
        calls += 1

    with torch.no_grad():
        samplers.denoise(unet.eval(), dict(sched.config), torch.randn(1, 3, 8, 8),
                         samplers.SamplerSpec(sampler), seeds=[0], on_step=count)
    _COUNTS[key] = calls
    return calls


def unet_calls(sampler: str, steps: int, model_type: str = "ddpm") -> float:
    """UNet calls of one sample's ``steps``-step chain: counted by running the sampler at 8 and
    16 steps on a tiny model and extended linearly (calls = a·steps + b: Heun's 2·steps − 1, the
    VE predictor-corrector's 2·steps)."""
    c8, c16 = _count_calls(sampler, model_type, 8), _count_calls(sampler, model_type, 16)
    slope = (c16 - c8) / 8
    return c8 + slope * (steps - 8)


def _rows(manifest) -> dict[str, dict[str, Any]]:
    """The manifest frame as plain dicts by model id."""
    out = {}
    for mid in manifest.index:
        r = {k: (v.item() if hasattr(v, "item") else v) for k, v in manifest.loc[mid].items()}
        r["model_id"] = mid
        out[mid] = r
    return out


def _hub_root(mid: str, rows: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The hub row a model's weights start from (following ``init``), or None."""
    seen = set()
    while mid and mid not in seen:
        seen.add(mid)
        r = rows[mid]
        if str(r["source"]).startswith("hub:"):
            return r
        mid = str(r.get("init") or "")
    return None


def architecture_of(mid: str, rows: Mapping[str, Mapping[str, Any]], config: Mapping[str, Any]
                    ) -> tuple[str, dict[str, Any]]:
    """(key, UNet2DModel config + ``timesteps``) of a model: its hub root's architecture, else
    config models.unet at the row's size (as ``zoo`` trains it)."""
    r = rows[mid]
    hub = _hub_root(mid, rows)
    size = int(r["image_size"])
    if hub is not None:
        key = f"hub-{hub['model_type']}-{size}"
        if key not in HUB_ARCHITECTURES:
            raise KeyError(f"{mid}: no architecture for {hub['source']} ({key}); add it to "
                           f"cost_model.HUB_ARCHITECTURES")
        return key, dict(HUB_ARCHITECTURES[key])
    u = config["models"]["unet"]
    n = len(u["block_out_channels"])
    down, up = ["DownBlock2D"] * n, ["UpBlock2D"] * n
    if u.get("attention", True):
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    arch = {"sample_size": size, "in_channels": 3, "out_channels": 3,
            "layers_per_block": u.get("layers_per_block", 1),
            "block_out_channels": tuple(u["block_out_channels"]),
            "norm_num_groups": u.get("norm_num_groups", 8),
            "attention_head_dim": u.get("attention_head_dim", 8),
            "down_block_types": tuple(down), "up_block_types": tuple(up),
            "timesteps": int(config["models"]["scheduler"]["num_train_timesteps"])}
    if r["model_type"] == "ncsn":
        arch |= {"time_embedding_type": "fourier", "flip_sin_to_cos": True}
    width = "x".join(str(c) for c in arch["block_out_channels"])
    return f"{r['model_type']}-{size}-{width}-l{arch['layers_per_block']}", arch


def _chain(steps: Any, arch: Mapping[str, Any]) -> int:
    """Sampler steps: the configured number, or the model's full chain."""
    return int(steps) if steps else int(arch["timesteps"])


def _by_size(value: Any, r: Mapping[str, Any], key: str) -> Any:
    """A config value resolved for one model (``permodel``: by image size, group, ...)."""
    return permodel.resolve(value, r, key)


def plan_work(config: Mapping[str, Any], manifest) -> Plan:
    """The UNet work of every model's chain under ``config`` (a merged workflow config)."""
    from diffcleanse.inversion import get_method
    from diffcleanse.removal import methods as removal_methods
    from diffcleanse.removal.finetune import FinetuneConfig
    from diffcleanse.removal.importance import threshold_timestep

    rows = _rows(manifest)
    plan = Plan()
    inv, det_methods = config["inversion"], list(config["inversion"]["methods"])
    rem, ev, train = config["removal"], config["evaluation"], config["train"]
    seeds = len(inv.get("seeds", [0]))
    for mid, r in rows.items():
        key, arch = architecture_of(mid, rows, config)
        plan.architectures[key] = arch
        sampler, mtype = str(r["sampler"]), str(r["model_type"])
        T = int(arch["timesteps"])

        def chain(steps: Any, name: str = sampler, _mtype: str = mtype, _arch=arch) -> float:
            """UNet calls of one sample through ``name``'s chain (configured steps or full)."""
            return unet_calls(name, _chain(steps, _arch), _mtype)

        def add(rule: str, forward: float = 0.0, backward: float = 0.0, jobs: int = 1,
                sampled: float = 0.0, batch: int = 1, _mid: str = mid, _key: str = key) -> None:
            plan.work.append(Work(rule, _mid, _key, forward, backward, jobs, sampled,
                                  max(1, int(batch))))

        if r["source"] == "train":
            batch = _by_size(train["batch_size"], r, "train.batch_size")
            rule = "train_adaptive" if r["attack"] == "adaptive" else "train_model"
            add(rule, backward=float(r["train_steps"]) * batch, batch=batch)
        else:
            add("fetch_model")
        # stage 1: every configured method that supports the row's model type
        B = int(_by_size(inv["batch_size"], r, "inversion.batch_size"))
        S = chain(inv.get("steps"))
        for method in det_methods:
            if r["model_type"] not in get_method(method).model_types:
                continue  # the workflow leaves the pair out (common.smk _check_methods)
            if method == "bbti":
                b = inv.get("bbti", {})
                iters = int(b.get("max_iters", 100))
                grad = b.get("gradient", "blackbox")
                explore = int(b.get("explore", 0)) * int(b.get("restarts", 1))
                if grad == "whitebox":
                    passes = iters * B * chain(b.get("whitebox_steps"))
                    verdict = (iters + explore) * B * S
                    add("invert_trigger", forward=(passes + verdict) * seeds,
                        backward=passes * seeds, jobs=seeds, sampled=(passes + verdict) * seeds,
                        batch=B * int(b.get("restarts", 1)))
                    continue
                per_iter = 2 * int(b.get("zo_directions", 6)) + 1 if grad == "zeroth_order" else 1
                f = (iters * per_iter + explore) * B * S * seeds
                add("invert_trigger", forward=f, jobs=seeds, sampled=f,
                    batch=B * int(b.get("restarts", 1)))
            elif method == "elijah":
                e = inv.get("elijah", {}) or {}
                epochs = int(e.get("epochs") or 100)
                f = B * S * seeds
                add("invert_trigger", forward=f, backward=epochs * B * seeds, jobs=seeds,
                    sampled=f, batch=B)
            elif method == "terd":
                t = inv.get("terd", {}) or {}
                iters, tb = int(t.get("iterations", 3000)), int(t.get("batch", 16))
                refine = t.get("refine_iterations")
                refine = iters // 3 if refine is None else int(refine)
                chain_rows = refine * int(t.get("refine_steps", 10)) * tb
                f = B * S * seeds
                add("invert_trigger", backward=(iters * 2 * tb + chain_rows + refine * 4 * tb)
                    * seeds, forward=f + (chain_rows * seeds if t.get("checkpoint") else 0),
                    jobs=seeds, sampled=f, batch=tb)
            else:
                add("invert_trigger", jobs=seeds)
                note = f"invert_trigger[{method}]: work not modelled (fixed cost only)"
                if note not in plan.notes:
                    plan.notes.append(note)
        gal = config.get("gallery", {})
        f = int(gal.get("n_samples", 8)) * chain(gal.get("steps")) * 2  # clean and triggered
        add("gallery", forward=f, sampled=f, batch=int(gal.get("n_samples", 8)))
        abl = ev.get("ablation", {})
        if abl.get("entropy_loss") and "bbti" in det_methods:  # Table 3: BBTI without l_e
            b = inv.get("bbti", {})
            per_iter = 2 * int(b.get("zo_directions", 6)) + 1 \
                if b.get("gradient") == "zeroth_order" else 1
            f = (int(b.get("max_iters", 100)) * per_iter
                 + int(b.get("explore", 0)) * int(b.get("restarts", 1))) * B * S \
                + int(ev["asr"]["n_samples"]) * chain(ev["asr"].get("steps"))
            add("ablate_entropy_loss", forward=f, sampled=f, batch=B)
        # stage 2: removal on the models it runs on (run_on flagged: every backdoored model, the
        # manifest's ground truth standing in for stage 1's verdicts)
        asr_n, fid_n = int(ev["asr"]["n_samples"]), int(ev["fid"]["n_samples"])
        S_eval = chain(ev["fid"].get("steps"), ev["fid"].get("sampler") or sampler)
        S_asr = chain(ev["asr"].get("steps"))
        backdoored = r["attack"] != "none"
        orig_asr = asr_n * (2 + len(det_methods)) if backdoored else 0
        f = fid_n * S_eval + orig_asr * S_asr
        add("evaluate", forward=f, sampled=f, batch=int(ev["fid"].get("batch_size", 128)))
        run_on = rem["run_on"]
        runs_removal = (r["model_id"] in run_on) if isinstance(run_on, list) \
            else (run_on == "all" or backdoored)
        # the threshold ablation (Fig. 6) and the removal ablation run on their own models,
        # whatever run_on says; each needs the model's clean data
        t_models = abl.get("t_models") or [m for m, x in rows.items() if x["attack"] != "none"]
        abl_models = rem.get("ablation", {}).get("models")
        if abl_models is None:
            abl_models = [m for m, x in rows.items() if x["attack"] != "none"]
        thresholds = list(abl.get("t_thresholds") or []) if mid in t_models else []
        if not (runs_removal or thresholds or mid in abl_models):
            continue
        n_clean = max(1, round(_by_size(rem["synthetic_samples"], r, "removal.synthetic_samples")
                               * rem.get("synthetic_scale", 1.0)))
        if rem.get("clean_data", "synthetic") == "synthetic":
            syn = rem["synthetic_sampler"]
            name = sampler if syn["name"] == "manifest" else syn["name"]
            f = n_clean * chain(syn.get("steps"), name)
            add("clean_data", forward=f, sampled=f, batch=min(n_clean, int(syn["batch_size"])))
        else:
            add("clean_data")
        ib = int(rem["importance_batch"])
        eb = int(ev["fid"].get("batch_size", 128))
        for t in thresholds:  # Fig. 6: importance at threshold t, pruned state evaluated
            n_above = T - threshold_timestep(T, float(t))
            add("ablate_threshold", backward=ib * 2 * n_above, batch=ib)
            f = fid_n * S_eval + 2 * asr_n * S_asr
            add("ablate_threshold", forward=f, sampled=f, batch=eb, jobs=0)
        _removal_ablation(add, config, r, rows, chain, T, ib, n_clean)
        if not runs_removal:
            continue
        thr = threshold_timestep(T, float(rem["t_threshold_frac"]))
        above = T - thr
        imp = rem.get("importance", {})
        strategies = list(rem["strategies"])
        clean_len = T if ("diffpruning" in strategies or imp.get("clean_timesteps") == "all") \
            else above
        back_len = T if imp.get("backdoor_timesteps") == "all" else above
        triggers = list(rem["triggers"])
        add("importance", backward=len(triggers) * ib * (clean_len + back_len),
            jobs=len(triggers), batch=ib)
        ft = rem["finetune"]
        ft_batch = int(_by_size(ft["batch_size"], r, "removal.finetune.batch_size"))
        steps = FinetuneConfig(epochs=ft["epochs"], batch_size=ft_batch).steps(n_clean)
        for _trigger in triggers:
            for s in strategies:
                method = removal_methods.get(s)
                if not method.prunes:
                    add("elijah_removal" if s == "elijah" else s)
                    continue
                ratios = permodel.resolve(rem["ratios"][s], r, f"removal.ratios.{s}")
                for _ratio in ratios:
                    add("prune")
                    f = fid_n * S_eval + 2 * asr_n * S_asr
                    add("evaluate", forward=f, sampled=f, batch=eb)  # the pruned state
                    for loss in ft["losses"]:
                        add("finetune", backward=steps * ft_batch,
                            forward=steps * ft_batch if loss == "p" else 0.0, batch=ft_batch)
                        add("evaluate", forward=f, sampled=f, batch=eb)  # the fine-tuned one
    return plan


def _removal_ablation(add: Callable[..., None], config: Mapping[str, Any],
                      r: Mapping[str, Any], rows: Mapping[str, Mapping[str, Any]],
                      chain: Callable[..., float], T: int, ib: int, n_clean: int) -> None:
    """The removal ablation's jobs of one model (``removal_ablation``: one per trigger source and
    one for Diff-Pruning and the random control): a measurement of the original, then per seed
    and variant an importance pass (per seed), a measured pruned state, a loss_p fine-tuning and
    a measured fine-tuned state (``removal.ablation.run_ablation``)."""
    from diffcleanse.removal.ablation import NO_TRIGGER, Variant, grid_variants
    from diffcleanse.removal.finetune import FinetuneConfig
    from diffcleanse.removal.importance import threshold_timestep

    grid = config["removal"]["ablation"]
    ids = grid.get("models")
    if ids is None:
        ids = [m for m, x in rows.items() if x["attack"] != "none"]
    if r["model_id"] not in ids:
        return
    ft = {**config["removal"]["finetune"], **(grid.get("finetune") or {})}
    batch = int(permodel.resolve(ft["batch_size"], r, "removal.finetune.batch_size"))
    steps = FinetuneConfig(epochs=ft["epochs"], batch_size=batch).steps(n_clean)
    ev = grid.get("evaluation") or {}
    per_measure = (int(ev.get("fid_n_samples", 64)) + int(ev.get("asr_n_samples", 32))) \
        * chain(ev.get("steps"))
    eb = int(ev.get("batch_size", 128))
    above = T - threshold_timestep(T, float(config["removal"]["t_threshold_frac"]))
    seeds = len(grid.get("seeds") or [0])
    for part in [*[str(t) for t in grid["triggers"]], NO_TRIGGER]:
        variants: list[Variant] = grid_variants(grid, part)
        clean_len = T if ("all" in grid.get("clean_timesteps", []) or part == NO_TRIGGER) \
            else above
        imp = seeds * ib * (clean_len + (above if part != NO_TRIGGER else 0))
        f = per_measure * (1 + 2 * seeds * len(variants))
        add("removal_ablation", forward=f, sampled=f, batch=eb)
        add("removal_ablation", backward=imp, batch=ib, jobs=0)
        add("removal_ablation", backward=seeds * len(variants) * steps * batch,
            forward=seeds * len(variants) * steps * batch, batch=batch, jobs=0)


@dataclass
class StageCost:
    """One rule's seconds, summed over the plan."""

    rule: str
    jobs: int = 0
    compute_s: float = 0.0
    fixed_s: float = 0.0
    sampled_s: float = 0.0

    @property
    def total_s(self) -> float:
        return self.compute_s + self.fixed_s


def rate_key(arch: str, batch: int, max_batch: int) -> str:
    """The rates entry of an architecture at a batch (batches above ``max_batch`` are measured
    at ``max_batch``: per-image cost stops falling once the device is full)."""
    return f"{arch}@{min(batch, max_batch)}"


def needed_rates(plan: Plan, max_batch: int) -> dict[str, tuple[str, int]]:
    """Rates entry -> (architecture, batch) for every piece of work that has any."""
    return {rate_key(w.arch, w.batch, max_batch): (w.arch, min(w.batch, max_batch))
            for w in plan.work if w.forward or w.backward}


def price(plan: Plan, rates: Mapping[str, Rate], job_overhead_s: float, max_batch: int
          ) -> dict[str, StageCost]:
    """Seconds per rule: evaluations x seconds per evaluation + jobs x the fixed cost per job."""
    out: dict[str, StageCost] = {}
    missing = sorted(set(needed_rates(plan, max_batch)) - set(rates))
    if missing:
        raise KeyError(f"no measured rate for {', '.join(missing)} (architecture@batch): measure "
                       f"them (benchmarks/cost_model.py --measure) or add them to the rates file")
    for w in plan.work:
        c = out.setdefault(w.rule, StageCost(w.rule))
        c.jobs += w.jobs
        c.fixed_s += w.jobs * job_overhead_s
        if w.forward or w.backward:
            rt = rates[rate_key(w.arch, w.batch, max_batch)]
            c.compute_s += w.forward * rt.forward_s + w.backward * rt.backward_s
            c.sampled_s += w.sampled * rt.forward_s
    return out


def _time_architecture(arch: Mapping[str, Any], device: str, b: int, reps: int) -> Rate:
    """One architecture's seconds per image, forward and forward+backward (best of ``reps``)."""
    import torch
    from diffusers import UNet2DModel

    cfg = {k: v for k, v in arch.items() if k != "timesteps"}
    torch.manual_seed(0)
    unet = UNet2DModel(**cfg).to(device)
    x = torch.randn(b, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"], device=device)
    t = torch.full((b,), 10, device=device, dtype=torch.long)

    def sync() -> None:
        if str(device).startswith("cuda"):
            torch.cuda.synchronize()

    def fwd() -> None:
        with torch.no_grad():
            unet(x, t)

    def fwd_bwd() -> None:
        unet(x, t).sample.square().mean().backward()

    best = {}
    for name, fn in (("f", fwd), ("b", fwd_bwd)):
        for _ in range(2):  # warm-up: the first calls allocate and build the autograd graph
            fn()
        sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        best[name] = min(times) / b
    return Rate(best["f"], best["b"], b, sum(p.numel() for p in unet.parameters()))


def measure_rates(plan: Plan, device: str = "cpu", max_batch: int = 64, reps: int = 5,
                  progress: bool = True) -> dict[str, Rate]:
    """Seconds per image of a plain batched UNet forward (no grad) and forward+backward for every
    (architecture, batch) the plan needs, random weights, on ``device`` (two warm-up
    calls first; the best of ``reps``)."""
    from tqdm import tqdm

    need = needed_rates(plan, max_batch)
    return {key: _time_architecture(plan.architectures[arch], device, b, reps)
            for key, (arch, b) in tqdm(sorted(need.items()), desc="rates", disable=not progress)}


def summarise(costs: Mapping[str, StageCost]) -> list[tuple[str, int, float, float]]:
    """(rule, jobs, hours, share) by descending cost."""
    total = sum(c.total_s for c in costs.values()) or 1.0
    rows = sorted(costs.values(), key=lambda c: -c.total_s)
    return [(c.rule, c.jobs, c.total_s / 3600, c.total_s / total) for c in rows]


def jobs_by_rule(plan: Plan) -> dict[str, int]:
    """Planned jobs per modelled rule (to compare with a dry run of the workflow)."""
    out: dict[str, int] = {}
    for w in plan.work:
        out[w.rule] = out.get(w.rule, 0) + w.jobs
    return out


def total_hours(costs: Iterable[StageCost]) -> float:
    """The plan's total, in hours."""
    return sum(c.total_s for c in costs) / 3600
