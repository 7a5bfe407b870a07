"""Fig. 14 and Table 8 from the records the workflow writes (synthetic records, real code)."""

from __future__ import annotations

import json
from pathlib import Path

from diffcleanse import adaptive_results


def _write(path: Path, obj: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return str(path)


def _card(tmp: Path, model: str, lam: float) -> str:
    row = {"model_id": model, "attack": "adaptive", "attack_params": f"lambda={lam:g}",
           "train_steps": 400}
    return _write(tmp / model / "card.json", {"model_id": model, "manifest_row": row})


def _rec(tmp: Path, model: str, name: str, **kw) -> str:
    base = {"model": model, "state": "original", "utility_metric": "FD-digits-cls",
            "utility": 1.0, "asr_real": 0.9, "asr_inverted": 0.5, "sampler": "ddpm",
            "protocol": {"utility_metric": "FD-digits-cls", "fid_n_samples": 8}, "variant": {}}
    return _write(tmp / model / f"{name}.json", base | kw)


def test_fig14_and_table8(tmp_path: Path) -> None:
    cards = {m: _card(tmp_path, m, lam) for m, lam in (("a0", 0.0), ("a1", 1e-3))}
    snaps = [_rec(tmp_path, m, f"s{k}", utility=2.0 / k, variant={"snapshot_step": 100 * k})
             for m in cards for k in (1, 2, 3)]
    # the last point is the trained model's own evaluation record (no snapshot_step)
    snaps.append(_rec(tmp_path, "a0", "final", utility=0.4))
    df = adaptive_results.fig14_frame(snaps, cards)
    assert list(df["step"][df["model"] == "a0"]) == [100, 200, 300, 400]
    assert list(df["utility"][df["model"] == "a0"])[-1] == 0.4
    assert set(df["lambda"]) == {0.0, 1e-3}
    adaptive_results.plot_fig14(df, [tmp_path / "fig14.png"])
    assert (tmp_path / "fig14.png").stat().st_size > 1000

    evals = [_rec(tmp_path, "a0", "orig"), _rec(tmp_path, "a1", "orig"),
             _rec(tmp_path, "a0", "ft", state="finetuned", strategy="diffcleanse", ratio="0.02",
                  loss="p", utility=1.5, asr_real=0.0)]
    verdicts = [_write(tmp_path / m / "verdict.json", {"model": m, "backdoored": m == "a0",
                                                       "mscr": 0.9}) for m in cards]
    t8 = adaptive_results.table8(evals, verdicts, cards)
    a0 = t8.set_index("model").loc["a0"]
    assert a0["detected"] and abs(a0["delta_utility"] - 0.5) < 1e-9
    assert abs(a0["delta_asr_real"] + 0.9) < 1e-9
    assert t8.set_index("model").loc["a1", "removal"] == "not run"
    adaptive_results.write_table8(t8, tmp_path / "t8.csv", tmp_path / "t8.md", evals)
    assert "Table 8" in (tmp_path / "t8.md").read_text()
