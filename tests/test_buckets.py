"""klein_jax/buckets.py: the grid and token buckets that references are padded to."""

import pytest

from klein_jax.buckets import ReferenceBuckets, staircase


def test_staircase_by_hand():
    # side ceil(sqrt(1024)) = 32; long sides 32 * sqrt(2)^j rounded up: 46, 64, 91; short = ceil(1024 / previous long)
    assert staircase(1024) == ((32, 32), (32, 46), (46, 32), (23, 64), (64, 23), (16, 91), (91, 16))
    # side ceil(sqrt(24)) = 5; long sides 8, 10, 15; short sides ceil(24/5) = 5, ceil(24/8) = 3, ceil(24/10) = 3
    assert staircase(24) == ((5, 5), (5, 8), (8, 5), (3, 10), (10, 3), (3, 15), (15, 3))


def test_bucket_sizes_are_checked_sorted_and_deduplicated():
    buckets = ReferenceBuckets(grid_areas=(1024, 256, 1024), token_buckets=(8192, 4096))
    assert buckets.grid_areas == (256, 1024) and buckets.token_buckets == (4096, 8192)
    with pytest.raises(ValueError, match="at least one grid area"):
        ReferenceBuckets(grid_areas=(), token_buckets=(64,))
    with pytest.raises(ValueError, match="must be positive"):
        ReferenceBuckets(grid_areas=(64,), token_buckets=(0,))
    with pytest.raises(ValueError, match="bucket area 0"):
        staircase(0)


def test_reference_buckets_hold_every_reference():
    buckets = ReferenceBuckets.default(16)
    assert buckets == ReferenceBuckets(grid_areas=(256, 1024, 4096), token_buckets=(4096, 8192, 16384))
    assert len(buckets.grids) == 21 and buckets.slot_tokens == 46 * 128
    for width in range(64, 2900, 16):
        for height in range(64, 2900, 16):
            if width * height <= 1024 * 1024 and max(width / height, height / width) <= 8:
                rows, cols = buckets.grid_for(height // 16, width // 16)
                assert rows * 16 >= height and cols * 16 >= width
                assert rows * cols <= max(5.3 * (height // 16) * (width // 16), 12 * 32)  # docs/pipeline.md
    assert buckets.grid_for(64, 70) == (64, 91)  # 4480 tokens: more than the cap allows, still held
    assert buckets.grid_for(10, 400) is None
    assert [buckets.tokens_for(n) for n in (0, 1, 4096, 4097, 16384, 20000)] == [0, 4096, 4096, 8192, 16384, 20000]
    assert buckets.token_buckets_for(0) == (0,)
    assert buckets.token_buckets_for(1) == (0, 4096)
    assert buckets.token_buckets_for(4) == (0, 4096, 8192, 16384)
