"""Output records and atomic writes: every file a stage makes appears whole or not at all."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from diffcleanse import __version__, precision


def derive_seed(base_seed: int, *parts: object) -> int:
    """A 63-bit seed from the config's seed and any identifying parts (model id, stage name)."""
    text = "\x1f".join([str(int(base_seed)), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def params_hash(params: dict[str, Any]) -> str:
    """A short stable hash of a JSON-able parameter dict (used to refuse a stale checkpoint)."""
    blob = json.dumps(params, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Works for files and directories. On error the temporary path is removed and ``path`` is left
    untouched, so a killed or failing job never leaves a half-written output behind. What a
    SIGKILLed earlier write of the same path left (nothing ran its cleanup) is removed first: a
    path has one writer at a time, so do not point two live processes at the same output.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    target = tmp / final.name
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written to {target} for {final}")
        _remove(final)
        os.replace(target, final)
    except Exception as err:
        err.add_note(f"{final}: not written (disk full or unwritable?); its partial temporary "
                     f"was removed, nothing half-written is left")
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(final: Path) -> None:
    """Remove the temporaries of ``final`` that a killed earlier attempt left (SIGKILL runs no
    ``finally``). One output has one writer at a time (Snakemake locks the directory, a job owns
    its outputs), so any ``.<name>.<8 random>.tmp`` beside it is from a dead attempt."""
    pattern = re.compile(rf"\.{re.escape(final.name)}\.[a-z0-9_]{{8}}\.tmp")
    for p in final.parent.iterdir():
        if pattern.fullmatch(p.name):
            _remove(p, ignore_errors=True)


def _remove(p: Path, *, ignore_errors: bool = False) -> None:
    """Remove a file, a link or a whole folder, if it exists."""
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
    except OSError:
        if not ignore_errors:
            raise


@contextlib.contextmanager
def scratch_dir(parent: str | os.PathLike[str], name: str) -> Iterator[Path]:
    """A job's working folder ``parent/.name.scratch``, empty on entry and gone on exit.

    The name is fixed, not random, so the folder a killed earlier attempt left behind (SIGKILL,
    a preempted SLURM job: nothing runs its cleanup) is the one the rerun clears first; it is
    hidden, so it is never mistaken for an output.
    """
    path = Path(parent) / f".{name}.scratch"
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write JSON atomically (sorted keys, indented)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def make_record(
    stage: str, params: dict[str, Any], seed: int | None, seconds: float, **values: Any
) -> dict[str, Any]:
    """A stage's output record: its values plus what made them (params, version, seed, seconds)."""
    return {
        "stage": stage,
        **values,
        "params": params,
        "seed": seed,
        "precision": precision.current(),  # of the UNet evaluations (config precision)
        "seconds": round(float(seconds), 3),
        "diffcleanse_version": __version__,
        "created_unix": int(time.time()),
    }


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
