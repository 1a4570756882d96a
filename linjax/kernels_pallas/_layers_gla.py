"""The gated linear attention layer (GLA, Yang et al. 2024) with a recurrent decode state."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from linjax import _tree
from linjax.kernels_pallas import _compat
from linjax.kernels_pallas import _layers_common as common
from linjax.kernels_pallas._gla import check_chunk_size, gated_linear_attention, gla_decode_step
from linjax.kernels_pallas._layers_common import GLACache


def check_impl(impl: Any) -> str:
    if impl not in _compat.IMPLS:
        raise ValueError(f"{impl=} must be one of {_compat.IMPLS}")
    return impl


def check_normalizer(value: Any) -> float:
    _tree.check_positive_scalar(value, "gate_logit_normalizer")
    return float(value)


class GatedLinearAttention(nnx.Module):
    r"""Gated linear attention layer: projections, low-rank forget gates, GLA, gated output.

    As in the GLA paper (and fla's ``GatedLinearAttention``), per head

    * ``q, k = x W_q, x W_k`` (``key_dim`` each), ``v = x W_v`` (``value_dim``);
    * per-channel log forget gates from a low-rank projection,
      ``g = log_sigmoid(x W_{g1} W_{g2} + b) / gate_logit_normalizer`` (``<= 0``; the
      normaliser 16 keeps gates close to 1, i.e. long memory);
    * ``o = GLA(q, k, v, g)`` with scale ``key_dim ** -0.5``
      (:func:`~linjax.kernels_pallas.gated_linear_attention`, chunkwise);
    * ``y = W_o (RMSNorm(o) * silu(x W_r))`` (per-head RMSNorm over ``value_dim``; the output
      gate ``silu(x W_r)`` is dropped with ``use_output_gate=False``).

    Training and prefill use the chunkwise kernel; :meth:`decode_step` advances the
    ``[heads, key_dim, value_dim]`` state by one token with
    :func:`~linjax.kernels_pallas.gla_decode_step`, so decoding costs the same per token at
    any context length.

    Args:
        num_heads: heads.
        in_features: size of the last input axis.
        key_dim: per-head query/key size, default ``in_features // (2 * num_heads)`` (fla's
            ``expand_k = 0.5``).
        value_dim: per-head value size, default ``in_features // num_heads``.
        out_features: output size, default ``in_features``.
        gate_low_rank_dim: rank of the gate projection (16 in GLA).
        gate_logit_normalizer: divisor of the log-sigmoid gates (16 in GLA).
        use_output_gate: multiply by ``silu(x W_r)`` before the output projection.
        chunk_size: chunk length of the chunkwise kernel (a power of two).
        impl: ``impl`` of :func:`~linjax.kernels_pallas.gated_linear_attention`.
        param_dtype: parameter dtype.
        rngs: ``nnx.Rngs`` for the initialisation.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from linjax.kernels_pallas import layers
        >>> gla = layers.GatedLinearAttention(2, 16, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((1, 6, 16))
        >>> y, cache = gla.prefill(x[:, :5])
        >>> y_t, cache = gla.decode_step(x[:, 5], cache)
        >>> bool(jnp.allclose(y_t, gla(x)[:, 5], atol=1e-5))
        True

    References:
        Yang, Wang, Shen, Panda, Kim (2024), "Gated Linear Attention Transformers with
        Hardware-Efficient Training", https://arxiv.org/abs/2312.06635
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        key_dim: int | None = None,
        value_dim: int | None = None,
        out_features: int | None = None,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        use_output_gate: bool = True,
        chunk_size: int = 64,
        impl: str = "auto",
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        num_heads = _tree.check_positive_int(num_heads, "num_heads")
        in_features = _tree.check_positive_int(in_features, "in_features")
        if key_dim is None:
            key_dim = max(1, in_features // (2 * num_heads))
        if value_dim is None:
            value_dim = max(1, in_features // num_heads)
        self.num_heads, self.in_features = num_heads, in_features
        self.key_dim = _tree.check_positive_int(key_dim, "key_dim")
        self.value_dim = _tree.check_positive_int(value_dim, "value_dim")
        out_features = in_features if out_features is None else out_features
        self.out_features = _tree.check_positive_int(out_features, "out_features")
        rank = _tree.check_positive_int(gate_low_rank_dim, "gate_low_rank_dim")
        self.gate_logit_normalizer = check_normalizer(gate_logit_normalizer)
        self.use_output_gate = bool(use_output_gate)
        self.chunk_size = check_chunk_size(chunk_size)
        self.impl = check_impl(impl)
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        hk, hv = (num_heads, self.key_dim), (num_heads, self.value_dim)
        self.q_proj = nnx.LinearGeneral(in_features, hk, use_bias=False, **kw)
        self.k_proj = nnx.LinearGeneral(in_features, hk, use_bias=False, **kw)
        self.v_proj = nnx.LinearGeneral(in_features, hv, use_bias=False, **kw)
        self.gate_down = nnx.Linear(in_features, rank, use_bias=False, **kw)
        self.gate_up = nnx.LinearGeneral(rank, hk, use_bias=True, **kw)
        self.g_proj = (
            nnx.LinearGeneral(in_features, hv, use_bias=False, **kw)
            if self.use_output_gate
            else nnx.data(None)
        )
        self.norm = nnx.RMSNorm(self.value_dim, **kw)
        self.out = nnx.LinearGeneral(hv, self.out_features, axis=(-2, -1), use_bias=False, **kw)

    def _project(self, x: jax.Array):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        g = jax.nn.log_sigmoid(self.gate_up(self.gate_down(x))) / self.gate_logit_normalizer
        return q, k, v, g

    def _finish(self, x: jax.Array, o: jax.Array) -> jax.Array:
        o = self.norm(o)
        if self.g_proj is not None:
            o = o * jax.nn.silu(self.g_proj(x))
        return self.out(o)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Causal GLA of ``x`` ``[batch, seq, in_features]`` -> ``[batch, seq, out]``."""
        return self.prefill(x)[0]

    def init_cache(self, batch_size: int, max_len: int | None = None) -> GLACache:
        """A zero state; ``max_len`` is accepted for a uniform API and ignored (O(1) state)."""
        batch_size = _tree.check_positive_int(batch_size, "batch_size")
        dtype = common.state_dtype(self.q_proj.kernel.get_value().dtype)
        shape = (batch_size, self.num_heads, self.key_dim, self.value_dim)
        return GLACache(jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))

    def prefill(self, x: jax.Array, cache: GLACache | None = None) -> tuple[jax.Array, GLACache]:
        """Run ``x`` from ``cache`` (default: a zero state); return ``(y, cache)``.

        Calls can be chained: ``prefill(x2, prefill(x1)[1])`` equals ``prefill(x1 ++ x2)``.
        """
        common.check_sequence(x, self.in_features)
        if cache is not None:
            common.check_cache(cache, GLACache, x.shape[0])
        q, k, v, g = self._project(x)
        o, state = gated_linear_attention(
            q,
            k,
            v,
            g,
            initial_state=None if cache is None else cache.state,
            chunk_size=self.chunk_size,
            impl=self.impl,
        )
        index = jnp.asarray(x.shape[1], jnp.int32) + (0 if cache is None else cache.index)
        return self._finish(x, o), GLACache(state, index)

    def decode_step(self, x_t: jax.Array, cache: GLACache) -> tuple[jax.Array, GLACache]:
        """One token ``x_t`` ``[batch, in]`` -> ``(y_t [batch, out], cache)``, O(1) in context."""
        x_t = common.check_token(x_t, self.in_features)
        common.check_cache(cache, GLACache, x_t.shape[0])
        q, k, v, g = self._project(x_t)
        o, state = gla_decode_step(q, k, v, g, cache.state)
        return self._finish(x_t, o), GLACache(state, cache.index + 1)
