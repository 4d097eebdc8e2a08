"""klein_jax.loading.checkpoint: save_params streams (PendingArrays are read one at a time, just before their write);
restore_params reads a group of arrays at a time."""

import tracemalloc

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from klein_jax.loading.checkpoint import PendingArray, restore_params, save_params

SHAPE = (512, 1024)  # 2 MiB per float32 array


def sources(count: int) -> list[np.ndarray]:
    return [np.random.default_rng(i).standard_normal(SHAPE[::-1], dtype=np.float32) for i in range(count)]


def test_pending_arrays_round_trip_cast_and_transposed(tmp_path):
    raw = sources(3)
    params = {("blocks", i, "kernel"): PendingArray(w.T, ml_dtypes.bfloat16) for i, w in enumerate(raw)}
    params[("norm", "scale")] = np.arange(4, dtype=np.float32)  # plain arrays still save
    assert params[("blocks", 0, "kernel")].nbytes == SHAPE[0] * SHAPE[1] * 2
    save_params(tmp_path / "params", params)
    expected = {("blocks", i, "kernel"): (SHAPE, jnp.bfloat16) for i in range(3)}
    expected[("norm", "scale")] = ((4,), jnp.float32)
    restored = restore_params(tmp_path / "params", expected)
    for i, w in enumerate(raw):
        np.testing.assert_array_equal(np.asarray(restored[("blocks", i, "kernel")]),
                                      w.T.astype(ml_dtypes.bfloat16))
    np.testing.assert_array_equal(np.asarray(restored[("norm", "scale")]), np.arange(4, dtype=np.float32))


def test_save_holds_one_pending_array_at_a_time(tmp_path):
    """8 arrays of 2 MiB, each a transposed view (so reading copies it): the numpy peak stays near one array."""
    raw = sources(8)
    reads = []
    params = {("blocks", i, "kernel"): PendingArray(w.T, np.float32, on_read=lambda: reads.append(1))
              for i, w in enumerate(raw)}
    tracemalloc.start()
    try:
        save_params(tmp_path / "params", params)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one = SHAPE[0] * SHAPE[1] * 4
    assert len(reads) == 8
    assert peak < 3 * one, f"peak {peak / 2**20:.1f} MiB while saving 8 arrays of {one / 2**20:.0f} MiB"


def test_a_pending_array_is_read_once():
    pending = PendingArray(np.zeros((2, 3), np.float32), np.float32)
    assert pending.read().flags.c_contiguous
    with pytest.raises(RuntimeError, match="already read"):
        pending.read()


def test_restore_reserves_room_for_the_largest_array():
    """orbax refuses to read an array larger than the bytes it reserved: the 9B text encoder's embedding (1.24 GB)
    must raise the 1 GB default, and a float32 array read as bfloat16 counts at its saved size."""
    from klein_jax.loading import checkpoint

    assert checkpoint._restore_concurrent_gb([((151936, 2560), np.dtype("bfloat16"))]) == 1
    assert checkpoint._restore_concurrent_gb([((151936, 4096), np.dtype("bfloat16"))]) == 2
    assert checkpoint._restore_concurrent_gb([((8, 8), np.float32), ((151936, 4096), np.float32)]) == 3


def test_restore_in_groups_returns_every_array(tmp_path, monkeypatch):
    """Restored a few arrays at a time (each group a partial orbax restore, freed memory handed back after it):
    every array comes back with its own values, in the expected order, whatever the group size."""
    from klein_jax.loading import checkpoint

    raw = sources(5)
    params = {("blocks", i, "kernel"): w for i, w in enumerate(raw)}
    params[("norm", "scale")] = np.arange(4, dtype=np.float32)
    save_params(tmp_path / "params", params)
    expected = {path: (value.shape, jnp.float32) for path, value in params.items()}
    trims = []
    monkeypatch.setattr(checkpoint, "release_freed_memory", lambda: trims.append(1))
    monkeypatch.setattr(checkpoint, "RESTORE_CONCURRENT_GB", 2.5 * raw[0].nbytes / 1e9)  # 2 arrays per group
    assert [len(g) for g in checkpoint._groups(expected, checkpoint.RESTORE_CONCURRENT_GB * 1e9)] == [2, 2, 2]
    restored = restore_params(tmp_path / "params", expected)
    assert list(restored) == list(expected) and len(trims) == 3
    for path, value in params.items():
        np.testing.assert_array_equal(np.asarray(restored[path]), value)


def test_groups_keep_order_and_put_a_large_array_alone():
    from klein_jax.loading.checkpoint import _groups

    expected = {("a",): ((10,), np.float32), ("b",): ((100,), np.float32), ("c",): ((5,), np.float32),
                ("d",): ((5,), np.float32)}
    assert _groups(expected, 200) == [[("a",)], [("b",)], [("c",), ("d",)]]  # 40 + 400 > 200: b starts a group
    assert _groups(expected, 1e9) == [list(expected)]


def test_release_freed_memory_runs_on_glibc():
    import platform

    from klein_jax.loading.host_memory import release_freed_memory

    assert release_freed_memory() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
