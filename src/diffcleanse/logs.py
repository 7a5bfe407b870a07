"""Send a stage's stderr (tqdm progress, warnings) and logging to its log file."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def log_to(path: str | Path, threads: int | None = None) -> logging.Logger:
    """Redirect stderr to ``path`` (appending), route logging there, and set torch's threads."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    stream = open(path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process
    sys.stderr = stream
    logging.basicConfig(
        stream=stream,
        level=logging.INFO,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    return logging.getLogger("diffcleanse")
