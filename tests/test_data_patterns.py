"""Datasets and the drawn triggers/targets."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffcleanse import data, patterns


def test_digits_are_real_resized_three_channel_images():
    x, y = data.load_digits(16)
    assert x.shape == (1797, 3, 16, 16) and y.shape == (1797,)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert float(x.min()) < -0.99 and float(x.max()) > 0.9  # black background, white strokes
    assert torch.equal(x[:, 0], x[:, 1])  # grey digits
    assert set(y.tolist()) == set(range(10))


def test_folder_loader_and_missing_folder(tmp_path):
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (20, 12), colour).save(tmp_path / f"{i}.png")
    x = data.load_folder(tmp_path, 8)
    assert x.shape == (2, 3, 8, 8)
    assert float(x[0, 0].mean()) > 0.99 and float(x[1, 2].mean()) > 0.99
    with pytest.raises(data.DatasetUnavailable, match="does not exist"):
        data.load_folder(tmp_path / "nope", 8)


@pytest.mark.parametrize("name", ["cifar10", "mnist", "celeba", "celebahq"])
def test_missing_real_dataset_says_how_to_point_at_a_copy(tmp_path, name):
    with pytest.raises(data.DatasetUnavailable, match="data.root"):
        data.load_dataset(name, 32, tmp_path)


@pytest.mark.parametrize("size", [8, 16, 32, 64])
@pytest.mark.parametrize("name", patterns.TRIGGERS)
def test_triggers_render_at_any_size(name, size):
    r = patterns.render_trigger(name, size)
    assert r.shape == (3, size, size)
    if name != "blend":
        assert float(r.min()) >= 0 and float(r.max()) <= 2  # additive offset, zero background
        assert 0 < float((r > 0.05).float().mean()) < 0.5  # a footprint, not the whole image


def test_trigger_sizes_scale_and_sit_bottom_right():
    areas = [
        float((patterns.render_trigger(f"box_{s}", 32) > 0.05).float().sum())
        for s in (8, 11, 14, 18)
    ]
    assert areas == sorted(areas) and areas[0] < areas[-1]
    r = patterns.render_trigger("stop_14", 32)
    assert float(r[:, 16:, 16:].sum()) > 0.95 * float(r.sum())


@pytest.mark.parametrize("name", patterns.IMAGE_TARGETS)
def test_targets_are_images_on_black(name):
    y = patterns.render_target(name, 32, trigger="stop_14")
    assert y.shape == (3, 32, 32) and float(y.min()) == -1 and float(y.max()) > 0
    assert float((y > -0.9).float().mean()) < 0.6


def test_shift_target_moves_trigger_to_upper_left():
    t = patterns.render_target("trigger", 32, "stop_14")
    s = patterns.render_target("shift", 32, "stop_14")
    assert float((t[:, 16:, 16:] > -0.9).float().sum()) > 0
    assert float((s[:, :16, :16] > -0.9).float().sum()) > float(
        (s[:, 16:, 16:] > -0.9).float().sum()
    )


def test_file_patterns_and_errors(tmp_path):
    a = np.zeros((16, 16, 4), np.uint8)
    a[2:6, 2:6] = (255, 255, 255, 255)
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    r = patterns.render_trigger(f"file:{tmp_path / 't.png'}", 16)
    assert float(r[:, 2:6, 2:6].mean()) > 1.9 and float(r[:, 8:, 8:].abs().max()) == 0
    with pytest.raises(patterns.PatternError, match="unknown trigger"):
        patterns.render_trigger("box_99x", 16)
    with pytest.raises(patterns.PatternError, match="class of images"):
        patterns.render_target("class:7", 16)
    with pytest.raises(patterns.PatternError, match="does not exist"):
        patterns.render_trigger("file:/nope.png", 16)
