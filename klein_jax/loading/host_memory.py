"""Handing freed host memory back to the system between the load's phases (glibc only; a no-op elsewhere).

Loading a component frees gigabytes of read buffers (orbax/tensorstore's, and on a mesh the parts of the fused
layers). glibc keeps freed blocks in its heaps for reuse, and the next component's arrays, of other sizes, mostly
do not reuse them: the process's RSS grows by what the previous phase freed. klein-4B sharded over 8 CPU devices
held 11.9 GiB after its 7.2 GiB transformer and peaked at 15.4 GiB; trimming after each phase, 7.5 and 13.8 GiB
(benchmarks/sharded_load_memory.py, docs/sharding.md).
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return None


def release_freed_memory() -> bool:
    """glibc's malloc_trim(0): returns the free pages of every heap to the system. True if it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
