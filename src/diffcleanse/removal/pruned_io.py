"""The pruned-model format, and repaired models people can ship.

diffusers' ``save_pretrained`` writes a config that describes the *unpruned* architecture, and
``torch.save`` of the module would need unpickling to load. A pruned model directory therefore holds
the original config, the pruned safetensors weights and ``unet/pruned_shapes.json`` (the format is
documented in ``removal.portable``, the self-contained loader). ``models.load_model`` loads it by
itself; ``write_bundle`` makes a repaired model loadable *without* diffcleanse: it copies the loader
into the directory as ``load_pruned.py`` and writes a ``README.md`` with the one call to make (an
unpruned model, e.g. after Elijah's removal, is a plain diffusers pipeline directory, so its type's
pipeline, e.g. ``DDPMPipeline.from_pretrained``, loads it). Both get a ``model_index.json`` naming
the pipeline, which the loader follows: NCSN and LDM models keep their type and autoencoder.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel
from safetensors.torch import save_file

from diffcleanse.removal import portable
from diffcleanse.removal.portable import (  # noqa: F401  (the format's names, re-exported)
    FORMAT,
    PRUNED_SHAPES,
    WEIGHTS,
    PrunedFormatError,
    UnevenGroupNorm,
    _set_module,
    apply_shapes,
    group_norm_for,
    module_shapes,
)

LOADER = "load_pruned.py"


def _reference(config: dict[str, Any]) -> UNet2DModel:
    """The unpruned model a config describes (on the meta device: no memory, no init)."""
    return portable.reference(config)


def pruned_shapes(unet: UNet2DModel) -> dict[str, dict[str, Any]]:
    """Modules whose shapes differ from what ``unet.config`` builds (empty: not pruned)."""
    ref = module_shapes(_reference(unet.config))
    return {k: v for k, v in module_shapes(unet).items() if ref.get(k) != v}


def save_pruned_unet(unet: UNet2DModel, unet_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Write config + safetensors weights + pruned shapes into ``unet_dir``; returns the shapes."""
    unet_dir = Path(unet_dir)
    unet_dir.mkdir(parents=True, exist_ok=True)
    shapes = pruned_shapes(unet)
    unet.save_config(unet_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    save_file(tensors, str(unet_dir / WEIGHTS), metadata={"format": "pt"})
    (unet_dir / PRUNED_SHAPES).write_text(json.dumps({"format": FORMAT, "modules": shapes},
                                                     indent=1, sort_keys=True) + "\n")
    return shapes


def load_pruned_unet(unet_dir: str | Path) -> UNet2DModel:
    """Rebuild a pruned UNet2DModel from ``unet_dir`` (config, shapes, safetensors): no pickles.
    Shapes and weights are checked against each other before anything is allocated."""
    from diffcleanse import safety  # issue 15: the hostile-input checks, before loading

    d = Path(unet_dir)
    try:
        safety.check_component(d / "unet" if (d / "unet" / "config.json").is_file() else d)
    except safety.InputRefused as err:
        raise PrunedFormatError(f"refused: {err}") from err
    return portable.load_unet(unet_dir)


_README = """# A repaired diffusion model (written by diffcleanse {version})

{what}

## Load it

{how}

Sampling a backdoor-free model needs no special settings; the saved scheduler says
`clip_sample: false`, as the training convention of the attacks this model was repaired from.
"""

_HOW_PRUNED = """This model was pruned: its layer shapes differ from what `unet/config.json`
builds, so `{pipeline}.from_pretrained` cannot load it. `load_pruned.py` (in this folder;
needs only torch, diffusers and safetensors) rebuilds it from `unet/pruned_shapes.json` and
loads the weights:

```python
import sys
sys.path.insert(0, "{path}")
import load_pruned
pipe = load_pruned.load_pipeline("{path}")     # a diffusers {pipeline}
unet = load_pruned.load_unet("{path}")         # or just the UNet2DModel
```

With diffcleanse installed: `diffcleanse.models.load_pipeline("{path}")`.
"""

_HOW_PLAIN = """A plain diffusers pipeline directory:

```python
from diffusers import {pipeline}
pipe = {pipeline}.from_pretrained("{path}")
```

With diffcleanse installed: `diffcleanse.models.load_pipeline("{path}")`.
"""


def write_bundle(model_dir: str | Path, what: str = "",
                 final_dir: str | Path | None = None) -> dict[str, Any]:
    """Make a model directory (``unet/`` + ``scheduler/``) loadable without diffcleanse.

    Both: a ``model_index.json`` naming the model type's pipeline (a DDPM pipeline's is written
    when the directory has none; NCSN and LDM directories have theirs). Pruned: copy the
    self-contained loader as ``load_pruned.py``. Unpruned: that is a diffusers pipeline
    directory as it stands. Both: a ``README.md`` with the call,
    naming ``final_dir`` (where the directory will live, when written to a temporary place first).
    Returns what was written and how to load it.
    """
    from diffcleanse import __version__

    model_dir = Path(model_dir)
    pruned = (model_dir / "unet" / PRUNED_SHAPES).is_file()
    shown = str(final_dir or model_dir)
    if not (model_dir / "model_index.json").is_file():  # NCSN and LDM dirs have theirs
        import diffusers

        index = {**portable.DEFAULT_INDEX, "_diffusers_version": diffusers.__version__,
                 "unet": ["diffusers", "UNet2DModel"]}
        (model_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    pipeline = portable.pipeline_index(model_dir)["_class_name"]
    if pruned:
        (model_dir / LOADER).write_text(Path(portable.__file__).read_text())
        how = _HOW_PRUNED.format(path=shown, pipeline=pipeline)
        call = f'load_pruned.load_pipeline("{shown}")  (after sys.path.insert(0, "{shown}"))'
    else:
        how = _HOW_PLAIN.format(path=shown, pipeline=pipeline)
        call = f'diffusers.{pipeline}.from_pretrained("{shown}")'
    (model_dir / "README.md").write_text(_README.format(version=__version__, what=what, how=how))
    return {"dir": shown, "pruned": pruned, "portable_call": call,
            "diffcleanse_call": f'diffcleanse.models.load_pipeline("{shown}")',
            "files": sorted(str(p.relative_to(model_dir)) for p in model_dir.rglob("*")
                            if p.is_file())}
