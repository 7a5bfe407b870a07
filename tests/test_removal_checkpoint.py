"""Training checkpoints (fine-tuning's resume): one atomic unit; a torn one is not resumed."""

import copy
import json
import logging
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffcleanse import data, models, training


@pytest.fixture
def setup(tiny_unet):
    x, _ = data.load_digits(8)
    sched = models.build_scheduler(20)
    cfg = training.TrainConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=0,
                               checkpoint_every=2, seed=5)
    return tiny_unet, sched, x[:64], cfg


def _run(setup, ckpt, stop_after=None):
    unet, sched, x, cfg = setup
    return training.train(copy.deepcopy(unet), sched, x, cfg, checkpoint_dir=ckpt,
                          progress=False, stop_after=stop_after)[1]


def test_a_checkpoint_is_one_file_holding_its_step(setup, tmp_path):
    ck = tmp_path / "ck"
    assert _run(setup, ck, stop_after=4)["stopped_at"] == 4
    with safe_open(str(ck / "state.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    assert meta["step"] == 4 and meta["fingerprint"] == setup[3].fingerprint()
    assert json.loads((ck / "state.json").read_text())["step"] == 4
    assert _run(setup, ck)["resumed_from"] == 4


def test_weights_of_another_step_are_not_resumed(setup, tmp_path, caplog):
    ck = tmp_path / "ck"
    _run(setup, ck, stop_after=2)
    shutil.copy(ck / "state.safetensors", tmp_path / "step2.safetensors")
    _run(setup, ck, stop_after=4)
    shutil.copy(tmp_path / "step2.safetensors", ck / "state.safetensors")  # torn: json says 4
    with caplog.at_level(logging.WARNING):
        hist = _run(setup, ck)
    assert hist["resumed_from"] == 0
    assert "torn checkpoint" in caplog.text and "step 4" in caplog.text


def test_tampered_or_foreign_weights_are_not_resumed(setup, tmp_path, caplog):
    ck = tmp_path / "ck"
    _run(setup, ck, stop_after=4)
    path = ck / "state.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    key = next(k for k in t if k.startswith("model."))
    t[key] = t[key] + 1.0
    save_file(t, str(path), metadata=meta)  # same step and digest claimed, other tensors
    with caplog.at_level(logging.WARNING):
        assert _run(setup, ck)["resumed_from"] == 0
    assert "do not match the digest" in caplog.text
    save_file({"model.x": torch.zeros(1)}, str(path))  # no metadata: an older or foreign file
    (ck / "state.json").unlink()
    with caplog.at_level(logging.WARNING):
        assert _run(setup, ck)["resumed_from"] == 0
    assert "carries no step" in caplog.text
    path.write_bytes(b"\x00" * 10)  # a truncated file
    with caplog.at_level(logging.WARNING):
        assert _run(setup, ck)["resumed_from"] == 0
    assert "cannot be read" in caplog.text
