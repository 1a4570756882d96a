"""Blocked XLA 2-D local attention: query tiles against the key tiles their discs reach.

The image tokens are regrouped into tiles (:class:`TileSchedule`). Every query tile is
scored against one "slab": the key tiles at the schedule's visible offsets ``(Δy, Δx)``,
cut as shifted slices of the key tile grid padded by the largest offset (so slabs at the
border hold zero tiles, masked out), plus the ``num_global`` prefix keys. Scores are
``[image tokens, num_global + offsets * tile]``, never ``[seq, seq]``: memory and FLOPs
are ``O(T * (num_global + window))`` up to the tile rounding. The disc mask depends only
on the offset and the in-tile positions (a static ``[tile, slab]`` table) and the
validity of the key position on the grid. Prefix queries see every key and are computed
densely (``[num_global, seq]`` scores).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linjax.kernels_pallas import _checks
from linjax.kernels_pallas._local_attention_2d_schedule import TileSchedule

# A finite "minus infinity" as in the 1-D path: rows of padding stay finite.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
HIGHEST = lax.Precision.HIGHEST


def slab_mask(sched: TileSchedule) -> jax.Array:
    """``[tiles_y, tiles_x, block, slab]`` visibility of each query tile's slab keys."""
    th, tw, bs = sched.tile_h, sched.tile_w, sched.block
    off = np.asarray(sched.offsets, np.int64).reshape(-1, 2)
    qr, qc = np.divmod(np.arange(bs), tw)
    oy, ox = np.repeat(off[:, 0], bs), np.repeat(off[:, 1], bs)
    kr, kc = np.tile(qr, len(off)), np.tile(qc, len(off))
    # The displacement between a query and a slab key depends only on offset and in-tile spots.
    d2 = (qr[:, None] - oy * th - kr) ** 2 + (qc[:, None] - ox * tw - kc) ** 2
    near = jnp.asarray(d2 <= sched.max_d2)
    ky = (jnp.arange(sched.tiles_y)[:, None, None] + oy) * th + kr
    kx = (jnp.arange(sched.tiles_x)[None, :, None] + ox) * tw + kc
    on_grid = (ky >= 0) & (ky < sched.height) & (kx >= 0) & (kx < sched.width)
    return near[None, None] & on_grid[:, :, None, :]


def _slab(sched: TileSchedule, tiles: jax.Array) -> jax.Array:
    """``[b, ty, tx, block, ...]`` -> ``[b, ty, tx, offsets * block, ...]`` shifted tiles."""
    ry = max(abs(dy) for dy, _ in sched.offsets)
    rx = max(abs(dx) for _, dx in sched.offsets)
    pad = [(0, 0), (ry, ry), (rx, rx)] + [(0, 0)] * (tiles.ndim - 3)
    padded = jnp.pad(tiles, pad)
    ny, nx = sched.tiles_y, sched.tiles_x
    parts = [padded[:, ry + dy : ry + dy + ny, rx + dx : rx + dx + nx] for dy, dx in sched.offsets]
    return jnp.concatenate(parts, axis=3)


def local_attention_2d_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, *, sched: TileSchedule, scale: float
) -> jax.Array:
    """CLEAR attention as batched tile matmuls (inputs already validated)."""
    b, t, h, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    g, ng = h // hk, sched.num_global
    out_dtype, acc = q.dtype, _checks.accum_dtype(q.dtype)
    q, k, v = (x.astype(acc) for x in (q, k, v))

    qt = sched.image_to_tiles(q[:, ng:]).reshape(b, sched.tiles_y, sched.tiles_x, -1, hk, g, d)
    ks = _slab(sched, sched.image_to_tiles(k[:, ng:]))
    vs = _slab(sched, sched.image_to_tiles(v[:, ng:]))
    s = jnp.einsum("byxqhgd,byxkhd->byxhgqk", qt, ks, precision=HIGHEST) * scale
    s = jnp.where(slab_mask(sched)[None, :, :, None, None], s, MASK_VALUE)
    if ng:  # every image query also sees the prefix keys
        s_pre = jnp.einsum("byxqhgd,bkhd->byxhgqk", qt, k[:, :ng], precision=HIGHEST) * scale
        s = jnp.concatenate([s_pre, s], axis=-1)
    m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.exp(s - m)
    o = jnp.einsum("byxhgqk,byxkhe->byxqhge", p[..., ng:], vs, precision=HIGHEST)
    if ng:
        o = o + jnp.einsum("byxhgqk,bkhe->byxqhge", p[..., :ng], v[:, :ng], precision=HIGHEST)
    o = o / jnp.moveaxis(jnp.sum(p, axis=-1), -1, 3)[..., None]
    o = sched.image_from_tiles(o.reshape(*o.shape[:4], h, dv))

    if ng:  # prefix queries: dense over all keys
        qg = q[:, :ng].reshape(b, ng, hk, g, d)
        s = jnp.einsum("bthgd,bshd->bhgts", qg, k, precision=HIGHEST) * scale
        p = jax.nn.softmax(s, axis=-1)
        og = jnp.einsum("bhgts,bshe->bthge", p, v, precision=HIGHEST).reshape(b, ng, h, dv)
        o = jnp.concatenate([og, o], axis=1)
    return o.astype(out_dtype)
