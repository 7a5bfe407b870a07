"""Hostile model and run inputs (issue 15, items 2 and 3): each is refused before any code from
the file runs or anything large is allocated, with a message naming the file and the problem.

The cases are real files: a pickle whose unpickling writes a marker file, headers rewritten
byte by byte, symlinks, FIFOs, a fake hub cache, local HTTP servers standing in for the hub,
and a PNG decompression bomb. Memory is measured in a forked child (peak RSS reset through
/proc/self/clear_refs, address space capped) so that a regression fails the test instead of
taking the machine down.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import pickle
import shutil
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from child_helpers import in_child
from PIL import Image

from diffcleanse import data, models, patterns, safety
from diffcleanse.removal import pruned_io

WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
CONFIG = "unet/config.json"
SCHED = "scheduler/scheduler_config.json"


# ---------------------------------------------------------------- helpers


@pytest.fixture
def model_dir(tmp_path, tiny_unet) -> Path:
    d = tmp_path / "model"
    models.save_model(tiny_unet, models.build_scheduler(50), d)
    return d


def _rewrite_header(path: Path, edit) -> None:
    """Apply ``edit(header_dict)`` to a safetensors file's header, keeping the data bytes."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


class _Evil:
    """Unpickling this writes a marker file: a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


# ---------------------------------------------------------------- A. hostile model files


@pytest.mark.parametrize("allow_pickle", [False, True])
def test_pickle_disguised_as_safetensors_is_refused_before_it_runs(model_dir, tmp_path,
                                                                   allow_pickle):
    marker = tmp_path / "marker"
    payload = pickle.dumps(_Evil(marker), protocol=4)
    pickle.loads(payload)  # control: the payload really runs code when unpickled
    assert marker.read_text() == "pwned"
    marker.unlink()
    (model_dir / WEIGHTS).write_bytes(payload)
    with pytest.raises(models.ModelLoadError) as err:
        models.load_model(model_dir, allow_pickle=allow_pickle)
    msg = str(err.value)
    assert str(model_dir / WEIGHTS) in msg and "is a pickle (protocol 4)" in msg
    assert not marker.exists()
    # torch.save's zip format (its data.pkl is a pickle) under the same name
    torch.save({"w": torch.zeros(2)}, model_dir / WEIGHTS)
    with pytest.raises(models.ModelLoadError, match="zip archive"):
        models.load_model(model_dir, allow_pickle=allow_pickle)


def test_truncated_safetensors_is_refused_with_the_byte_counts(model_dir):
    f = model_dir / WEIGHTS
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(models.ModelLoadError, match=r"is truncated: its header declares [\d,]+ "
                       r"bytes of tensor data, the file holds [\d,]+") as err:
        models.load_model(model_dir)
    assert str(f) in str(err.value)
    f.write_bytes(raw[:5])
    with pytest.raises(models.ModelLoadError, match="5 bytes: truncated"):
        models.load_model(model_dir)
    f.write_bytes(raw[:100])  # the header itself cut off
    with pytest.raises(models.ModelLoadError, match="truncated or not a safetensors file"):
        models.load_model(model_dir)


def test_absurd_shapes_in_the_header_are_refused_before_any_allocation(model_dir):
    f = model_dir / WEIGHTS

    def huge(h):  # 4 TB declared; the offsets made consistent with it
        h["conv_in.weight"]["shape"] = [1 << 20, 1 << 18, 2, 2]
        b = h["conv_in.weight"]["data_offsets"][0]
        h["conv_in.weight"]["data_offsets"] = [b, b + 4 * (1 << 40)]

    _rewrite_header(f, huge)
    out = in_child(lambda: models.load_model(model_dir))
    assert "absurd shape [1048576, 262144, 2, 2]" in out["error"] and str(f) in out["error"]
    if out["growth_mb"] is not None:
        assert out["growth_mb"] < 100, out
    # within the limits, consistent offsets, but more data than the file holds: truncated
    fresh = model_dir.parent / "fresh"
    models.save_model(models.build_unet(8, (8, 16), norm_num_groups=4, attention_head_dim=4),
                      models.build_scheduler(50), fresh)

    def extra(h):  # 1 GB more declared than the file holds
        end = max(v["data_offsets"][1] for k, v in h.items() if k != "__metadata__")
        h["extra.weight"] = {"dtype": "F32", "shape": [1 << 28],
                             "data_offsets": [end, end + 4 * (1 << 28)]}

    _rewrite_header(fresh / WEIGHTS, extra)
    out = in_child(lambda: models.load_model(fresh))
    assert "is truncated: its header declares 1,07" in out["error"], out
    if out["growth_mb"] is not None:
        assert out["growth_mb"] < 100, out


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"_class_name": "EvilModel"}, "_class_name 'EvilModel' is not a model class"),
        ({"_class_name": "UNet2DConditionModel"}, "_class_name 'UNet2DConditionModel'"),
        ({"block_out_channels": [8, 24]}, "does not match config.json (UNet2DModel)"),
        ({"in_channels": 1, "out_channels": 1}, "conv_in.weight is [8, 3, 3, 3] in the weights"),
        ({"layers_per_block": 10**6}, "layers_per_block = 1,000,000 is out of bounds"),
        ({"sample_size": 4097}, "sample_size 4097 is larger than 4096"),
        ({"down_block_types": ["EvilBlock2D", "AttnDownBlock2D"]}, "does not describe a valid"),
        ({"norm_eps": float("nan")}, "non-finite number (NaN at norm_eps)"),
    ],
)
def test_config_that_does_not_match_the_weights_is_refused(model_dir, change, expected):
    cfg = json.loads((model_dir / CONFIG).read_text())
    cfg.update(change)
    (model_dir / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(models.ModelLoadError) as err:
        models.load_model(model_dir)
    assert expected in str(err.value) and "refused" in str(err.value)


def test_config_with_absurd_sizes_is_refused_without_allocating(model_dir):
    """The config alone would make diffusers allocate ~40 GB (it builds the model before reading
    the weights): the shapes are compared on the meta device, so the refusal costs nothing."""
    cfg = json.loads((model_dir / CONFIG).read_text())
    cfg["block_out_channels"] = [16000, 32000]
    cfg["norm_num_groups"] = 8000
    (model_dir / CONFIG).write_text(json.dumps(cfg))
    clean = {k: v for k, v in cfg.items() if not k.startswith("_")}
    control = in_child(lambda: models.UNet2DModel.from_config(clean))  # what diffusers would do
    assert control["error"] and ("memory" in control["error"].lower()
                                 or "alloc" in control["error"].lower()), control
    out = in_child(lambda: models.load_model(model_dir))
    assert "does not match config.json" in out["error"] and str(model_dir / WEIGHTS) in out["error"]
    if out["growth_mb"] is not None:
        assert out["growth_mb"] < 100, out


def test_pruned_shapes_that_do_not_match_the_weights_are_refused(tmp_path, tiny_unet):
    # a pruned model by hand: conv_out reads 6 of its 8 input channels
    pruned_io.apply_shapes(tiny_unet, {"conv_out": {"type": "Conv2d", "in_channels": 6,
                                                    "out_channels": 3}})
    d = tmp_path / "pruned"
    models.save_model(tiny_unet, models.build_scheduler(50), d)
    assert (d / "unet/pruned_shapes.json").is_file()
    assert models.load_model(d)[0].conv_out.in_channels == 6  # sound as written
    spec = json.loads((d / "unet/pruned_shapes.json").read_text())
    name, entry = next((k, v) for k, v in spec["modules"].items() if v["type"] == "Conv2d")
    entry["out_channels"] += 1
    (d / "unet/pruned_shapes.json").write_text(json.dumps(spec))
    with pytest.raises(models.ModelLoadError, match="does not match config.json"):
        models.load_model(d)
    entry["out_channels"] = 10**7
    (d / "unet/pruned_shapes.json").write_text(json.dumps(spec))
    with pytest.raises(models.ModelLoadError, match="out of bounds"):
        models.load_model(d)
    with pytest.raises(pruned_io.PrunedFormatError, match="out of bounds"):
        pruned_io.load_pruned_unet(d / "unet")


def test_nan_and_inf_weights_are_refused(model_dir, tiny_unet):
    """(NaN is also covered by tests/test_models_training.py; inf here.)"""
    with torch.no_grad():
        next(tiny_unet.parameters())[0].fill_(float("inf"))
    models.save_model(tiny_unet, models.build_scheduler(50), model_dir.parent / "inf")
    with pytest.raises(models.ModelLoadError, match="NaN/inf"):
        models.load_model(model_dir.parent / "inf")


def test_symlinks_out_of_the_model_directory_are_refused(model_dir, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.move(model_dir / WEIGHTS, outside)
    (model_dir / WEIGHTS).symlink_to(outside)
    with pytest.raises(models.ModelLoadError, match="is a symlink to .*outside the model dir"):
        models.load_model(model_dir)
    with pytest.raises(models.ModelLoadError, match="symlink"):  # nothing is copied either
        models.fetch(f"local:{model_dir}", tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    # a link that stays inside the directory is fine
    (model_dir / WEIGHTS).unlink()
    shutil.move(outside, model_dir / "real.dat")
    (model_dir / WEIGHTS).symlink_to("../real.dat")
    models.load_model(model_dir)
    # a config linked to a system file, a linked folder, a FIFO (reading it would block)
    (model_dir / "extra.json").symlink_to("/etc/passwd")
    with pytest.raises(models.ModelLoadError, match="extra.json: is a symlink to /etc/passwd"):
        models.load_model(model_dir)
    (model_dir / "extra.json").unlink()
    os.mkfifo(model_dir / "unet" / "notes.json")
    t0 = time.monotonic()
    with pytest.raises(models.ModelLoadError, match="notes.json: is not a plain file"):
        models.load_model(model_dir)
    assert time.monotonic() - t0 < 10


# ---------------------------------------------------------------- A. the hub


def _fake_hub_cache(cache: Path, repo: str, model: Path) -> str:
    """A huggingface_hub cache holding ``model`` as ``repo`` at ``main`` (blobs + symlinks)."""
    base = cache / ("models--" + repo.replace("/", "--"))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snap = base / "snapshots" / commit
    for f in sorted(p for p in model.rglob("*") if p.is_file()):
        blob = base / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, blob)
        link = snap / f.relative_to(model)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(commit)
    return commit


def test_offline_hub_revision_that_is_not_cached_fails_at_once(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub"
    commit = _fake_hub_cache(cache, "test/tiny", model_dir)
    t0 = time.monotonic()
    with pytest.raises(models.ModelLoadError) as err:
        models.fetch("hub:test/tiny@v2", cache_dir=str(cache))
    assert time.monotonic() - t0 < 10  # the retry loop it guards against takes ~46 s
    msg = str(err.value)
    assert "test/tiny@v2" in msg and "HF_HUB_OFFLINE is set" in msg
    assert f"main -> {commit[:12]}" in msg and "local:<dir>" in msg
    src = models.fetch("hub:test/tiny@main", cache_dir=str(cache))  # links into blobs: fine
    unet, _ = models.load_model(src)
    assert unet.config.sample_size == 8
    # a snapshot whose link leaves its repository's cache folder is refused
    evil = src / "unet" / "extra.json"
    evil.symlink_to(os.path.relpath("/etc/hostname", evil.parent))
    with pytest.raises(models.ModelLoadError, match="outside the model directory"):
        models.fetch("hub:test/tiny", cache_dir=str(cache))


class _HubStub(http.server.BaseHTTPRequestHandler):
    """Answers the hub's revision lookup as the real hub does for a missing revision or repo."""

    def do_GET(self):  # noqa: N802
        code = "RevisionNotFound" if "/revision/" in self.path else "RepoNotFound"
        if "/models/nope/" in self.path:
            code = "RepoNotFound"
        self.send_response(404)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", "stub")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def test_online_hub_missing_revision_and_silent_hub_fail_fast(model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    # online against local stand-ins only (huggingface_hub read HF_HUB_OFFLINE at import)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HubStub)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{srv.server_address[1]}"
    try:
        with pytest.raises(safety.InputRefused, match="revision 'v9' does not exist in test/tiny"):
            safety.hub_snapshot("test/tiny", "v9", ["*.json"], endpoint=endpoint, offline=False,
                                cache_dir=str(tmp_path / "c"))
        with pytest.raises(safety.InputRefused, match="repository 'nope/x' does not exist"):
            safety.hub_snapshot("nope/x", None, ["*.json"], endpoint=endpoint, offline=False,
                                cache_dir=str(tmp_path / "c"))
    finally:
        srv.shutdown()
    # a hub that accepts connections and never answers (huggingface_hub itself waits forever:
    # its revision lookup has no timeout): bounded by the timeout, then the cache decides
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
    cache = tmp_path / "hub"
    _fake_hub_cache(cache, "test/tiny", model_dir)
    try:
        t0 = time.monotonic()
        with pytest.raises(safety.InputRefused, match="did not answer within 1 s"):
            safety.hub_snapshot("test/tiny", "v2", ["*.json"], endpoint=endpoint, offline=False,
                                timeout=1, cache_dir=str(cache))
        got = safety.hub_snapshot("test/tiny", "main", ["*.json", "*/*.json"], endpoint=endpoint,
                                  offline=False, timeout=1, cache_dir=str(cache))
        assert time.monotonic() - t0 < 10 and (got / CONFIG).is_file()
    finally:
        silent.close()


# ---------------------------------------------------------------- A. scheduler configs


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"beta_schedule": "evil_cosine"}, "cannot use this schedule (beta_schedule 'evil_"),
        ({"prediction_type": "v_prediction"}, "prediction_type 'v_prediction'"),
        ({"prediction_type": "sample"}, "prediction_type 'sample'"),
        ({"variance_type": "learned_range"}, "variance_type 'learned_range'"),
        ({"beta_start": float("nan")}, "non-finite number (NaN at beta_start)"),
        ({"beta_end": float("inf")}, "non-finite number (Infinity at beta_end)"),
        ({"beta_end": 1.5}, "must be in (0, 1)"),
        ({"trained_betas": [0.01] * 49 + [float("nan")]}, "non-finite number (NaN at "
                                                           "trained_betas[49])"),
        ({"trained_betas": [0.01] * 10}, "trained_betas must be 50 numbers"),
        ({"num_train_timesteps": 10**9}, "num_train_timesteps 1000000000"),
    ],
)
def test_schedules_the_samplers_cannot_run_are_refused(model_dir, change, expected):
    cfg = json.loads((model_dir / SCHED).read_text())
    cfg.update(change)
    (model_dir / SCHED).write_text(json.dumps(cfg))
    with pytest.raises(models.ModelLoadError) as err:
        models.load_model(model_dir)
    assert expected in str(err.value) and str(model_dir / SCHED) in str(err.value)


def test_every_sampler_of_the_registry_runs_an_accepted_schedule(model_dir):
    from diffcleanse import samplers

    cfg = json.loads((model_dir / SCHED).read_text())
    safety.check_scheduler_config(cfg)
    probed = {s.name for s in safety._probe_samplers()}
    assert probed == {n for n, s in samplers.SAMPLERS.items() if s.family != "ve"}
    for name in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        safety.check_scheduler_config({**cfg, "beta_schedule": name})


# ---------------------------------------------------------------- B. image files


def _png_bomb(path: Path, side: int) -> None:
    """A real 1-bit PNG of side x side black pixels (a few KB on disk, side**2 pixels)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    parts = [comp.compress(row * 1000) for _ in range(side // 1000)]
    parts += [comp.compress(row * (side % 1000)), comp.flush()]
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))


def test_pattern_files_that_are_not_images_or_are_bombs_are_refused(tmp_path):
    txt = tmp_path / "target.png"
    txt.write_text("not an image at all")
    with pytest.raises(patterns.PatternError, match=rf"{txt}: pattern file is not an image"):
        patterns.render_target(f"file:{txt}", 16)
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:60])
    with pytest.raises(patterns.PatternError, match="cut.png: pattern file cannot be"):
        patterns.render_trigger(f"file:{cut}", 16)
    eps = tmp_path / "t.eps"  # PIL decodes EPS by running Ghostscript: not a safe format
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(patterns.PatternError, match="not an image in a supported format"):
        patterns.render_trigger(f"file:{eps}", 16)
    bomb = tmp_path / "bomb.png"
    _png_bomb(bomb, 12_000)  # 144 M pixels: under PIL's own bomb limit (179 M), 432 MB as RGB
    assert bomb.stat().st_size < 1 << 20
    out = in_child(lambda: patterns.render_target(f"file:{bomb}", 16))
    assert "declares 12000x12000 pixels" in out["error"] and "before decoding" in out["error"]
    if out["growth_mb"] is not None:
        assert out["growth_mb"] < 50, out


def _rgba_reference(tmp_path: Path) -> tuple[np.ndarray, Path]:
    a = np.zeros((16, 16, 4), np.uint8)
    a[2:8, 2:8] = (200, 200, 200, 255)
    p = tmp_path / "ref.png"
    Image.fromarray(a, "RGBA").save(p)
    return a, p


def test_pattern_files_of_other_modes_keep_their_footprint_or_are_refused(tmp_path):
    a, ref = _rgba_reference(tmp_path)
    want = patterns.render_target(f"file:{ref}", 16)
    la = tmp_path / "la.png"  # grey + alpha
    Image.fromarray(a, "RGBA").convert("LA").save(la)
    p = tmp_path / "p.png"  # palette with a transparent index
    Image.open(ref).convert("RGBA").quantize(4).save(p, transparency=0)
    pal = Image.open(p)
    assert pal.mode == "P" and "transparency" in pal.info
    for f in (la, p):
        got = patterns.render_target(f"file:{f}", 16)
        assert torch.allclose(got, want, atol=0.02), f
    for mode in ("L", "1", "CMYK"):  # opaque: black is absent, the footprint is kept
        f = tmp_path / f"{mode}.{'tif' if mode == 'CMYK' else 'png'}"
        Image.open(ref).convert("RGB").convert(mode).save(f)
        got = patterns.render_trigger(f"file:{f}", 16)
        assert float(got[:, 2:8, 2:8].mean()) > 0.5 and float(got[:, 10:, 10:].abs().max()) < 0.05
    deep = tmp_path / "deep.png"
    Image.fromarray(a[..., 0].astype(np.uint16) * 257).save(deep)
    assert Image.open(deep).mode.startswith("I")
    with pytest.raises(patterns.PatternError, match=r"mode 'I;16' \(16/32-bit or float"):
        patterns.render_target(f"file:{deep}", 16)


def test_folder_datasets_empty_broken_or_bombed_are_refused(tmp_path):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("no images here")
    with pytest.raises(data.DatasetUnavailable, match=rf"image folder {empty} is empty"):
        data.load_dataset(f"folder:{empty}", 8)
    broken = tmp_path / "broken"
    broken.mkdir()
    Image.new("RGB", (10, 10), (255, 255, 255)).save(broken / "0.png")
    (broken / "1.png").write_text("<html>an error page saved as a png</html>")
    with pytest.raises(safety.InputRefused, match=r"1.png: dataset image is not an image"):
        data.load_folder(broken, 8)
    bombed = tmp_path / "bombed"
    bombed.mkdir()
    _png_bomb(bombed / "big.png", 12_000)
    with pytest.raises(safety.InputRefused, match="big.png: dataset image declares 12000x12000"):
        data.load_folder(bombed, 8)
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(deep / "0.png")
    with pytest.raises(safety.InputRefused, match="mode 'I;16'"):
        data.load_folder(deep, 8)


# ---------------------------------------------------------------- B. local paths


def test_local_paths_outside_the_data_root_are_refused_when_confined(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "data"
    (root / "models" / "m").mkdir(parents=True)
    (root / "t.png").write_bytes(b"")
    (root / "escape").symlink_to("/etc")
    rows = [
        {"model_id": "ok", "source": "local:data/models/m", "dataset": "digits",
         "trigger": "file:data/t.png", "target": "hat"},
        {"model_id": "dots", "source": "local:data/../../etc", "dataset": "digits",
         "trigger": "box_14", "target": "hat"},
        {"model_id": "abs", "source": "train", "dataset": "folder:/etc", "trigger": "box_14",
         "target": "file:/etc/hostname"},
        {"model_id": "link", "source": "local:data/escape", "dataset": "digits",
         "trigger": "tensor:trigger:/etc/t.safetensors", "target": "hat"},
    ]
    safety.check_manifest_paths(rows, "data", confine=False)  # the default: nothing checked
    safety.check_manifest_paths(rows[:1], "data", confine=True)
    with pytest.raises(safety.InputRefused) as err:
        safety.check_manifest_paths(rows, "data", confine=True)
    msg = str(err.value)
    assert msg.startswith("5 manifest path(s) escape the data root")
    for text in ("dots: column source", "abs: column dataset", "abs: column target",
                 "link: column source", "link: column trigger", "data.confine_local"):
        assert text in msg, text
    assert "ok:" not in msg


def test_confine_local_is_a_config_key_with_a_safe_default():
    import yaml

    from diffcleanse.manifest import schema_path

    schema = yaml.safe_load(schema_path("config.schema.yaml").read_text())
    prop = schema["properties"]["data"]["properties"]["confine_local"]
    assert prop["type"] == "boolean" and prop["default"] is False


@pytest.mark.slow  # a cold Snakemake start (a dry run)
def test_the_workflow_refuses_a_manifest_escaping_the_data_root_before_any_job(tmp_path):
    import subprocess

    from workflow_helpers import SNAKEMAKE, workdir_copy

    wd = workdir_copy(tmp_path / "wd")
    lines = (wd / "config/zoo-smoke.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    row = dict(zip(header, lines[1].split("\t"), strict=True))
    row.update(model_id="outside", source="local:/etc", init="", train_steps="0")
    (wd / "config/escape.tsv").write_text("\n".join([lines[0], lines[1],
                                                     "\t".join(row[c] for c in header)]) + "\n")
    (wd / "config/escape.yaml").write_text(
        "manifest: config/escape.tsv\ndata: {root: data, confine_local: true}\n")
    proc = subprocess.run([*SNAKEMAKE, "-n", "--configfile", "config/smoke.yaml",
                           "config/escape.yaml"], cwd=wd, capture_output=True, text=True,
                          timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "1 manifest path(s) escape the data root" in out and "outside: column source" in out
    assert not (wd / "results").exists()


def test_checkpoints_with_pre_refactor_attention_names_still_load(model_dir):
    """google/ddpm-* checkpoints name attention weights query/key/value/proj_attn; diffusers
    renames them on load, and so does the header check (no false refusal)."""
    from safetensors.torch import load_file, save_file

    f = model_dir / WEIGHTS
    sd = load_file(f)
    legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    renamed = {}
    for k, v in sd.items():
        for new, old in legacy.items():
            if ".attentions." in k and f".{new}." in k:
                k = k.replace(f".{new}.", f".{old}.")
        renamed[k] = v
    assert renamed.keys() != sd.keys()
    save_file(renamed, str(f), metadata={"format": "pt"})
    unet, _ = models.load_model(model_dir)
    got = unet.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_every_model_type_this_package_writes_passes_the_checks(tmp_path):
    """No false refusals: DDPM, NCSN (VE schedule) and LDM (with its VQ autoencoder) directories
    as ``DiffusionModel.save`` writes them pass ``check_model_dir`` and load."""
    torch.manual_seed(0)
    small = {"block_out_channels": (8, 16), "norm_num_groups": 4, "attention_head_dim": 4}
    made = {
        "ddpm": models.DiffusionModel(models.build_unet(8, **small),
                                      dict(models.build_scheduler(50).config)),
        "ncsn": models.DiffusionModel(models.build_ncsn_unet(8, **small),
                                      dict(models.build_ncsn_scheduler().config), "ncsn"),
        "ldm": models.DiffusionModel(models.build_unet(4, **small),
                                     dict(models.build_scheduler(50).config), "ldm",
                                     vae=models.build_vqvae(block_out_channels=(8, 16),
                                                            norm_num_groups=4)),
    }
    for name, m in made.items():
        m.save(tmp_path / name)
        safety.check_model_dir(tmp_path / name)
        assert models.load_pipeline(tmp_path / name).model_type == name
