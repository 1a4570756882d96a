"""Causal multi-head softmax attention with a key/value cache: the module ``linearize`` takes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linjax import _tree
from linjax.kernels_pallas import _layers_common as common
from linjax.kernels_pallas._layers_common import KVCache


def dense_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, visible: jax.Array
) -> jax.Array:
    """Softmax attention ``[B, T, H, D] x [B, S, Hkv, D]`` under a boolean ``[T, S]`` mask.

    Grouped-query: query head ``h`` uses kv head ``h // (H // Hkv)``. Logits and softmax in at
    least float32; every row of ``visible`` must have a True entry.
    """
    b, t, h, d = q.shape
    hk = k.shape[2]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.astype(acc).reshape(b, t, hk, h // hk, d)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(acc)) * scale
    s = jnp.where(visible, s, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgts,bshe->bthge", p, v.astype(acc))
    return o.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


class SoftmaxAttention(nnx.Module):
    r"""Causal multi-head softmax attention, optionally with rotary embeddings and a KV cache.

    ``y = out(softmax(s q k^T + causal mask) v)`` with per-head projections
    ``query``, ``key``, ``value``, ``out`` whose parameters have exactly the shapes of
    ``flax.nnx.MultiHeadAttention`` (``query.kernel`` ``[in, heads, head_dim]``,
    ``out.kernel`` ``[heads, head_dim, out]``), so weights move freely between the two and
    :func:`~linjax.kernels_pallas.layers.linearize` accepts either. ``num_kv_heads <
    num_heads`` gives grouped-query attention. With ``rope_theta`` set, queries and keys get
    rotary position embeddings (half-split layout) before the dot product.

    Decoding: :meth:`prefill` runs a prompt and returns a :class:`KVCache` with room for
    ``max_len`` tokens; :meth:`decode_step` appends one token and attends to everything
    cached (cost ``O(max_len)`` per token: the cache is a fixed-size buffer under ``jit``).

    Args:
        num_heads: query heads.
        in_features: size of the last input axis.
        head_dim: per-head size, default ``in_features // num_heads``.
        num_kv_heads: key/value heads (a divisor of ``num_heads``), default ``num_heads``.
        out_features: output size, default ``in_features``.
        use_bias: biases in the projections (``nnx.MultiHeadAttention`` default ``True``).
        rope_theta: base of the rotary embedding, or ``None`` for none.
        dtype: computation dtype of the projections (``None``: inferred).
        param_dtype: parameter dtype.
        rngs: ``nnx.Rngs`` for the initialisation.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from linjax.kernels_pallas import layers
        >>> attn = layers.SoftmaxAttention(2, 8, rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((1, 5, 8))).shape
        (1, 5, 8)
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        out_features: int | None = None,
        use_bias: bool = True,
        rope_theta: float | None = None,
        dtype: Any = None,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        common.init_attention(
            self,
            num_heads,
            in_features,
            head_dim,
            num_kv_heads,
            out_features,
            use_bias=use_bias,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.rope_theta = common.check_rope(rope_theta, self.head_dim)

    @property
    def scale(self) -> float:
        return 1.0 / float(np.sqrt(self.head_dim))

    def _qkv(self, x: jax.Array, positions: jax.Array):
        q = common.rope(self.query(x), positions, self.rope_theta)
        k = common.rope(self.key(x), positions, self.rope_theta)
        return q, k, self.value(x)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Causal self-attention of ``x`` ``[batch, seq, in_features]`` -> ``[.., out]``."""
        common.check_sequence(x, self.in_features)
        t = x.shape[1]
        q, k, v = self._qkv(x, jnp.arange(t))
        visible = jnp.tril(jnp.ones((t, t), bool))
        return self.out(dense_causal_attention(q, k, v, scale=self.scale, visible=visible))

    def init_cache(self, batch_size: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
        """An empty :class:`KVCache` with room for ``max_len`` tokens."""
        batch_size = _tree.check_positive_int(batch_size, "batch_size")
        max_len = _tree.check_positive_int(max_len, "max_len")
        shape = (batch_size, self.num_kv_heads, max_len, self.head_dim)
        zeros = jnp.zeros(shape, dtype)
        return common.KVCache(zeros, zeros, jnp.zeros((), jnp.int32))

    def prefill(self, x: jax.Array, max_len: int) -> tuple[jax.Array, KVCache]:
        """Run the prompt ``x`` (``[batch, seq, in]``); return ``(y, cache)`` sized ``max_len``.

        ``y`` equals ``self(x)``; the cache holds the prompt's keys and values and has room
        for ``max_len - seq`` more tokens.
        """
        common.check_sequence(x, self.in_features)
        b, t, _ = x.shape
        max_len = _tree.check_positive_int(max_len, "max_len")
        if max_len < t:
            raise ValueError(f"max_len={max_len} is shorter than the prompt (seq={t})")
        q, k, v = self._qkv(x, jnp.arange(t))
        visible = jnp.tril(jnp.ones((t, t), bool))
        y = self.out(dense_causal_attention(q, k, v, scale=self.scale, visible=visible))
        pad = ((0, 0), (0, 0), (0, max_len - t), (0, 0))
        k, v = (jnp.pad(jnp.swapaxes(a, 1, 2), pad) for a in (k, v))  # head-major
        return y, common.KVCache(k, v, jnp.asarray(t, jnp.int32))

    def decode_step(self, x_t: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Attend one new token ``x_t`` ``[batch, in]`` to the cache; returns ``(y_t, cache)``.

        Writing past ``max_len`` is an error when ``cache.index`` is concrete; under ``jit`` it
        is not checked (the last slot would be overwritten).
        """
        x_t = common.check_token(x_t, self.in_features)
        common.check_cache(cache, common.KVCache, x_t.shape[0])
        max_len = cache.key.shape[2]
        if not isinstance(cache.index, jax.core.Tracer) and int(cache.index) >= max_len:
            raise ValueError(f"the KV cache is full: it holds max_len={max_len} tokens")
        pos = cache.index
        q, k, v = self._qkv(x_t[:, None], pos[None])  # [batch, 1, heads, dim]
        write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf, jnp.swapaxes(new, 1, 2).astype(buf.dtype), pos, 2
        )
        key, value = write(cache.key, k), write(cache.value, v)
        visible = jnp.arange(max_len) <= pos
        o = common.decode_attention(q[:, 0], key, value, visible, self.scale)
        return self.out(o), common.KVCache(key, value, pos + 1)
