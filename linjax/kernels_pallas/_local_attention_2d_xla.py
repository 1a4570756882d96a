"""Blocked XLA 2-D local attention: each query tile against exactly the keys it can reach.

The image tokens are regrouped into tiles (:class:`TileSchedule`). A query tile is scored
against its *key region*: the cells (relative to the tile's origin) whose distance to the
tile rectangle is below the radius (:attr:`TileSchedule.key_region`; for 8 x 8 tiles and
r = 8, 452 keys instead of the 576 of the 3 x 3 surrounding tiles), gathered from the key
array with one ``take``, plus the ``num_global`` prefix keys. Scores are
``[image tokens, num_global + region]``, never ``[seq, seq]``: memory and FLOPs are
``O(T * (num_global + window))`` up to the tile rounding, computed for groups of tile
rows one after another (:mod:`._sequential`) so that scratch memory is one group's. The
disc mask is a static ``[tile, region]`` table (it depends only on in-tile positions)
combined with whether each gathered key lies on the grid. Prefix queries see every key
and are computed densely (``[num_global, seq]`` scores). Differentiated by autodiff (the
gather's transpose is a scatter-add).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linjax.kernels_pallas import _checks, _sequential
from linjax.kernels_pallas._local_attention_2d_schedule import TileSchedule

# A finite "minus infinity" as in the 1-D path: rows of padding stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
HIGHEST = lax.Precision.HIGHEST


def region_index(sched: TileSchedule) -> tuple[jax.Array, jax.Array]:
    """Grid index (raster, 0 where off-grid) and on-grid flag ``[tiles_y, tiles_x, region]``."""
    region = sched.key_region
    ky = jnp.arange(sched.tiles_y)[:, None, None] * sched.tile_h + region[:, 0]
    kx = jnp.arange(sched.tiles_x)[None, :, None] * sched.tile_w + region[:, 1]
    on_grid = (ky >= 0) & (ky < sched.height) & (kx >= 0) & (kx < sched.width)
    return jnp.where(on_grid, ky * sched.width + kx, 0), on_grid


def region_mask(sched: TileSchedule, on_grid: jax.Array) -> jax.Array:
    """``[tiles_y, tiles_x, block, region]`` visibility of each query tile's region keys."""
    region = sched.key_region
    qr, qc = np.divmod(np.arange(sched.block), sched.tile_w)
    d2 = (qr[:, None] - region[:, 0]) ** 2 + (qc[:, None] - region[:, 1]) ** 2
    return jnp.asarray(d2 <= sched.max_d2)[None, None] & on_grid[:, :, None, :]


def local_attention_2d_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, sched: TileSchedule, scale: float
) -> jax.Array:
    """CLEAR attention as batched tile matmuls (inputs already validated).

    Mapped over key/value heads with ``vmap`` rather than merging them with the batch, so
    that a batch- or head-sharded input keeps its sharding (a merged axis cannot).
    """
    b, t, h, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    out_dtype, acc = q.dtype, _checks.accum_dtype(q.dtype)
    q = (q.astype(acc) * scale).reshape(b, t, hk, h // hk, d)
    attend = functools.partial(_attend_kv_head, sched=sched, heads=hk)
    o = jax.vmap(attend, in_axes=2, out_axes=2)(q, k.astype(acc), v.astype(acc))
    return o.reshape(b, t, h, dv).astype(out_dtype)


def _attend_kv_head(q, k, v, *, sched: TileSchedule, heads: int):
    """One key/value head: ``q [b, t, g, d]`` (scaled), ``k [b, t, d]``, ``v [b, t, dv]``.

    The ``g`` query heads of the key/value head share its keys and are stacked as rows of
    one tile. ``heads`` (how many such calls run side by side under ``vmap``) only sizes
    the sequential groups.
    """
    n, t, g, d = q.shape
    ng, ny, nx, bs, dv = sched.num_global, sched.tiles_y, sched.tiles_x, sched.block, v.shape[-1]
    qt = jnp.swapaxes(sched.image_to_tiles(q[:, ng:]), 3, 4).reshape(n, ny, nx, g * bs, d)
    index, on_grid = region_index(sched)
    mask = region_mask(sched, on_grid)
    # Rows of query tiles go in groups of ``per``, one group after another (``_sequential``);
    # padded tile rows see no image key and are dropped.
    per = _sequential.blocks_per_step(heads * n * nx * g * bs * (ng + index.shape[-1]), ny)
    steps = -(-ny // per)
    pad_rows = lambda x, axis: jnp.pad(
        x, [(0, steps * per - ny if a == axis else 0) for a in range(x.ndim)]
    )
    qt, index, mask = pad_rows(qt, 1), pad_rows(index, 0), pad_rows(mask, 0)

    def group(i):
        rows = lambda x, axis: lax.dynamic_slice_in_dim(x, i * per, per, axis)
        qg, idx, visible = rows(qt, 1), rows(index, 0), rows(mask, 0)
        ks, vs = (
            jnp.take(x[:, ng:], idx.reshape(-1), axis=1).reshape(n, per, nx, -1, x.shape[-1])
            for x in (k, v)
        )
        s = jnp.einsum("nyxqd,nyxkd->nyxqk", qg, ks, precision=HIGHEST)
        s = s.reshape(n, per, nx, g, bs, -1)
        s = jnp.where(visible[None, :, :, None], s, MASK_VALUE).reshape(n, per, nx, g * bs, -1)
        if ng:  # every image query also sees the prefix keys
            s_pre = jnp.einsum("nyxqd,nkd->nyxqk", qg, k[:, :ng], precision=HIGHEST)
            s = jnp.concatenate([s_pre, s], axis=-1)
        m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m)
        o = jnp.einsum("nyxqk,nyxke->nyxqe", p[..., ng:], vs, precision=HIGHEST)
        if ng:
            o = o + jnp.einsum("nyxqk,nke->nyxqe", p[..., :ng], v[:, :ng], precision=HIGHEST)
        return o / jnp.sum(p, axis=-1, keepdims=True)

    o = _sequential.sequential_map(group, steps)  # [steps, n, per, nx, g * bs, dv]
    o = jnp.moveaxis(o, 0, 1).reshape(n, steps * per, nx, g, bs, dv)[:, :ny]
    o = sched.image_from_tiles(jnp.swapaxes(o, 3, 4))

    if ng:  # prefix queries: dense over all keys
        s = jnp.einsum("ntgd,nsd->ngts", q[:, :ng], k, precision=HIGHEST)
        og = jnp.einsum("ngts,nse->ntge", jax.nn.softmax(s, axis=-1), v, precision=HIGHEST)
        o = jnp.concatenate([og, o], axis=1)
    return o
