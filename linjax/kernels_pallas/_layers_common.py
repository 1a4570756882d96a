"""Pieces shared by the attention layers: projections, rotary embedding, caches, checks."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from linjax import _tree


class KVCache(NamedTuple):
    """Key/value cache of :class:`~linjax.kernels_pallas.layers.SoftmaxAttention`.

    Attributes:
        key: ``[batch, kv_heads, max_len, head_dim]`` (keys after the rotary embedding),
            head-major so that a decode step reads each head's keys contiguously.
        value: ``[batch, kv_heads, max_len, head_dim]``.
        index: int32 scalar, the number of tokens written so far (the next position).
    """

    key: jax.Array
    value: jax.Array
    index: jax.Array


class GLACache(NamedTuple):
    """Recurrent state of :class:`~linjax.kernels_pallas.layers.GatedLinearAttention`.

    Attributes:
        state: ``[batch, heads, key_dim, value_dim]``, float32 (float64 under float64 params).
        index: int32 scalar, the number of tokens seen so far.
    """

    state: jax.Array
    index: jax.Array


class LigerCache(NamedTuple):
    """Decode state of :class:`~linjax.kernels_pallas.layers.LigerAttention`: GLA state + ring.

    Attributes:
        state: GLA state ``[batch, heads, head_dim, head_dim]``, float32 (or float64).
        key: ring buffer of the last ``num_window_keys`` keys (after the rotary embedding),
            ``[batch, kv_heads, num_window_keys, head_dim]``; position ``p`` lives in slot
            ``p % num_window_keys``.
        value: ring buffer of values, same shape as ``key``.
        index: int32 scalar, the number of tokens seen so far (the next position).
    """

    state: jax.Array
    key: jax.Array
    value: jax.Array
    index: jax.Array


def head_projections(
    in_features: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    out_features: int,
    *,
    use_bias: bool,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
) -> tuple[nnx.LinearGeneral, nnx.LinearGeneral, nnx.LinearGeneral, nnx.LinearGeneral]:
    """``query, key, value, out`` with ``nnx.MultiHeadAttention``'s parameter shapes."""
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    query = nnx.LinearGeneral(in_features, (num_heads, head_dim), **kw)
    key = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **kw)
    value = nnx.LinearGeneral(in_features, (num_kv_heads, head_dim), **kw)
    out = nnx.LinearGeneral((num_heads, head_dim), out_features, axis=(-2, -1), **kw)
    return query, key, value, out


def init_attention(
    module: nnx.Module,
    num_heads: Any,
    in_features: Any,
    head_dim: Any,
    num_kv_heads: Any,
    out_features: Any,
    *,
    use_bias: bool,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
) -> None:
    """Validate the sizes and give ``module`` its sizes, ``use_bias`` and q/k/v/o projections."""
    sizes = check_sizes(num_heads, in_features, head_dim, num_kv_heads, out_features)
    module.num_heads, module.in_features, module.head_dim, module.num_kv_heads = sizes[:4]
    module.out_features = sizes[4]
    module.use_bias = bool(use_bias)
    module.query, module.key, module.value, module.out = head_projections(
        module.in_features,
        module.num_heads,
        module.num_kv_heads,
        module.head_dim,
        module.out_features,
        use_bias=module.use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


def check_sizes(
    num_heads: Any, in_features: Any, head_dim: Any, num_kv_heads: Any, out_features: Any
) -> tuple[int, int, int, int, int]:
    """Validate layer sizes; defaults: ``head_dim = in // heads``, ``kv_heads = heads``."""
    num_heads = _tree.check_positive_int(num_heads, "num_heads")
    in_features = _tree.check_positive_int(in_features, "in_features")
    if head_dim is None:
        if in_features % num_heads:
            raise ValueError(
                f"in_features={in_features} is not divisible by num_heads={num_heads}; "
                "pass head_dim explicitly"
            )
        head_dim = in_features // num_heads
    head_dim = _tree.check_positive_int(head_dim, "head_dim")
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    num_kv_heads = _tree.check_positive_int(num_kv_heads, "num_kv_heads")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be a multiple of num_kv_heads={num_kv_heads}")
    out_features = in_features if out_features is None else out_features
    out_features = _tree.check_positive_int(out_features, "out_features")
    return num_heads, in_features, head_dim, num_kv_heads, out_features


def check_rope(rope_theta: Any, head_dim: int) -> float | None:
    """``None`` (no rotary embedding) or a positive base; rotary needs an even head_dim."""
    if rope_theta is None:
        return None
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, int | float):
        raise TypeError(f"{rope_theta=} must be None or a positive number")
    if not rope_theta > 0:
        raise ValueError(f"{rope_theta=} must be positive")
    if head_dim % 2:
        raise ValueError(f"the rotary embedding needs an even head_dim, got {head_dim=}")
    return float(rope_theta)


def rope(x: jax.Array, positions: jax.Array, theta: float | None) -> jax.Array:
    """Rotary position embedding (half-split layout) of ``x`` ``[batch, seq, heads, dim]``.

    ``positions`` is ``[seq]`` (int). With ``theta=None`` ``x`` is returned unchanged.
    """
    if theta is None:
        return x
    half = x.shape[-1] // 2
    acc = jnp.promote_types(x.dtype, jnp.float32)
    freqs = theta ** (-jnp.arange(half, dtype=acc) / half)
    angles = positions.astype(acc)[:, None] * freqs  # [seq, half]
    cos, sin = jnp.cos(angles)[:, None, :], jnp.sin(angles)[:, None, :]
    x1, x2 = x[..., :half].astype(acc), x[..., half:].astype(acc)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def repeat_heads(x: jax.Array, num_heads: int) -> jax.Array:
    """``[..., kv_heads, d] -> [..., num_heads, d]``: each kv head serves consecutive q heads."""
    groups = num_heads // x.shape[-2]
    return x if groups == 1 else jnp.repeat(x, groups, axis=-2)


def decode_attention(
    q: jax.Array, key: jax.Array, value: jax.Array, visible: jax.Array, scale: float
) -> jax.Array:
    """One query per head against a head-major cache: ``[B, H, D] x [B, Hkv, S, D]``.

    ``visible`` is a boolean ``[S]`` (at least one True). Query head ``h`` reads kv head
    ``h // (H // Hkv)``. Logits and softmax in at least float32; returns ``[B, H, Dv]``.
    """
    b, h, d = q.shape
    hk = key.shape[1]
    acc = jnp.promote_types(q.dtype, jnp.float32)
    qg = q.astype(acc).reshape(b, hk, h // hk, d)
    s = jnp.einsum("bkgd,bksd->bkgs", qg, key.astype(acc)) * scale
    p = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    o = jnp.einsum("bkgs,bkse->bkge", p, value.astype(acc))
    return o.reshape(b, h, value.shape[-1]).astype(q.dtype)


def check_sequence(x: Any, in_features: int, name: str = "x") -> None:
    """``x`` must be ``[batch, seq, in_features]`` with ``seq >= 1``."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != 3 or shape[-1] != in_features or shape[1] < 1:
        raise ValueError(
            f"{name} must have shape [batch, seq, in_features={in_features}] with seq >= 1, "
            f"got shape {shape}"
        )
    _tree.check_floating(x, name)


def check_token(x: Any, in_features: int) -> jax.Array:
    """One decode token ``[batch, in_features]`` (or ``[batch, 1, in_features]``) -> 2-D."""
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) == 3 and shape[1] == 1:
        x = x[:, 0]
        shape = x.shape
    if shape is None or len(shape) != 2 or shape[-1] != in_features:
        raise ValueError(
            f"a decode step takes one token x_t of shape [batch, in_features={in_features}] "
            f"(or [batch, 1, in_features]), got shape {shape}"
        )
    _tree.check_floating(x, "x_t")
    return x


def check_cache(cache: Any, cls: type, batch: int) -> None:
    """The cache is the right NamedTuple and its batch matches the token's."""
    if not isinstance(cache, cls):
        raise TypeError(
            f"cache must be a {cls.__name__} (from init_cache or prefill), got {type(cache)}"
        )
    if cache[0].shape[0] != batch:
        raise ValueError(
            f"the cache holds batch size {cache[0].shape[0]} but x_t has batch size {batch}"
        )


def state_dtype(dtype: Any) -> jnp.dtype:
    """Recurrent states are kept in at least float32."""
    return jnp.promote_types(dtype, jnp.float32)
