"""Pallas 2-D local attention (CLEAR): the block-sparse flash kernels with a 2-D tile pattern.

Tokens are permuted once into the tiled order of :class:`TileSchedule` (prefix blocks,
then image tiles of ``tile_h x tile_w`` tokens in raster order of tiles) and fed to the
flash-attention kernels of :mod:`._local_attention_pallas` (forward with online softmax;
``custom_vjp`` backward with ``dq`` and ``dk, dv`` kernels recomputing probabilities from
the saved log-sum-exp). The :class:`Clear2D` pattern tells them:

* which blocks to visit (``kv_ranges``; reference/kernels.md §5.2): a prefix query block
  visits every block; an image tile visits the prefix blocks and, per tile row within
  reach, one contiguous run of key tiles, computed analytically from the program id
  (no block tables). The relation is symmetric, so the ``dk, dv`` kernel uses the same
  ranges for its query blocks.
* the in-block mask, from coordinates: token ``n`` of a tile sits at row
  ``n >> log2(tile_w)`` and column ``n & (tile_w - 1)``; image pairs are visible iff
  ``dy² + dx² <= max_d2`` (``< r²``), anything involving a prefix token is visible, and
  padding keys (past ``num_global`` or off the grid) never are.

Only scalar integer arithmetic and vector compares, shifts and masks appear in the kernel,
all of which Mosaic TPU and Triton lower (checked by ``tests/kernels_pallas/test_export.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from linjax.kernels_pallas import _compat
from linjax.kernels_pallas._local_attention_2d_schedule import TileSchedule
from linjax.kernels_pallas._local_attention_pallas import (
    FlashConfig,
    flash_attention,
    from_kernel_layout,
    to_kernel_layout,
)

_BIG = 1 << 30  # a squared distance / coordinate bound no grid reaches


def _i32(x):
    return jnp.asarray(x, jnp.int32)


@dataclasses.dataclass(frozen=True)
class Clear2D:
    """Block pattern of the CLEAR window over the tiled token order (see module docstring)."""

    sched: TileSchedule

    @property
    def block(self) -> int:
        return self.sched.block

    @property
    def num_blocks(self) -> int:
        return self.sched.num_blocks

    @property
    def padded_len(self) -> int:
        return self.sched.padded_len

    def kv_ranges(self, n):
        return self.sched.kv_ranges(n)

    def q_ranges(self, n):  # the window relation is symmetric
        return self.sched.kv_ranges(n)

    def keys_per_query(self) -> int:
        return len(self.sched.offsets) * self.block + self.sched.num_global

    def _coords(self, n, axis: int):
        """In-block index, grid row and grid column of block ``n``'s tokens along ``axis``."""
        s = self.sched
        shape = (s.block, s.block)
        idx = lax.broadcasted_iota(jnp.int32, shape, axis)
        tile = jnp.maximum(n - s.global_blocks, 0)
        ty, tx = lax.div(tile, _i32(s.tiles_x)), lax.rem(tile, _i32(s.tiles_x))
        y = ty * s.tile_h + lax.shift_right_logical(idx, _i32(s.tile_w.bit_length() - 1))
        x = tx * s.tile_w + (idx & (s.tile_w - 1))
        return idx, y, x

    def visible(self, q_block, k_block):
        """``[block, block]`` mask between query block ``q_block`` and key block ``k_block``."""
        s = self.sched
        g = s.global_blocks
        _, yq, xq = self._coords(q_block, 0)
        idx, yk, xk = self._coords(k_block, 1)
        k_prefix = k_block < g
        # Scalar thresholds: a prefix block on either side lifts the distance bound; a prefix
        # key block keeps its first num_global - start tokens, an image tile its on-grid ones.
        limit_d2 = jnp.where(jnp.logical_or(q_block < g, k_prefix), _i32(_BIG), _i32(s.max_d2))
        limit_idx = jnp.where(k_prefix, _i32(s.num_global) - k_block * s.block, _i32(s.block))
        limit_y = jnp.where(k_prefix, _i32(_BIG), _i32(s.height))
        limit_x = jnp.where(k_prefix, _i32(_BIG), _i32(s.width))
        dy, dx = yq - yk, xq - xk
        on_grid = (idx < limit_idx) & (yk < limit_y) & (xk < limit_x)
        return on_grid & (dy * dy + dx * dx <= limit_d2)


@functools.partial(jax.jit, static_argnames=("sched", "scale"))
def local_attention_2d_pallas(
    q: jax.Array, k: jax.Array, v: jax.Array, *, sched: TileSchedule, scale: float
) -> jax.Array:
    """CLEAR attention through the Pallas kernels (inputs already validated)."""
    b, _, h, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    cfg = FlashConfig(
        pattern=Clear2D(sched), scale=scale, heads=h, kv_heads=hk, name="local_attention_2d"
    )
    dk_pad, dv_pad = _compat.pad_dim_for_backend(d), _compat.pad_dim_for_backend(dv)
    o = flash_attention(
        cfg,
        to_kernel_layout(sched.to_tiled(q), dk_pad),
        to_kernel_layout(sched.to_tiled(k), dk_pad),
        to_kernel_layout(sched.to_tiled(v), dv_pad),
    )
    return sched.from_tiled(from_kernel_layout(o, b, dv))
