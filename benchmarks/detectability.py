"""What MSCR can detect at all: the true trigger under the defender's protocol.

A defender samples ``noise + r`` with the model's sampler (never clipping) on the workflow's verdict
batch and flags the model when MSCR >= κ_d. This prints, per model and seed index, MSCR and the
ASR of that very batch with r = 0 (clean noise) and with r = the true trigger (the trigger a
perfect inversion would find, in the model's own space: ``detection._true_pattern``). A backdoor
whose own trigger stays below κ_d under this protocol cannot be flagged by an MSCR rule, however
good the search; one far above it can. The verdict batch is the one ``invert_trigger`` uses for
the same (config seed, model id, seed index), so the numbers sit beside the detection table's.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/detectability.py --results results \
        --encoder classifier:results/classifiers/digits_16 --seeds 0 1 2 3 4 \
        [--model bd-box-hat ...] [--external ../shared/zoo-external/ext-bd-box-corner ...]

External models (``--external``) carry their truth in ``truth.safetensors`` (trigger and target
in the attack code's own convention) and are sampled with DDPM. Prints a markdown table. Not a
test: the encoder and the batch decide the numbers.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch


def rows_for(model, model_id: str, sampler, trigger: torch.Tensor | None,
             target: torch.Tensor | None, encoder, detect, seeds: list[int], batch: int,
             base_seed: int, mse: float) -> list[dict[str, object]]:
    """MSCR and ASR of the verdict batch from ``noise`` and ``noise + trigger``, per seed index."""
    from diffcleanse import detection, samplers
    from diffcleanse.inversion.run import seeds_for, verdict_batch

    out = []
    for s in seeds:
        noise, step_seeds = verdict_batch(model.space_shape, batch,
                                          seeds_for(base_seed, model_id, "bbti", s)[
                                              "verdict_noise"], model.device)
        row: dict[str, object] = {"model": model_id, "seed": s, "sampler": sampler.name}
        for label, r in (("zero", None), ("true", trigger)):
            if label == "true" and r is None:
                continue
            x_T = noise if r is None else noise + r.to(noise.device)
            with torch.no_grad():
                x = model.decode(samplers.denoise(model.unet, model.scheduler_config, x_T,
                                                  sampler, seeds=step_seeds))
                z = encoder(x.clamp(-1, 1))
            row[f"mscr_{label}"] = detection.mscr(z, detect.active_kappa,
                                                  detection.in_band(x, detect))
            if target is not None:
                hit = ((x.clamp(-1, 1) - target.to(x.device)) ** 2).mean(dim=(1, 2, 3)) < mse
                row[f"asr_{label}"] = float(hit.float().mean())
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--results", default="results", help="a workflow run's results folder")
    ap.add_argument("--model", nargs="*", default=None,
                    help="model ids of that run (default: every model with a card)")
    ap.add_argument("--external", nargs="*", default=[],
                    help="model dirs with truth.safetensors (e.g. ../shared/zoo-external/*)")
    ap.add_argument("--encoder", default="pixels")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0, help="the config's base seed")
    ap.add_argument("--kappa-d", type=float, default=0.5)
    ap.add_argument("--mse", type=float, default=0.01)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from safetensors.torch import load_file

    from diffcleanse import detection, encoders, models, samplers
    from diffcleanse.records import read_json

    enc = encoders.make_encoder(args.encoder)
    detect = detection.DetectionSpec(kappa_d=args.kappa_d)
    results = Path(args.results)
    todo = []
    ids = args.model if args.model is not None else sorted(
        p.parent.name for p in (results / "models").glob("*/card.json"))
    for mid in ids:
        card = read_json(results / "models" / mid / "card.json")
        mdir = results / "models" / mid / "model"
        trig = tgt = None
        if card["ground_truth"]["backdoored"]:
            trig, tgt = detection._true_pattern(card, mdir)
        todo.append((mid, mdir, samplers.SamplerSpec(card["manifest_row"]["sampler"]), trig, tgt))
    for d in map(Path, args.external):
        f = d / "truth.safetensors"
        t = load_file(str(f)) if f.is_file() else {}
        todo.append((d.name, d, samplers.SamplerSpec("ddpm"),
                     t["trigger"].float() if t else None, t["target"].float() if t else None))
    print("| model | seed | sampler | MSCR, zero trigger | MSCR, true trigger | ASR, zero | "
          "ASR, true | detectable (true MSCR >= κ_d) |")
    print("|---|---|---|---|---|---|---|---|")
    for mid, mdir, sampler, trig, tgt in todo:
        model = models.load_pipeline(mdir)
        for r in rows_for(model, mid, sampler, trig, tgt, enc, detect, args.seeds,
                          args.batch_size, args.seed, args.mse):
            def f(k: str, r: dict[str, object] = r) -> str:
                return f"{r[k]:.2f}" if k in r else "—"
            det = "—" if "mscr_true" not in r else (
                "yes" if r["mscr_true"] >= args.kappa_d else "no")
            print(f"| {mid} | {r['seed']} | {r['sampler']} | {f('mscr_zero')} | "
                  f"{f('mscr_true')} | {f('asr_zero')} | {f('asr_true')} | {det} |", flush=True)


if __name__ == "__main__":
    main()
