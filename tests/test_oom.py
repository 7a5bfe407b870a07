"""A batch that does not fit memory stops with the config key to lower (issue 14, bad input)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import yaml
from child_helpers import in_child

from diffcleanse import inversion, models
from diffcleanse.oom import BatchTooLarge, is_out_of_memory, lower_on_oom

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow" / "scripts"
# the rules whose work grows with a batch: each must name the key that sets it
HEAVY = ["train_model", "train_classifier", "train_target_classifier", "invert_trigger",
         "evaluate", "fid_reference", "clean_data", "importance", "finetune", "elijah_removal",
         "removal_ablation", "adaptive_snapshot_eval", "ablate_threshold", "ablate_entropy_loss",
         "gallery"]


def _tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.UNet2DModel(sample_size=16, in_channels=1, out_channels=1,
                              block_out_channels=(16, 32), layers_per_block=1,
                              down_block_types=("DownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8).eval()


def _forward(unet: torch.nn.Module, batch: int) -> None:
    with torch.no_grad():
        unet(torch.zeros(batch, 1, 16, 16), torch.zeros(batch, dtype=torch.long))


def test_a_batch_that_does_not_fit_names_the_key_to_lower():
    """A real refused allocation (the child's address space is capped 1.5 GB above its size; a
    forward at batch 200,000 needs about 3 GB per activation) becomes BatchTooLarge naming the
    key; the same forward outside the guard is the allocator's bare error, and a batch that fits
    passes through untouched."""
    unet = _tiny_unet()
    bare = in_child(lambda: _forward(unet, 200_000))
    assert bare["error"] and not bare["error"].startswith("BatchTooLarge"), bare
    assert "alloc" in bare["error"].lower() or "memory" in bare["error"].lower(), bare

    def guarded() -> None:
        with lower_on_oom("evaluation.fid.batch_size", stage="the evaluation"):
            _forward(unet, 200_000)

    out = in_child(guarded)
    assert out["error"].startswith("BatchTooLarge: the evaluation ran out of memory"), out
    assert "lower `evaluation.fid.batch_size` in the config" in out["error"], out
    assert in_child(lambda: _forward(unet, 4))["error"] is None
    if out["growth_mb"] is not None:
        assert out["growth_mb"] < 1600, out


def test_other_errors_pass_through_unchanged():
    with pytest.raises(ValueError, match="not memory"), lower_on_oom("train.batch_size"):
        raise ValueError("not memory")
    with pytest.raises(BatchTooLarge, match="`--batch-size` on the command line"), \
            lower_on_oom("--batch-size", where="on the command line"):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    assert is_out_of_memory(MemoryError()) and not is_out_of_memory(RuntimeError("shape"))


def _oom_keys(script: Path) -> list[ast.expr]:
    """The positional arguments of the script's ``lower_on_oom(...)`` calls."""
    calls = [n for n in ast.walk(ast.parse(script.read_text()))
             if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "lower_on_oom"]
    assert calls, f"{script.name} runs a batched stage without lower_on_oom"
    return [a for c in calls for a in c.args]


def _has_key(config: dict, dotted: str) -> bool:
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


@pytest.mark.parametrize("rule", HEAVY)
def test_every_batched_rule_names_keys_that_exist(rule):
    """Each heavy rule's script guards its stage, and every key it names is a key of the default
    config (a typo would send users to a key that does not exist)."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    for arg in _oom_keys(SCRIPTS / f"{rule}.py"):
        if isinstance(arg, ast.Constant):
            assert _has_key(config, arg.value), f"{rule}: {arg.value} is not in config.yaml"
        else:  # invert_trigger: the method's keys from the registry
            assert "batch_keys" in ast.unparse(arg), ast.unparse(arg)


@pytest.mark.parametrize("method", sorted(inversion.METHODS))
def test_each_inversion_methods_batch_keys_are_settings_it_accepts(method):
    keys = inversion.batch_keys(method)
    assert keys[0] == "inversion.batch_size"
    spec = inversion.get_method(method)
    for key in keys[1:]:
        setting = key.split(".")[-1]
        spec.make_spec({setting: 8})  # accepted: a real setting of the method
    assert (len(keys) > 1) == (method != "bbti")  # BBTI's batch is the verdict batch
