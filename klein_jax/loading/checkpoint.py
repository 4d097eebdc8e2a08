"""Orbax checkpoints of one component's parameters: the on-disk format of a klein-convert output folder.

A component's nnx state is stored as a nested dict of arrays whose keys are the parameter path
(`transformer_blocks/0/attn/to_q/kernel`); restoring builds the target from the abstract module
(`nnx.eval_shape`), so arrays arrive directly in the module's dtypes (orbax casts on read) and nothing is
initialised at random.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from klein_jax.loading.host_memory import release_freed_memory
from klein_jax.loading.keymap import Path, first_ten
from klein_jax.loading.modules import expected_params, fill_module
from klein_jax.loading.safetensors import CheckpointError


def nest(params: Mapping[Path, Any]) -> dict[str, Any]:
    """{("a", 0, "kernel"): x} -> {"a": {"0": {"kernel": x}}} (orbax wants string keys)."""
    tree: dict[str, Any] = {}
    for path, value in params.items():
        node = tree
        for part in path[:-1]:
            node = node.setdefault(str(part), {})
        node[str(path[-1])] = value
    return tree


def flatten(tree: Mapping[str, Any], prefix: Path = ()) -> dict[Path, Any]:
    """The inverse of `nest`: digit keys become ints again, as in nnx paths."""
    out: dict[Path, Any] = {}
    for key, value in tree.items():
        path = (*prefix, int(key) if key.isdigit() else key)
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def _format(path: Path) -> str:
    return ".".join(str(p) for p in path)


class PendingArray:
    """An array that save_params reads only when it writes it: `source` (typically a memory-mapped view of a
    checkpoint tensor) is cast to `dtype`, made C-contiguous, written and dropped, so that a component is never whole
    in memory. on_read() is called after each read (progress)."""

    def __init__(self, source: np.ndarray, dtype: Any, *, on_read: Callable[[], Any] | None = None):
        self._source = source
        self._on_read = on_read
        self.shape = tuple(source.shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape, dtype=np.int64))
        self.nbytes = self.size * self.dtype.itemsize

    def read(self) -> np.ndarray:
        """The array, once: its source is released (a second read is an error)."""
        source, self._source = self._source, None
        if source is None:
            raise RuntimeError("PendingArray was already read")
        array = np.asarray(source, dtype=self.dtype, order="C")
        if self._on_read is not None:
            self._on_read()
        return array


def _streaming_handler():
    """orbax's numpy handler, writing one array at a time (it writes all of a tree's arrays concurrently) and
    reading PendingArrays just before their write: at most one array of the tree is in memory at a time."""
    import asyncio

    from orbax.checkpoint import type_handlers

    class StreamingNumpyHandler(type_handlers.NumpyHandler):
        def __init__(self):
            super().__init__(deepcopy_host_arrays=False)  # the default deep copy would hold the tree twice
            self._one_at_a_time: asyncio.Semaphore | None = None

        async def _open_and_write(self, value, tspec, ts_context):
            self._one_at_a_time = self._one_at_a_time or asyncio.Semaphore(1)
            async with self._one_at_a_time:
                array = value.read() if isinstance(value, PendingArray) else value
                await super()._open_and_write(array, tspec, ts_context)

    return StreamingNumpyHandler()


def save_params(path: str | os.PathLike, params: Mapping[Path, np.ndarray | PendingArray]) -> None:
    """Writes `params` (path -> host array or PendingArray) as an orbax checkpoint at `path` (which must not exist),
    one array at a time; synchronous.

    zstd compression saves ~20% of disk on bf16 weights at 3x the time, so it is off.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    handler = _streaming_handler()
    registry = type_handlers.create_type_handler_registry((np.ndarray, handler), (PendingArray, handler))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                      use_compression=False)) as checkpointer:
        checkpointer.save(pathlib.Path(path).absolute(), nest(params))


def saved_shapes(path: str | os.PathLike) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
    """path -> (shape, dtype) of every array in the checkpoint at `path`, read from its metadata."""
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    if not path.is_dir():
        raise CheckpointError(f"orbax checkpoint not found: {path}")
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            metadata = checkpointer.metadata(path)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable orbax checkpoint ({e})") from None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    return {p: (tuple(m.shape), np.dtype(m.dtype)) for p, m in flatten(tree).items()}


def check_shapes(path: str | os.PathLike,
                 expected: Mapping[Path, tuple[tuple[int, ...], Any]]) -> dict[Path, tuple[tuple[int, ...], np.dtype]]:
    """The saved shapes and dtypes (saved_shapes); raises CheckpointError listing missing, unexpected and mis-shaped
    arrays of a saved component."""
    saved = saved_shapes(path)
    problems = [f"missing {_format(p)}" for p in expected if p not in saved]
    problems += [f"unexpected {_format(p)}" for p in saved if p not in expected]
    problems += [f"{_format(p)}: saved shape {list(saved[p][0])}, model expects {list(s)}"
                 for p, (s, _) in expected.items() if p in saved and tuple(saved[p][0]) != tuple(s)]
    if problems:
        raise CheckpointError(f"{path} does not fit the model ({len(problems)}): {first_ten(problems)}")
    return saved


# GB orbax reads at once while restoring (at least the largest array: orbax refuses to read more than it reserved).
# Its default (96) reads every array of a component together, their read buffers on top of the placed arrays:
# klein-4B on one CPU device peaked at 15.4 GiB, with 1 GB at 14.5 GiB (benchmarks/sharded_load_memory.py).
RESTORE_CONCURRENT_GB = 1


def _restore_concurrent_gb(shapes) -> int:
    """RESTORE_CONCURRENT_GB, or the GB of the largest array (as saved or as read) if that is more."""
    largest = max((int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in shapes), default=0)
    return max(RESTORE_CONCURRENT_GB, math.ceil(largest / 1e9))


def _groups(expected: Mapping[Path, tuple[tuple[int, ...], Any]], limit: float) -> list[list[Path]]:
    """The paths in order, cut into runs of at most `limit` bytes (an array larger than that alone)."""
    groups, size = [[]], 0
    for path, (shape, dtype) in expected.items():
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        if groups[-1] and size + nbytes > limit:
            groups.append([])
            size = 0
        groups[-1].append(path)
        size += nbytes
    return [g for g in groups if g]


def restore_params(path: str | os.PathLike, expected: Mapping[Path, tuple[tuple[int, ...], Any]],
                   *, sharding=None) -> dict[Path, Any]:
    """Reads the checkpoint at `path` into jax arrays of the `expected` shapes and dtypes (cast on read).

    sharding: one sharding for every array, or path -> sharding (klein_jax.sharding.param_shardings); each device
    reads only its own slice from disk. Default: the whole of every array on the first device.
    The arrays are restored RESTORE_CONCURRENT_GB at a time, the freed read buffers handed back to the system after
    each group (host_memory.release_freed_memory), so the host holds little more than the arrays it has placed.
    """
    import jax
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    saved = check_shapes(path, expected)
    concurrent_gb = _restore_concurrent_gb([*saved.values(), *expected.values()])
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.devices()[0])
    where = sharding.get if isinstance(sharding, Mapping) else lambda _: sharding
    restored = {}
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(restore_concurrent_gb=concurrent_gb)) as checkpointer:
        for group in _groups(expected, RESTORE_CONCURRENT_GB * 1e9):
            target = nest({p: jax.ShapeDtypeStruct(*expected[p], sharding=where(p)) for p in group})
            args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                          partial_restore=True)
            restored.update(flatten(checkpointer.restore(path, args=args)))
            release_freed_memory()
    return {p: restored[p] for p in expected}


def restore_module(path: str | os.PathLike, abstract_module, *, sharding=None):
    """Fills an abstract nnx module (from nnx.eval_shape) from the checkpoint at `path`; returns the module."""
    return fill_module(abstract_module, restore_params(path, expected_params(abstract_module), sharding=sharding))
