"""Expensive session artefacts (the tiny zoo, the official-convention tiny model) built once per
run, whichever pytest-xdist worker asks first, and kept between runs in the pytest cache."""

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock


@contextlib.contextmanager
def shared_dir(request, tmp_path_factory, name: str) -> Iterator[Path]:
    """A directory for an expensive session artefact, held under a file lock while the caller
    checks and builds it: in the pytest cache (kept between runs) when there is one, else in this
    run's base temp, shared by all of its xdist workers, so the artefact is built once."""
    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    if cache is not None:
        root = cache.mkdir(name)
    else:
        base = tmp_path_factory.getbasetemp()
        if os.environ.get("PYTEST_XDIST_WORKER"):
            base = base.parent  # pytest-N/, above each worker's popen-gwK/
        root = base / name
        root.mkdir(exist_ok=True)
    with FileLock(str(root) + ".lock"):
        yield root
