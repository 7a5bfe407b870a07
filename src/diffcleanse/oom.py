"""Out of memory at a batch size: stop with the config key to lower, not a bare allocator error.

A stage that runs out of memory (``torch.OutOfMemoryError`` on a GPU; on CPU the allocator's
``RuntimeError`` or ``MemoryError`` when an address-space or memory limit refuses an allocation)
is re-raised as ``BatchTooLarge``, naming the config keys that set that stage's batch (the
original error stays chained). A job that the kernel or SLURM kills for memory gets no exception
to catch: there the rule's ``mem_mb`` is what to raise (docs/cluster.md, "Memory per job").
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["BatchTooLarge", "is_out_of_memory", "lower_on_oom"]

# what torch's CPU allocator and its CUDA fallbacks say when an allocation is refused
_CPU_MESSAGES = ("DefaultCPUAllocator: can't allocate memory",
                 "DefaultCPUAllocator: not enough memory", "CUDA out of memory", "out of memory")


class BatchTooLarge(MemoryError):
    """A stage ran out of memory; the message names the batch keys to lower."""


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that did not fit (GPU or CPU)."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and any(m in str(err) for m in _CPU_MESSAGES)


@contextmanager
def lower_on_oom(*keys: str, stage: str = "this stage", where: str = "in the config",
                 note: str = "") -> Iterator[None]:
    """Run the block; an out-of-memory error inside becomes ``BatchTooLarge`` naming ``keys``
    (config keys, or command-line options with ``where='on the command line'``)."""
    try:
        yield
    except BatchTooLarge:
        raise
    except BaseException as err:
        if not is_out_of_memory(err):
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        names = " or ".join(f"`{k}`" for k in keys)
        raise BatchTooLarge(
            f"{stage} ran out of memory ({type(err).__name__}: {first}); its batch does not fit "
            f"this device: lower {names} {where} (e.g. halve it)"
            + (f"; {note}" if note else "")
            + "; or run it where there is more memory (the rule's mem_mb, a larger GPU)"
        ) from err
