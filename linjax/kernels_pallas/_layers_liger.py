"""Liger attention (0.5 sliding-window softmax + 0.5 GLA on shared weights) and ``linearize``."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linjax import _tree
from linjax.kernels_pallas import _checks
from linjax.kernels_pallas import _layers_common as common
from linjax.kernels_pallas._gla import check_chunk_size, gated_linear_attention, gla_decode_step
from linjax.kernels_pallas._layers_common import LigerCache
from linjax.kernels_pallas._layers_gla import check_impl, check_normalizer
from linjax.kernels_pallas._layers_softmax import SoftmaxAttention
from linjax.kernels_pallas._local_attention import local_attention


class LigerAttention(nnx.Module):
    r"""Liger attention: ``0.5 * sliding-window softmax + 0.5 * gated linear attention``.

    Both branches read the *same* ``query``, ``key``, ``value`` projections (shapes as in
    ``flax.nnx.MultiHeadAttention``), so a pretrained softmax layer turns into this one
    without new weights (:func:`linearize`). Per head, with ``q, k, v`` the projections:

    * **sliding window** (SWA): causal softmax attention of the rotary-embedded ``q, k``
      (when ``rope_theta`` is set) over the last keys, scale ``head_dim ** -0.5``
      (:func:`~linjax.kernels_pallas.local_attention`);
    * **GLA**: feature maps ``phi(q) = softmax(q)``, ``phi(k) = softmax(k)`` over the head
      dimension, log forget gates taken from the key projection,
      ``g = log_sigmoid(k) / gate_logit_normalizer`` (Liger: "gates from the key",
      normaliser 16), scale 1 (:func:`~linjax.kernels_pallas.gated_linear_attention`);
    * ``y = out(0.5 * SWA + 0.5 * GLA)``: two separately normalised branches, not one joint
      softmax. Grouped-query heads are shared as in the softmax layer.

    **Window convention.** ``window`` counts the visible keys *including the query itself*:
    query ``i`` sees keys ``i - window + 1, ..., i`` (flash-attn ``window_size=(window-1,
    0)``). Liger's released models see one key more: Hugging Face transformers (4.52, which
    Liger was tested with) passes ``sliding_window=64`` to flash-attn as ``(64, 64)``, so
    query ``i`` sees ``i - 64, ..., i``, 65 keys. ``liger_compatible_window=True`` reproduces
    that: ``window`` then counts the keys *before* the query and ``num_window_keys =
    window + 1``.

    Decoding: :meth:`prefill` returns a :class:`LigerCache` holding the GLA state and a ring
    buffer of the last ``num_window_keys`` keys and values; :meth:`decode_step` costs
    ``O(num_window_keys + head_dim^2)`` per token and head, independent of the context.

    Args:
        num_heads: query heads.
        in_features: size of the last input axis.
        head_dim: per-head size, default ``in_features // num_heads``.
        num_kv_heads: key/value heads (a divisor of ``num_heads``), default ``num_heads``.
        out_features: output size, default ``in_features``.
        use_bias: biases in the projections.
        rope_theta: rotary base for the sliding-window branch, or ``None``.
        window: sliding-window size (see the convention above), default 64 as in Liger.
        liger_compatible_window: count ``window`` as Liger/Hugging Face do (``window + 1``
            keys).
        gate_logit_normalizer: divisor of the log-sigmoid gates (16 in Liger).
        chunk_size: GLA chunk length (a power of two).
        impl: ``impl`` of both kernels (``"auto"``, ``"pallas"``, ``"xla"``, ``"reference"``).
        dtype: computation dtype of the projections (``None``: inferred).
        param_dtype: parameter dtype.
        rngs: ``nnx.Rngs`` for the initialisation.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from linjax.kernels_pallas import layers
        >>> attn = layers.LigerAttention(2, 16, window=4, rngs=nnx.Rngs(0))
        >>> attn.num_window_keys
        4
        >>> attn(jnp.ones((1, 10, 16))).shape
        (1, 10, 16)

    References:
        Lan, Wang, Zhou, Sun, Liu, Cheng (2025), "Liger: Linearizing Large Language Models
        to Gated Recurrent Structures", https://arxiv.org/abs/2503.01496
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
        window: int = 64,
        liger_compatible_window: bool = False,
        gate_logit_normalizer: float = 16.0,
        chunk_size: int = 64,
        impl: str = "auto",
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
        self.window = _checks.check_window(window)
        self.liger_compatible_window = bool(liger_compatible_window)
        self.gate_logit_normalizer = check_normalizer(gate_logit_normalizer)
        self.chunk_size = check_chunk_size(chunk_size)
        self.impl = check_impl(impl)

    @property
    def num_window_keys(self) -> int:
        """Keys each query sees in the sliding-window branch, itself included."""
        return self.window + 1 if self.liger_compatible_window else self.window

    @property
    def scale(self) -> float:
        """Logit scale of the sliding-window branch."""
        return 1.0 / float(np.sqrt(self.head_dim))

    def _gla_inputs(self, q: jax.Array, k: jax.Array, v: jax.Array):
        """Feature maps, gates from the key projection, kv heads repeated to ``num_heads``."""
        acc = common.state_dtype(q.dtype)
        g = jax.nn.log_sigmoid(k.astype(acc)) / self.gate_logit_normalizer
        fq = jax.nn.softmax(q.astype(acc), axis=-1)
        fk = jax.nn.softmax(k.astype(acc), axis=-1)
        rep = lambda x: common.repeat_heads(x, self.num_heads)
        return fq, rep(fk), rep(v.astype(acc)), rep(g)

    def _forward(self, x: jax.Array):
        common.check_sequence(x, self.in_features)
        t = x.shape[1]
        q, k, v = self.query(x), self.key(x), self.value(x)
        o_gla, state = gated_linear_attention(
            *self._gla_inputs(q, k, v), scale=1.0, chunk_size=self.chunk_size, impl=self.impl
        )
        pos = jnp.arange(t)
        qr, kr = common.rope(q, pos, self.rope_theta), common.rope(k, pos, self.rope_theta)
        o_swa = local_attention(
            qr,
            kr,
            v,
            window=self.num_window_keys,
            causal=True,
            scale=self.scale,
            impl=self.impl,
        )
        o = 0.5 * o_swa + 0.5 * o_gla.astype(o_swa.dtype)
        return self.out(o), state, kr, v

    def __call__(self, x: jax.Array) -> jax.Array:
        """Causal Liger attention of ``x`` ``[batch, seq, in_features]`` -> ``[.., out]``."""
        return self._forward(x)[0]

    def init_cache(self, batch_size: int, max_len: int | None = None) -> LigerCache:
        """An empty cache; ``max_len`` is accepted for a uniform API and ignored."""
        batch_size = _tree.check_positive_int(batch_size, "batch_size")
        dtype = self.key.kernel.get_value().dtype
        acc = common.state_dtype(dtype)
        state = jnp.zeros((batch_size, self.num_heads, self.head_dim, self.head_dim), acc)
        ring = jnp.zeros((batch_size, self.num_kv_heads, self.num_window_keys, self.head_dim))
        ring = ring.astype(dtype)
        return LigerCache(state, ring, ring, jnp.zeros((), jnp.int32))

    def prefill(self, x: jax.Array) -> tuple[jax.Array, LigerCache]:
        """Run the prompt ``x`` from an empty cache; return ``(y, cache)`` with ``y = self(x)``."""
        y, state, kr, v = self._forward(x)
        t, w = x.shape[1], self.num_window_keys
        # Slot s holds the latest position p < t with p % w == s (none if that p < 0).
        slot_pos = (t - 1) - jnp.mod(t - 1 - jnp.arange(w), w)
        valid = (slot_pos >= 0)[None, None, :, None]
        take = lambda a: jnp.where(
            valid, jnp.take(jnp.swapaxes(a, 1, 2), jnp.maximum(slot_pos, 0), axis=2), 0
        )
        return y, LigerCache(state, take(kr), take(v), jnp.asarray(t, jnp.int32))

    def decode_step(self, x_t: jax.Array, cache: LigerCache) -> tuple[jax.Array, LigerCache]:
        """One token ``x_t`` ``[batch, in]`` -> ``(y_t [batch, out], cache)``."""
        x_t = common.check_token(x_t, self.in_features)
        common.check_cache(cache, LigerCache, x_t.shape[0])
        w = cache.key.shape[2]
        if w != self.num_window_keys:
            raise ValueError(
                f"the cache's ring buffer holds {w} keys but this layer's window has "
                f"{self.num_window_keys}"
            )
        pos = cache.index
        q, k, v = self.query(x_t), self.key(x_t), self.value(x_t)  # [batch, heads, dim]
        o_gla, state = gla_decode_step(*self._gla_inputs(q, k, v), cache.state, scale=1.0)
        qr = common.rope(q[:, None], pos[None], self.rope_theta)[:, 0]
        kr = common.rope(k[:, None], pos[None], self.rope_theta)[:, 0]
        slot = jnp.mod(pos, w)
        write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
            buf, new[:, :, None].astype(buf.dtype), slot, 2
        )
        key, value = write(cache.key, kr), write(cache.value, v)
        slot_pos = pos - jnp.mod(pos - jnp.arange(w), w)
        o_swa = common.decode_attention(qr, key, value, slot_pos >= 0, self.scale)
        o = 0.5 * o_swa + 0.5 * o_gla.astype(o_swa.dtype)
        return self.out(o), LigerCache(state, key, value, pos + 1)


def _source_config(module: Any) -> dict[str, Any]:
    """Sizes and options of a softmax attention module that :func:`linearize` can convert."""
    if isinstance(module, SoftmaxAttention):
        return dict(
            num_heads=module.num_heads,
            in_features=module.in_features,
            head_dim=module.head_dim,
            num_kv_heads=module.num_kv_heads,
            out_features=module.out_features,
            use_bias=module.use_bias,
            rope_theta=module.rope_theta,
        )
    if isinstance(module, nnx.MultiHeadAttention):
        if module.normalize_qk:
            raise ValueError(
                "linearize does not support nnx.MultiHeadAttention(normalize_qk=True): the "
                "query/key layer norms have no counterpart in LigerAttention"
            )
        if module.in_kv_features != module.in_features:
            raise ValueError(
                "linearize needs self-attention: nnx.MultiHeadAttention has in_kv_features="
                f"{module.in_kv_features} != in_features={module.in_features}"
            )
        return dict(
            num_heads=module.num_heads,
            in_features=module.in_features,
            head_dim=module.head_dim,
            num_kv_heads=module.num_kv_heads,
            out_features=module.out_features,
            use_bias=module.use_bias,
            rope_theta=None,
        )
    raise TypeError(
        "linearize takes a linjax.kernels_pallas.layers.SoftmaxAttention or a "
        f"flax.nnx.MultiHeadAttention, got {type(module).__name__}"
    )


def linearize(
    module: SoftmaxAttention | nnx.MultiHeadAttention,
    *,
    window: int = 64,
    liger_compatible_window: bool = False,
    gate_logit_normalizer: float = 16.0,
    chunk_size: int = 64,
    impl: str = "auto",
) -> LigerAttention:
    r"""Turn a (pretrained) causal softmax attention layer into :class:`LigerAttention`.

    The new layer reuses the ``query``, ``key``, ``value`` and ``out`` parameters of
    ``module`` (the same arrays, not copies; later updates to either module do not affect
    the other) and adds none: the GLA branch's gates come from the key projection. Sizes,
    grouped-query heads, biases, dtypes and the rotary embedding (for
    :class:`SoftmaxAttention`) carry over. The result differs from the softmax layer (half
    of it is now a linear recurrence); Liger recovers the quality with brief fine-tuning.

    Args:
        module: a :class:`SoftmaxAttention`, or a ``flax.nnx.MultiHeadAttention`` used as
            causal self-attention (``normalize_qk=False``, ``in_kv_features ==
            in_features``; dropout is not carried over).
        window: sliding-window size; ``window`` keys including the query itself, or
            ``window + 1`` with ``liger_compatible_window=True`` (see :class:`LigerAttention`).
        liger_compatible_window: Liger / Hugging Face window convention.
        gate_logit_normalizer: divisor of the log-sigmoid gates (16 in Liger).
        chunk_size: GLA chunk length.
        impl: kernel implementation.

    Returns:
        A :class:`LigerAttention` with ``module``'s weights.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from linjax.kernels_pallas import layers
        >>> attn = layers.SoftmaxAttention(2, 16, rngs=nnx.Rngs(0))
        >>> liger = layers.linearize(attn, window=8)
        >>> liger.query.kernel.get_value() is attn.query.kernel.get_value()
        True
    """
    config = _source_config(module)
    first = module.query.kernel.get_value()
    liger = LigerAttention(
        **config,
        window=window,
        liger_compatible_window=liger_compatible_window,
        gate_logit_normalizer=gate_logit_normalizer,
        chunk_size=chunk_size,
        impl=impl,
        dtype=getattr(module.query, "dtype", None),
        param_dtype=first.dtype,
        rngs=nnx.Rngs(0),
    )
    for name in ("query", "key", "value", "out"):
        nnx.update(getattr(liger, name), nnx.state(getattr(module, name), nnx.Param))
    return liger
