"""``diffcleanse scan``: verdict, outputs, exit status, and clean failures that write nothing."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from diffcleanse import cli, models, scan

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
    bbti = rec["by_method"]["bbti"]
    assert rec["batch_size"] == 4 and bbti["iterations"] >= 1 and bbti["seconds"] > 0
    # the total counts start-up and loading too, so it is longer than the inversion alone
    assert rec["seconds"] > bbti["seconds"] and "start-up" in text
    assert set(bbti["readings"]) == {"clique", "pairs", "unbanded"}
    for key in ("mscr", "kappa_d", "active_kappa", "seed", "diffcleanse_version", "params"):
        assert key in rec
    assert not scan.state_dir_for(out).exists()  # a finished scan leaves no state behind


def test_scan_resumes_an_interrupted_run_to_the_same_result(tiny_zoo, tmp_path, monkeypatch,
                                                            capsys):
    args = ["--max-iters", "6", "--restarts", "2", "--batch-size", "4", "--threads", "1",
            "--seed", "3", "--explore", "3", "--explore-patches"]  # no patch candidates
    ref = tmp_path / "ref"
    assert cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(ref), *args]) in (0, 1)
    real = scan._progress
    calls = {"n": 0}

    def interrupting(method, verbose, total):
        def report(row):
            calls["n"] += 1
            # after both starts explored their 3 candidates and took their first step: in the
            # middle of the second iteration of the two starts
            if calls["n"] == 2 * 3 + 3:
                raise KeyboardInterrupt
        return report

    out = tmp_path / "scan"
    monkeypatch.setattr(scan, "_progress", interrupting)
    assert cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), *args]) == 2
    assert "resume" in capsys.readouterr().err and not out.exists()
    assert list(scan.state_dir_for(out).rglob("bbti-*.json"))  # the state of iteration 1 is kept
    resumed = {"n": 0}

    def counting(method, verbose, total):
        inner = real(method, verbose, total)

        def report(row):
            resumed["n"] += 1
            if callable(inner):
                inner(row)
        return report

    monkeypatch.setattr(scan, "_progress", counting)
    assert cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), *args]) in (0, 1)
    # it went on from the state saved after both starts explored and took one step: the four
    # remaining iterations only, no candidate sampled again
    assert resumed["n"] == 4
    a = load_file(str(ref / "trigger.safetensors"))["trigger"]
    b = load_file(str(out / "trigger.safetensors"))["trigger"]
    assert torch.equal(a, b)
    ra = json.loads((ref / "record.json").read_text())["by_method"]["bbti"]
    rb = json.loads((out / "record.json").read_text())["by_method"]["bbti"]
    assert ra["mscr"] == rb["mscr"] and ra["iterations"] == rb["iterations"] == 6


def test_scan_verbose_prints_every_iteration(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "scan"
    assert cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), "--verbose",
                     *FAST]) in (0, 1)
    text = capsys.readouterr().out
    # 24 random and 16 patch candidates (the scan's defaults), then the 2 iterations: 42 rounds
    assert "[bbti] start 0 candidate 0 (grid 0) [1/42]" in text
    assert "[bbti] start 0 patch candidate 24 (grid 2) [25/42]" in text
    assert "[bbti] start 0 iteration 0 [41/42]" in text
    assert "[bbti] start 0 iteration 1 [42/42]" in text


def test_scan_bad_restarts_names_the_flag_and_the_key(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "scan"
    assert cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), "--max-iters", "2",
                     "--restarts", "3", "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert "--restarts" in err and "inversion.bbti.restarts" in err and "--max-iters" in err
    _assert_nothing_written(out)


def test_scan_unknown_method_is_an_error(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "scan"
    assert cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), "--method", "nope",
                     *FAST]) == 2
    err = capsys.readouterr().err
    assert "unknown inversion method 'nope'" in err and "bbti" in err
    _assert_nothing_written(out)


def test_scan_missing_model_is_an_error(tmp_path, capsys):
    out = tmp_path / "scan"
    assert cli.main(["scan", str(tmp_path / "nowhere"), "--out", str(out), *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_scan_offline_hub_id_is_an_error(tmp_path, capsys):
    out = tmp_path / "scan"
    assert cli.main(["scan", "hub:nobody/no-such-model", "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err
    assert "nobody/no-such-model" in err and "local:<dir>" in err
    _assert_nothing_written(out)


def test_scan_wrong_channel_count_is_an_error(tmp_path, capsys):
    d = tmp_path / "gray"
    models.save_model(models.build_unet(8, (8, 16), norm_num_groups=4, attention_head_dim=4,
                                        in_channels=1), models.build_scheduler(10), d)
    out = tmp_path / "scan"
    assert cli.main(["scan", str(d), "--out", str(out), *FAST]) == 2
    assert "1-channel inputs" in capsys.readouterr().err
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


def test_scan_takes_a_workflow_configs_settings(tiny_zoo, tmp_path, capsys):
    """--config: the default zoo's inversion settings, with the command-line flags on top; the
    config's classifier encoder is honoured by asking for its directory, never ignored."""
    out = tmp_path / "scan"
    config = Path(__file__).resolve().parents[1] / "config.yaml"
    base = ["scan", str(tiny_zoo["clean"]), "--out", str(out), "--config", str(config),
            "--max-iters", "4", "--batch-size", "4", "--threads", "1", "--method", "bbti"]
    assert cli.main(base) == 2
    assert "detection.encoder is `classifier`" in capsys.readouterr().err
    _assert_nothing_written(out)
    status = cli.main([*base, "--encoder", "pixels"])
    assert status in (0, 1)
    rec = json.loads((out / "record.json").read_text())
    cfg = yaml.safe_load(config.read_text())["inversion"]
    assert "bbti" in cfg["methods"] and rec["methods"] == ["bbti"]  # --method over the config's
    assert rec["batch_size"] == 4
    assert rec["encoder"] == "pixels"
    used = rec["params_by_method"]["bbti"]  # every setting of the run, defaults included
    assert used["gradient"] == cfg["bbti"]["gradient"]
    assert used["restarts"] == cfg["bbti"]["restarts"]
    assert used["init_scale"] == cfg["bbti"]["init_scale"] and used["range_loss"] is True
    assert used["max_iters"] == 4 and rec["by_method"]["bbti"]["iterations"] <= 4


def test_scan_takes_the_configs_inversion_sampler(tiny_zoo, tmp_path, capsys):
    """--config's `inversion.sampler` (a name, or a mapping by image size with a default) is the
    scan's sampler unless --sampler names one; a mapping with no entry for the model stops the
    scan before anything is written."""
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())

    def scan_with(sampler, *extra):
        cfg = tmp_path / f"cfg{len(list(tmp_path.glob('cfg*')))}.yaml"
        cfg.write_text(yaml.safe_dump({**base, "inversion": {**base["inversion"],
                                                             "sampler": sampler}}))
        out = tmp_path / cfg.stem
        status = cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), "--config",
                           str(cfg), "--encoder", "pixels", "--method", "bbti", *FAST, *extra])
        return status, out

    status, out = scan_with({"default": "ddim"})
    assert status in (0, 1)
    assert json.loads((out / "record.json").read_text())["sampler"]["name"] == "ddim"
    status, out = scan_with("ddim", "--sampler", "ddpm")
    assert json.loads((out / "record.json").read_text())["sampler"]["name"] == "ddpm"
    status, out = scan_with({"64": "ddim"})
    assert status == 2
    assert "inversion.sampler has no entry" in capsys.readouterr().err
    _assert_nothing_written(out)


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


def test_scan_with_several_methods_keeps_each_methods_evidence(tiny_zoo, tmp_path, capsys):
    config = tmp_path / "few.yaml"
    config.write_text(yaml.safe_dump({
        "inversion": {"methods": ["bbti", "elijah"], "batch_size": 10,
                      "bbti": {"max_iters": 2}, "elijah": {"epochs": 3, "batch": 8}},
        "detection": {"encoder": "pixels"}}))
    out = tmp_path / "scan"
    status = cli.main(["scan", str(tiny_zoo["backdoored"]), "--out", str(out), "--config",
                       str(config), "--threads", "1"])
    text = capsys.readouterr().out
    rec = json.loads((out / "record.json").read_text())
    assert rec["methods"] == ["bbti", "elijah"] and set(rec["by_method"]) == {"bbti", "elijah"}
    assert status == (1 if rec["backdoored"] else 0)
    # flagged when any method's trigger reaches kappa_d; the best trigger is the one kept
    assert rec["backdoored"] == any(v["verdict"] == "backdoored"
                                    for v in rec["by_method"].values())
    best = max(rec["by_method"], key=lambda m: rec["by_method"][m]["mscr"])
    assert rec["trigger_method"] == best
    for m in ("bbti", "elijah"):
        assert (out / f"method~{m}" / "trigger.safetensors").is_file()
        assert f"  {m}" in text
    assert "uniformity[pixels-mse]" in rec["by_method"]["elijah"]["statistics"]
    a = load_file(str(out / "trigger.safetensors"))["trigger"]
    b = load_file(str(out / f"method~{best}" / "trigger.safetensors"))["trigger"]
    assert torch.equal(a, b)


def test_bbti_options_without_bbti_are_an_error(tiny_zoo, tmp_path, capsys):
    out = tmp_path / "scan"
    assert cli.main(["scan", str(tiny_zoo["clean"]), "--out", str(out), "--method", "elijah",
                     "--gradient", "whitebox"]) == 2
    assert "bbti is not among the methods" in capsys.readouterr().err
    _assert_nothing_written(out)


def test_repair_command_starts_from_an_existing_trigger_file(tiny_zoo, tmp_path, capsys):
    from safetensors.torch import save_file

    from diffcleanse import patterns

    r = tiny_zoo["recipe"]
    trig = tmp_path / "trigger.safetensors"
    save_file({"trigger": patterns.render_trigger(r["trigger"], r["image_size"])}, str(trig))
    out = tmp_path / "fixed"
    small = ["--samples", "32", "--steps", "10", "--epochs", "1", "--batch-size", "16",
             "--threads", "1"]
    assert cli.main(["repair", str(tiny_zoo["backdoored"]), "--trigger", str(trig), "--out",
                     str(out), *small]) == 0
    assert "repaired model written to" in capsys.readouterr().out
    unet, sched = models.load_model(out)
    assert sched["clip_sample"] is False
    rec = json.loads((out / "repair.json").read_text())
    assert "10 steps" in rec["params"]["data"]  # --steps reached the synthetic-data sampler
    bad = tmp_path / "bad.safetensors"
    save_file({"trigger": torch.zeros(3, 16, 16)}, str(bad))
    assert cli.main(["repair", str(tiny_zoo["backdoored"]), "--trigger", str(bad), "--out",
                     str(tmp_path / "no"), *small]) == 2
    assert "shape" in capsys.readouterr().err and not (tmp_path / "no").exists()


@pytest.mark.parametrize("explore", [0, 3])
def test_scan_saves_its_state_when_the_flagged_start_is_also_the_best(tiny_zoo, tmp_path,
                                                                      explore):
    """Regression: a flagged start that is also the best candidate holds one tensor under two keys
    of the resumable state; saving it must not fail (safetensors refuses shared storage). With
    exploration the first candidate flags, before any step."""
    config = tmp_path / "config.yaml"
    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "config.yaml").read_text())
    base["inversion"]["methods"] = ["bbti"]
    base["inversion"]["bbti"]["gradient"] = "blackbox"
    base["detection"]["kappa_d"] = 1e-6  # every first iteration flags
    base["detection"]["encoder"] = "pixels"
    config.write_text(yaml.safe_dump(base))
    out = tmp_path / "scan"
    status = cli.main(["scan", str(tiny_zoo["backdoored"]), "--out", str(out), "--config",
                       str(config), "--max-iters", "2", "--restarts", "1", "--batch-size", "4",
                       "--threads", "1", "--explore", str(explore)])
    assert status == 1  # flagged, at the first iteration or the first candidate
    rec = json.loads((out / "record.json").read_text())["by_method"]["bbti"]
    assert rec["verdict"] == "backdoored" and rec["iterations"] == (0 if explore else 1)
