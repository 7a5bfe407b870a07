"""Peak memory of loading a dataset whole, per value held: what ``diffcleanse.memory`` charges.

Each case runs in a fresh process: it builds its input (an image folder on disk, or a uint8
array like torchvision's CIFAR-10), notes its peak resident memory (``ru_maxrss``), runs the
loader, and prints the growth of the peak divided by the values of the float32 result
(N x 3 x S x S): 4.0 would be the result alone. Cases:

* ``folder``: ``data.load_folder`` (CelebA-HQ and any folder dataset; the training path);
* ``uint8``: ``data.to_model_range`` of a uint8 array with ``divide=255`` (CIFAR-10, MNIST);
* ``reference``: ``load_folder`` then ``evaluation.to_uint8`` (an evaluation's FID reference);

each beside the code it replaced (``old``: images listed then stacked, the whole set converted at
once, ``to_uint8`` over the whole set), measured in the same run; the ratio old/new is the saving.
The bound is ``memory.BYTES_PER_VALUE``.

    python benchmarks/memory.py [--images 3000] [--size 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys
import numpy as np, torch
import torch.nn.functional as F
from PIL import Image
from diffcleanse import data, evaluation

case, version, folder = sys.argv[1:4]
n, size = int(sys.argv[4]), int(sys.argv[5])

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

def old_range(images, s):
    x = images.float()
    if x.shape[-2:] != (s, s):
        x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
    return (x.clamp(0, 1) * 2 - 1).contiguous()

def old_folder():
    out = []
    for f in sorted(Path(folder).glob("*.png")):
        with Image.open(f) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
                       .permute(2, 0, 1))
    return old_range(torch.stack(out), size)

def old_uint8(x):
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

from pathlib import Path
if case == "uint8":
    rng = np.random.default_rng(0)
    src = torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    src = src.permute(0, 3, 1, 2)
base = peak()
if case == "folder":
    x = data.load_folder(folder, size) if version == "new" else old_folder()
elif case == "uint8":
    if version == "new":
        x = data.to_model_range(src, size, divide=255.0)
    else:
        x = old_range(src.float() / 255.0, size)
else:
    x = data.load_folder(folder, size) if version == "new" else old_folder()
    u = evaluation.to_uint8(x) if version == "new" else old_uint8(x)
print(json.dumps({"growth": peak() - base, "values": x.numel()}))
"""


def make_folder(where: Path, n: int, size: int) -> None:
    """``n`` random RGB PNGs of ``size`` px."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            where / f"{i:05d}.png")


def measure(case: str, version: str, folder: Path, n: int, size: int) -> float:
    """Growth of the peak RSS per float32 value of the loaded set, in bytes (a fresh process)."""
    proc = subprocess.run([sys.executable, "-c", CHILD, case, version, str(folder), str(n),
                           str(size)], capture_output=True, text=True, check=True, timeout=600)
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    return rec["growth"] / rec["values"]


def main(argv: list[str] | None = None) -> int:
    """Print bytes per value, new and old, per case, and the bound ``diffcleanse.memory`` uses."""
    from diffcleanse import memory

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = ap.parse_args(argv)
    out = {"images": args.images, "size": args.size, "bound": memory.BYTES_PER_VALUE, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        make_folder(Path(tmp), args.images, args.size)
        for case in ("folder", "uint8", "reference"):
            new = measure(case, "new", Path(tmp), args.images, args.size)
            old = measure(case, "old", Path(tmp), args.images, args.size)
            out["cases"][case] = {"new": new, "old": old, "old/new": old / new}
    if args.json:
        print(json.dumps(out))
        return 0
    print(f"{args.images} images at {args.size} px; bytes of peak RSS growth per float32 value "
          f"held (4.0 = the result alone); bound {memory.BYTES_PER_VALUE}")
    print("| case | new | old | old/new |\n|---|---|---|---|")
    for case, r in out["cases"].items():
        print(f"| {case} | {r['new']:.2f} | {r['old']:.2f} | {r['old/new']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
