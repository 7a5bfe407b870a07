"""``diffcleanse scan``: verdict, outputs, exit status, and clean failures that write nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from diffcleanse import cli, models

FAST = ["--max-iters", "2", "--batch-size", "4", "--threads", "1"]


def _assert_nothing_written(out):
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*"))  # no temporary leftovers either


def test_scan_writes_trigger_grid_and_record(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "scan"
    status = cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), *FAST])
    text = capsys.readouterr().out
    assert status in (0, 1)
    rec = json.loads((out / "record.json").read_text())
    assert status == (1 if rec["backdoored"] else 0)
    assert rec["verdict"].upper() in text and "encoder pixels" in text
    for name in ("trigger.safetensors", "trigger.png", "samples.png", "samples.safetensors"):
        assert (out / name).stat().st_size > 0
    assert rec["encoder"] == "pixels" and rec["sampler"]["clip_sample"] is False
    assert rec["batch_size"] == 4 and rec["iterations"] >= 1 and rec["seconds"] > 0
    for key in ("mscr", "kappa", "kappa_class", "kappa_d", "seed", "steps", "diffcleanse_version"):
        assert key in rec


def test_scan_missing_model_is_an_error(tmp_path, capsys):
    out = tmp_path / "scan"
    assert cli.main(["scan", str(tmp_path / "nowhere"), "--out", str(out), *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_scan_offline_hub_id_is_an_error(tmp_path, capsys):
    out = tmp_path / "scan"
    assert cli.main(["scan", "hub:nobody/no-such-model", "--out", str(out), *FAST]) == 2
    assert "could not fetch" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_scan_wrong_channel_count_is_an_error(tmp_path, capsys):
    d = tmp_path / "gray"
    models.save_model(models.build_unet(8, (8, 16), norm_num_groups=4, attention_head_dim=4,
                                        in_channels=1), models.build_scheduler(10), d)
    out = tmp_path / "scan"
    assert cli.main(["scan", str(d), "--out", str(out), *FAST]) == 2
    assert "1 channels, expected 3" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_scan_nan_weights_is_an_error(tiny_zoo, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "nan"
    shutil.copytree(tiny_zoo["clean"], d)
    w = d / "unet" / "diffusion_pytorch_model.safetensors"
    t = load_file(str(w))
    k = next(iter(t))
    t[k] = torch.full_like(t[k], float("nan"))
    save_file(t, str(w))
    out = tmp_path / "scan"
    assert cli.main(["scan", str(d), "--out", str(out), *FAST]) == 2
    assert "NaN" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_scan_refuses_to_overwrite_a_foreign_directory(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), *FAST]) == 2
    assert (out / "precious.txt").read_text() == "keep me"
    assert "choose --out" in capsys.readouterr().err


def test_scan_bad_encoder_is_an_error(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "scan"
    args = ["scan", str(tiny_zoo["clean"]), "--out", str(out), "--encoder", "classifier:/nope"]
    assert cli.main([*args, *FAST]) == 2
    assert "classifier" in capsys.readouterr().err
    _assert_nothing_written(out)


@pytest.mark.parametrize("size", [16])
def test_scan_image_size_check(tiny_zoo, tmp_path, capsys, size):
    out = tmp_path / "scan"
    args = ["scan", str(tiny_zoo["clean"]), "--out", str(out), "--image-size", str(size)]
    assert cli.main([*args, *FAST]) == 2
    assert "8-pixel" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_scan_takes_a_workflow_configs_settings(tiny_zoo, tmp_path):
    """--config: the default zoo's inversion settings, with the command-line flags on top."""
    out = tmp_path / "scan"
    config = Path(__file__).resolve().parents[1] / "config.yaml"
    status = cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), "--config", str(config),
                       "--max-iters", "4", "--batch-size", "4", "--threads", "1"])
    assert status in (0, 1)
    rec = json.loads((out / "record.json").read_text())
    wanted = yaml.safe_load(config.read_text())["inversion"]
    used = rec["params"]["inversion"]
    assert rec["gradient"] == wanted["gradient"] == "whitebox"
    assert used["restarts"] == wanted["restarts"] and used["init_scale"] == wanted["init_scale"]
    assert used["range_loss"] is True and used["batch_size"] == 4 and used["max_iters"] == 4
    assert rec["params"]["detection"]["range_band"] is True


@pytest.mark.parametrize("text, needle", [(None, "does not exist"),
                                          ("seed: 0\n", "no `inversion:` section")])
def test_scan_bad_config_is_an_error(tiny_zoo, tmp_path, capsys, text, needle):
    config = tmp_path / "config.yaml"
    if text is not None:
        config.write_text(text)
    out = tmp_path / "scan"
    assert cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), "--config", str(config),
                     *FAST]) == 2
    assert needle in capsys.readouterr().err
    _assert_nothing_written(out)
