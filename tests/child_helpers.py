"""A forked child under a capped address space: what a refused allocation does, measured
(shared by tests/test_hostile_inputs.py and tests/test_oom.py)."""

from __future__ import annotations

import json
import os
import re
import resource
from pathlib import Path


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def in_child(fn, headroom_mb: int = 1500) -> dict:
    """Run ``fn`` in a forked child with its address space capped at the current size plus
    ``headroom_mb``; returns its error (type and message, or None) and its peak RSS growth in
    MB (None where the peak cannot be reset)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(r)
        out: dict = {"error": None, "growth_mb": None}
        try:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM)
                base = _status("VmRSS")
                reset = True
            except OSError:
                base, reset = 0, False
            vm = _status("VmSize") * 1024
            cap = vm + (headroom_mb << 20)
            resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 - reported to the parent
                out["error"] = f"{type(err).__name__}: {err}"
            if reset:
                out["growth_mb"] = (_status("VmHWM") - base) / 1024
        finally:
            os.write(w, json.dumps(out).encode())
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as fh:
        raw = fh.read()
    os.waitpid(pid, 0)
    return json.loads(raw)
