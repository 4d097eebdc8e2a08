"""JAX's persistent compilation cache: process-wide state that entry points set (klein-generate, klein-serve,
notebooks), never a library constructor."""

from __future__ import annotations

import logging
import os
import pathlib

from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger(__name__)


def enable_compilation_cache(path: str | os.PathLike) -> pathlib.Path:
    """Points JAX's persistent compilation cache at `path` (created if missing), so a restart loads programs from disk.

    Programs that took at least `jax_persistent_cache_min_compile_time_secs` (1 s by default) to compile are stored.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    compilation_cache.set_cache_dir(os.fspath(path))
    compilation_cache.reset_cache()  # JAX opens its cache once per process: let the next compile open this folder
    log.info("persistent compilation cache: %s", path)
    return path
