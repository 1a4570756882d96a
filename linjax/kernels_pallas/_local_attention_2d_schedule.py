r"""Tile geometry of the CLEAR 2-D window: token permutation and which key tiles to visit.

The ``height x width`` image grid is cut into ``tile_h x tile_w`` tiles (powers of two,
the grid zero-padded to whole tiles). In the *tiled order* the ``num_global`` prefix
tokens come first, padded to whole blocks of ``tile_h * tile_w`` tokens, then the image
tiles in raster order of tiles, each tile's tokens in raster order (reference/kernels.md
§5.2). A block index ``n < global_blocks`` is a prefix block; ``n >= global_blocks`` is
image tile ``n - global_blocks = ty * tiles_x + tx``.

Two tiles ``Δy`` tile rows and ``Δx`` tile columns apart are at least
``gap(Δy, tile_h)`` rows and ``gap(Δx, tile_w)`` columns apart, with
``gap(Δ, t) = max(0, (|Δ| - 1) t + 1)``, and that distance is attained, so the pair holds
a visible entry (``dy² + dx² < r²``) iff ``gap(Δy)² + gap(Δx)² <= max_d2`` where
``max_d2 = ceil(r²) - 1`` is the largest visible squared distance. For each ``Δy`` the
visible ``Δx`` form an interval ``|Δx| <= reach_x(Δy)``, so a query tile visits, per tile
row, one contiguous run of key blocks: :meth:`TileSchedule.kv_ranges`. The relation is
symmetric, so the same ranges list the query tiles that see a key tile (backward pass).
Prefix blocks are dense: a prefix query block visits every block and every query block
visits the prefix blocks.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from fractions import Fraction
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def max_visible_d2(radius: float) -> int:
    """Largest integer squared distance strictly below ``radius**2`` (exact arithmetic)."""
    return math.ceil(Fraction(radius) ** 2) - 1


def _gap(delta: int, tile: int) -> int:
    return max(0, (abs(delta) - 1) * tile + 1)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _is_traced(*xs: Any) -> bool:
    return any(isinstance(x, jax.Array) for x in xs)


def _max(a, b):
    return jnp.maximum(a, b) if _is_traced(a, b) else max(a, b)


def _min(a, b):
    return jnp.minimum(a, b) if _is_traced(a, b) else min(a, b)


def _div(a, b: int):
    # lax.div on non-negative ints: floor division would lower through `sign` in kernels.
    return lax.div(a, jnp.int32(b)) if _is_traced(a) else a // b


def _rem(a, b: int):
    return lax.rem(a, jnp.int32(b)) if _is_traced(a) else a % b


def _and(a, b):
    return jnp.logical_and(a, b) if _is_traced(a, b) else (a and b)


def _select(pred, a, b):
    if not _is_traced(pred, a, b):
        return a if pred else b
    return jnp.where(pred, jnp.asarray(a, jnp.int32), jnp.asarray(b, jnp.int32))


@dataclasses.dataclass(frozen=True)
class TileSchedule:
    """Static tiling of a CLEAR token sequence (hashable: it keys jit caches)."""

    height: int
    width: int
    num_global: int
    max_d2: int
    tile_h: int
    tile_w: int

    @property
    def block(self) -> int:
        return self.tile_h * self.tile_w

    @property
    def tiles_y(self) -> int:
        return _cdiv(self.height, self.tile_h)

    @property
    def tiles_x(self) -> int:
        return _cdiv(self.width, self.tile_w)

    @property
    def num_tiles(self) -> int:
        return self.tiles_y * self.tiles_x

    @property
    def global_blocks(self) -> int:
        return _cdiv(self.num_global, self.block)

    @property
    def num_blocks(self) -> int:
        return self.global_blocks + self.num_tiles

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block

    @functools.cached_property
    def row_reach(self) -> tuple[tuple[int, int], ...]:
        """``(Δy, reach_x)`` for every tile-row offset with a visible tile (``|Δx| <= reach``)."""
        rows, tw = [], self.tile_w
        for dy in range(-(self.tiles_y - 1), self.tiles_y):
            gy = _gap(dy, self.tile_h) ** 2
            if gy > self.max_d2:
                continue
            reach = 0
            while reach + 1 < self.tiles_x and gy + _gap(reach + 1, tw) ** 2 <= self.max_d2:
                reach += 1
            rows.append((dy, reach))
        return tuple(rows)

    @property
    def offsets(self) -> tuple[tuple[int, int], ...]:
        """Every visible tile offset ``(Δy, Δx)``, row by row."""
        return tuple((dy, dx) for dy, r in self.row_reach for dx in range(-r, r + 1))

    def kv_ranges(self, n):
        """Blocks ``[lo, hi)`` visited by query block ``n`` (an int or an int32 scalar).

        The first range is the dense part (all blocks for a prefix block, the prefix blocks
        for an image tile); then one run of tiles per tile row (empty for prefix blocks and
        for rows outside the grid). Symmetric: it also lists the query blocks of key block
        ``n``.
        """
        g = self.global_blocks
        is_prefix = n < g
        ranges = [(0, _select(is_prefix, self.num_blocks, g))]
        tile = _max(n - g, 0)
        ty, tx = _div(tile, self.tiles_x), _rem(tile, self.tiles_x)
        for dy, reach in self.row_reach:
            row = ty + dy
            row_ok = _and(row >= 0, row < self.tiles_y)
            base = g + row * self.tiles_x
            lo = base + _max(tx - reach, 0)
            hi = base + _min(tx + reach + 1, self.tiles_x)
            ranges.append((lo, _select(_and(n >= g, row_ok), hi, lo)))
        return ranges

    @functools.cached_property
    def key_region(self) -> np.ndarray:
        """``[keys, 2]`` cells ``(ry, rx)``, relative to a tile's origin, that some cell of the tile
        sees: gap to the tile rectangle ``gy² + gx² <= max_d2``, clipped to offsets that land on
        the grid for some tile. The exact key set of a query tile (used by the XLA path)."""
        th, tw = self.tile_h, self.tile_w
        reach = math.isqrt(self.max_d2)
        ys = range(max(-reach, -(self.tiles_y - 1) * th), min(th + reach, self.height))
        xs = range(max(-reach, -(self.tiles_x - 1) * tw), min(tw + reach, self.width))
        cells = [
            (ry, rx)
            for ry in ys
            for rx in xs
            if max(0, -ry, ry - th + 1) ** 2 + max(0, -rx, rx - tw + 1) ** 2 <= self.max_d2
        ]
        return np.asarray(cells, np.int64).reshape(-1, 2)

    def visited(self) -> np.ndarray:
        """Host-side ``[num_blocks, num_blocks]`` boolean: block pairs :meth:`kv_ranges` visits."""
        out = np.zeros((self.num_blocks, self.num_blocks), bool)
        for n in range(self.num_blocks):
            for lo, hi in self.kv_ranges(n):
                out[n, lo:hi] = True
        return out

    # --- token permutation -------------------------------------------------------------------
    def image_to_tiles(self, x: jax.Array) -> jax.Array:
        """``[b, height * width, ...]`` -> ``[b, tiles_y, tiles_x, block, ...]`` (zero padding)."""
        b, rest = x.shape[0], x.shape[2:]
        h, w, th, tw = self.height, self.width, self.tile_h, self.tile_w
        x = x.reshape(b, h, w, *rest)
        pad = [(0, 0), (0, self.tiles_y * th - h), (0, self.tiles_x * tw - w)]
        x = jnp.pad(x, pad + [(0, 0)] * len(rest))
        x = x.reshape(b, self.tiles_y, th, self.tiles_x, tw, *rest)
        x = jnp.moveaxis(x, 3, 2)
        return x.reshape(b, self.tiles_y, self.tiles_x, self.block, *rest)

    def image_from_tiles(self, x: jax.Array) -> jax.Array:
        """Inverse of :meth:`image_to_tiles`: drops the padding."""
        b, rest = x.shape[0], x.shape[4:]
        th, tw = self.tile_h, self.tile_w
        x = x.reshape(b, self.tiles_y, self.tiles_x, th, tw, *rest)
        x = jnp.moveaxis(x, 2, 3).reshape(b, self.tiles_y * th, self.tiles_x * tw, *rest)
        return x[:, : self.height, : self.width].reshape(b, self.height * self.width, *rest)

    def to_tiled(self, x: jax.Array) -> jax.Array:
        """``[b, seq, ...]`` -> ``[b, padded_len, ...]`` in the tiled order (zero padding)."""
        gl, rest = self.num_global, x.shape[2:]
        pad = [(0, 0), (0, self.global_blocks * self.block - gl)] + [(0, 0)] * len(rest)
        glob = jnp.pad(x[:, :gl], pad)
        img = self.image_to_tiles(x[:, gl:]).reshape(x.shape[0], -1, *rest)
        return jnp.concatenate([glob, img], axis=1)

    def from_tiled(self, x: jax.Array) -> jax.Array:
        """Inverse of :meth:`to_tiled`: back to ``[b, seq, ...]``."""
        gp, rest = self.global_blocks * self.block, x.shape[2:]
        img = x[:, gp:].reshape(x.shape[0], self.tiles_y, self.tiles_x, self.block, *rest)
        return jnp.concatenate([x[:, : self.num_global], self.image_from_tiles(img)], axis=1)


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def capped_tile(height: int, width: int, tile_h: int, tile_w: int, min_block: int = 16):
    """Shrink a power-of-two tile to the grid, keeping at least ``min_block`` tokens."""
    th, tw = min(tile_h, next_pow2(height)), min(tile_w, next_pow2(width))
    while th * tw < min_block:
        if th <= tw:
            th *= 2
        else:
            tw *= 2
    return th, tw


def xla_tile(height: int, width: int, max_d2: int) -> tuple[int, int]:
    """Tile for the XLA path, minimising ``keys per query tile * (1 + 64 / tile)``.

    The second factor is the per-tile overhead of small batched matmuls on CPU (measured on
    a 64 x 64 grid, r = 8: 8 x 8 tiles (452 keys) beat 8 x 16 (628) and 4 x 8 (364) by
    about 15% and 4 x 4 (292) by 1.7x).
    """
    best = None
    for th, tw in itertools.product((2, 4, 8, 16), repeat=2):
        if not 32 <= th * tw <= 256:
            continue
        s = TileSchedule(height, width, 0, max_d2, *capped_tile(height, width, th, tw, 32))
        keys = len(s.key_region) * s.num_tiles * s.block / (height * width)
        key = (keys * (1 + 64 / s.block), -s.block)
        if best is None or key < best[0]:
            best = (key, (s.tile_h, s.tile_w))
    return best[1]
