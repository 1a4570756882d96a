"""CLEAR's 2-D local attention layer: softmax attention restricted to a disc on the image grid."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from linjax.kernels_pallas import _layers_common as common
from linjax.kernels_pallas._layers_gla import check_impl
from linjax.kernels_pallas._local_attention_2d import local_attention_2d


def check_radius(radius: Any) -> float:
    if isinstance(radius, bool) or not isinstance(radius, int | float | np.number):
        raise TypeError(f"radius={radius!r} must be a real number (in grid cells)")
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"radius={radius!r} must be a finite number > 0")
    return int(radius) if float(radius).is_integer() else float(radius)


class LocalAttention2D(nnx.Module):
    r"""CLEAR attention layer: multi-head softmax attention inside a circular 2-D window.

    The input is ``num_global`` prefix tokens (e.g. text) followed by an image grid of
    ``grid_shape = (height, width)`` tokens in raster order. Image tokens at ``(y, x)`` and
    ``(y', x')`` attend to each other iff ``(y - y')^2 + (x - x')^2 < radius^2`` (strict: a
    pair at distance exactly ``radius`` is excluded); prefix tokens attend to, and are
    attended by, every token. Attention is bidirectional (no causal mask). The projections
    ``query``, ``key``, ``value``, ``out`` have ``flax.nnx.MultiHeadAttention``'s shapes, so
    :meth:`from_attention` converts a pretrained (diffusion-transformer) attention layer by
    reusing its weights, as CLEAR does before fine-tuning. Cost ``O(T * radius^2)``
    through :func:`~linjax.kernels_pallas.local_attention_2d`.

    Args:
        num_heads: query heads.
        in_features: size of the last input axis.
        radius: window radius in grid cells (CLEAR: 8, 16 or 32).
        head_dim: per-head size, default ``in_features // num_heads``.
        num_kv_heads: key/value heads (a divisor of ``num_heads``), default ``num_heads``.
        out_features: output size, default ``in_features``.
        use_bias: biases in the projections.
        impl: ``impl`` of :func:`~linjax.kernels_pallas.local_attention_2d`.
        dtype: computation dtype of the projections (``None``: inferred).
        param_dtype: parameter dtype.
        rngs: ``nnx.Rngs`` for the initialisation.

    Examples:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from linjax.kernels_pallas import layers
        >>> attn = layers.LocalAttention2D(2, 16, radius=3, rngs=nnx.Rngs(0))
        >>> x = jnp.ones((1, 4 + 6 * 5, 16))  # 4 global tokens, then a 6 x 5 grid
        >>> attn(x, grid_shape=(6, 5), num_global=4).shape
        (1, 34, 16)

    References:
        Liu, Tan, Wang (2025), "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion
        Transformers Up", https://arxiv.org/abs/2412.16112
    """

    def __init__(
        self,
        num_heads: int,
        in_features: int,
        *,
        radius: float,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        out_features: int | None = None,
        use_bias: bool = True,
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
        self.radius = check_radius(radius)
        self.impl = check_impl(impl)

    def __call__(
        self, x: jax.Array, *, grid_shape: tuple[int, int], num_global: int = 0
    ) -> jax.Array:
        """``x`` ``[batch, num_global + height * width, in]`` -> ``[batch, seq, out]``."""
        common.check_sequence(x, self.in_features)
        q, k, v = self.query(x), self.key(x), self.value(x)
        o = local_attention_2d(
            q,
            k,
            v,
            grid_shape=grid_shape,
            radius=self.radius,
            num_global=num_global,
            impl=self.impl,
        )
        return self.out(o)

    @classmethod
    def from_attention(cls, module: Any, *, radius: float, impl: str = "auto") -> LocalAttention2D:
        """A :class:`LocalAttention2D` reusing the q/k/v/o weights of a softmax attention layer.

        ``module`` is a ``flax.nnx.MultiHeadAttention`` (self-attention, no ``normalize_qk``)
        or a :class:`~linjax.kernels_pallas.layers.SoftmaxAttention` without rotary
        embedding. The arrays are shared, the Variables are not.
        """
        from linjax.kernels_pallas._layers_liger import _source_config

        config = _source_config(module)
        if config.pop("rope_theta") is not None:
            raise ValueError(
                "LocalAttention2D has no rotary embedding; the source layer uses rope_theta="
                f"{module.rope_theta}"
            )
        first = module.query.kernel.get_value()
        layer = cls(
            **config,
            radius=radius,
            impl=impl,
            dtype=getattr(module.query, "dtype", None),
            param_dtype=first.dtype,
            rngs=nnx.Rngs(0),
        )
        for name in ("query", "key", "value", "out"):
            nnx.update(getattr(layer, name), nnx.state(getattr(module, name), nnx.Param))
        return layer
