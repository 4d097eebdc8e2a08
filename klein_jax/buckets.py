"""Shape buckets for reference images, so that a stream of requests reuses a small set of compiled programs.

Two kinds of bucket, both padded without changing results:
- grid buckets: a reference's latent grid (th, tw) is padded to a bucket grid before the VAE encoder, which then
  masks the padding (Flux2VAE.encode_reference_tokens). Buckets form "staircases" under the hyperbola th * tw = A
  for a few areas A, with a sqrt(2) step in aspect ratio: at most ~1.42x the pixels of the largest image they
  hold, 7 buckets per area (square, 3 landscape, 3 portrait) reaching the 8:1 limit of check_image_input.
- token buckets: the references' tokens, concatenated, are padded to a bucket length at the very end of the joint
  sequence [text, target, refs, padding]; attention masks the padding as keys (`kv_lengths`).
docs/pipeline.md explains the defaults.
"""

from __future__ import annotations

import dataclasses
import math

from klein_jax.images import MAX_REFERENCE_AREA


def staircase(area: int) -> tuple[tuple[int, int], ...]:
    """Grid buckets (rows, cols) that together hold every grid with rows * cols <= area and aspect ratio <= 8."""
    if area < 1:
        raise ValueError(f"bucket area {area} must be positive")
    side = math.isqrt(area - 1) + 1  # ceil(sqrt(area))
    longs = [side] + [math.ceil(side * 2 ** (j / 2)) for j in range(1, 4)]  # ratios 1, 1.41, 2, 2.83 (= sqrt 8)
    buckets = [(side, side)]
    for j in range(1, 4):
        short = math.ceil(area / longs[j - 1])  # a grid longer than longs[j-1] is at most area / longs[j-1] wide
        buckets += [(short, longs[j]), (longs[j], short)]
    return tuple(buckets)


@dataclasses.dataclass(frozen=True)
class ReferenceBuckets:
    """Bucket ladders for references: grid_areas (tokens of one reference), token_buckets (all references)."""

    grid_areas: tuple[int, ...]
    token_buckets: tuple[int, ...]

    def __post_init__(self):
        if not self.grid_areas or not self.token_buckets:
            raise ValueError("ReferenceBuckets needs at least one grid area and one token bucket")
        if any(a < 1 for a in self.grid_areas) or any(t < 1 for t in self.token_buckets):
            raise ValueError(f"bucket sizes must be positive: {self}")
        object.__setattr__(self, "grid_areas", tuple(sorted(set(self.grid_areas))))
        object.__setattr__(self, "token_buckets", tuple(sorted(set(self.token_buckets))))

    @classmethod
    def default(cls, pixels_per_token: int) -> "ReferenceBuckets":
        """Areas M/16, M/4, M, token buckets M, 2M, 4M, with M the tokens of a reference at the 1024^2 area cap."""
        M = MAX_REFERENCE_AREA // (pixels_per_token * pixels_per_token)  # 4096 at 16 px per token
        return cls(grid_areas=(max(M // 16, 1), max(M // 4, 1), M), token_buckets=(M, 2 * M, 4 * M))

    @property
    def grids(self) -> tuple[tuple[int, int], ...]:
        """Every grid bucket (rows, cols), smallest area first."""
        out = {g for area in self.grid_areas for g in staircase(area)}
        return tuple(sorted(out, key=lambda g: (g[0] * g[1], g)))

    @property
    def slot_tokens(self) -> int:
        """Token rows of one reference slot: the largest grid bucket's area."""
        return max(r * c for r, c in self.grids)

    def grid_for(self, rows: int, cols: int) -> tuple[int, int] | None:
        """The smallest grid bucket that holds a rows x cols grid, or None if none does."""
        for r, c in self.grids:
            if rows <= r and cols <= c:
                return r, c
        return None

    def tokens_for(self, num_tokens: int) -> int:
        """The smallest token bucket >= num_tokens (num_tokens itself past the largest; 0 stays 0)."""
        if num_tokens <= 0:
            return 0
        for bucket in self.token_buckets:
            if num_tokens <= bucket:
                return bucket
        return num_tokens

    def token_buckets_for(self, max_references: int) -> tuple[int, ...]:
        """Token buckets that requests with up to `max_references` bucketed references can need (0 included)."""
        if max_references <= 0:
            return (0,)
        most = max_references * max(self.grid_areas)  # a reference at the cap fills about one grid area
        needed = [b for b in self.token_buckets if b < most] + [self.tokens_for(most)]
        return (0,) + tuple(sorted(set(needed)))
