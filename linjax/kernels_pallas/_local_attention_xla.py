"""Blocked XLA sliding-window attention: query blocks against their neighbouring key blocks.

The sequence is cut into blocks of ``bq`` tokens. Query block ``n`` can only see keys in
blocks ``n - n_left .. n + n_right`` (``n_left = ceil((w - 1) / bq)``, ``n_right`` the same
when bidirectional, else 0), so each query block is scored against one "slab" of
``(n_left + 1 + n_right) * bq`` keys built from shifted slices of the padded key array.
Scores are ``[seq, slab]`` instead of ``[seq, seq]``: FLOPs are ``O(T * (w + 2 bq))``. The
block is chosen near ``w / 4`` so that the slab wastes at most about a quarter of its keys.
Groups of query blocks run one after another (:mod:`._sequential`), so temporary memory is
one group's (a few MiB) whatever ``T``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linjax.kernels_pallas import _checks, _sequential

# A finite "minus infinity": rows whose keys are all masked (only padded query rows) stay
# finite, and masked entries still vanish after exp(s - max).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_block(window: int, seq_len: int) -> int:
    """Block length for the XLA path: about ``window / 4``, at least 16, power of two."""
    w = min(window, seq_len)
    return max(16, (1 << (w - 1).bit_length()) // 4)


def local_attention_xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    causal: bool,
    scale: float,
    block_size: int | None = None,
) -> jax.Array:
    """Sliding-window attention as batched block matmuls (inputs already validated)."""
    b, t, h, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    g = h // hk
    w = min(window, t)  # a window past the sequence changes nothing
    bq = block_size or default_block(w, t)
    nb = _cdiv(t, bq)
    n_left = min(_cdiv(w - 1, bq), nb - 1)
    n_right = 0 if causal else n_left
    n_slab = n_left + 1 + n_right
    acc = _checks.accum_dtype(q.dtype)

    # Query blocks go in groups of ``per``, one group after another (see ``_sequential``);
    # each group slices its queries and the keys of its blocks' slabs from padded arrays.
    per = _sequential.blocks_per_step(b * h * bq * n_slab * bq, nb)
    steps = _cdiv(nb, per)
    tp = steps * per * bq
    qp = jnp.pad(q, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    halo = ((0, 0), (n_left * bq, tp - t + n_right * bq), (0, 0), (0, 0))
    kp, vp = jnp.pad(k, halo), jnp.pad(v, halo)
    n_keys = (per + n_left + n_right) * bq

    def slab(x, start):  # -> [b, per, n_slab * bq, hk, e]: each block's neighbouring keys
        x = lax.dynamic_slice_in_dim(x, start, n_keys, 1).astype(acc)
        xb = x.reshape(b, per + n_left + n_right, bq, hk, x.shape[-1])
        return jnp.concatenate([xb[:, o : o + per] for o in range(n_slab)], axis=2)

    def group(i):
        start = i * (per * bq)
        qb = lax.dynamic_slice_in_dim(qp, start, per * bq, 1).astype(acc)
        qb = qb.reshape(b, per, bq, hk, g, d)
        ks, vs = slab(kp, start), slab(vp, start)
        s = jnp.einsum("bnqhgd,bnkhd->bnhgqk", qb, ks, precision=lax.Precision.HIGHEST) * scale

        # Absolute positions of the blocks' queries and of their slabs' keys.
        first = start + jnp.arange(per)[:, None, None] * bq
        qpos = first + jnp.arange(bq)[None, :, None]
        kpos = first - n_left * bq + jnp.arange(n_slab * bq)[None, None]
        diff = qpos - kpos
        visible = (diff < w) & ((diff >= 0) if causal else (diff > -w))
        visible = visible & (kpos >= 0) & (kpos < t)  # padding on either side is never a key
        s = jnp.where(visible[None, :, None, None], s, MASK_VALUE)

        m = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
        p = jnp.exp(s - m)
        o = jnp.einsum("bnhgqk,bnkhe->bnqhge", p, vs, precision=lax.Precision.HIGHEST)
        o = o / jnp.moveaxis(jnp.sum(p, axis=-1), -1, 2)[..., None]
        return o.reshape(b, per * bq, h, dv).astype(q.dtype)

    o = _sequential.sequential_map(group, steps)  # [steps, b, per * bq, h, dv]
    return jnp.moveaxis(o, 0, 1).reshape(b, tp, h, dv)[:, :t]
