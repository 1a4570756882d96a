"""Eager validation shared by the kernels: shapes, static options and concrete gate values."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from linjax import _tree


def check_array(x: Any, name: str, rank: int, layout: str) -> None:
    """Raise unless ``x`` is a real floating array of the given rank."""
    shape = getattr(x, "shape", None)
    if shape is None or len(shape) != rank:
        raise ValueError(f"{name} must have rank {rank} {layout}, got shape {shape}")
    _tree.check_floating(x, name)


def check_window(window: Any) -> int:
    """``window`` counts visible keys including the query itself, so it is an int >= 1."""
    return _tree.check_positive_int(window, "window")


def check_scale(scale: Any, head_dim: int) -> float:
    """``None`` means ``head_dim ** -0.5``; otherwise a static finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, jax.core.Tracer):
        raise TypeError(f"scale must be a static Python float, got a traced value {scale}")
    arr = np.asarray(scale)
    if isinstance(scale, bool) or arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"{scale=} must be a real scalar")
    if not np.isfinite(arr):
        raise ValueError(f"{scale=} must be finite")
    return float(arr)


def check_log_gates(log_gates: jax.Array) -> None:
    """Log-gates are ``log(alpha)`` with ``alpha`` in ``(0, 1]``, so ``<= 0`` and not NaN.

    Only concrete values can be inspected; under ``jit`` the check is skipped (positive
    log-gates then make the chunked exponents positive and can overflow).
    """
    if isinstance(log_gates, jax.core.Tracer):
        return
    g = np.asarray(jnp.asarray(log_gates, jnp.float32))
    if g.size == 0:
        return
    largest = float(np.max(g))
    if np.isnan(g).any():
        raise ValueError("log_gates contain NaN; they must be finite log forget gates <= 0")
    if largest > 0:
        raise ValueError(
            f"log_gates must be <= 0 (log of a forget gate in (0, 1]), got max(log_gates)="
            f"{largest:g}; use e.g. jax.nn.log_sigmoid(x) to produce them"
        )


def accum_dtype(*dtypes: Any) -> jnp.dtype:
    """Accumulation dtype: at least float32 (float64 stays float64 under x64)."""
    return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def check_block_size(block_size: Any) -> int:
    """Tile lengths are static ints, multiples of 8 (TPU sublanes) and at least 8."""
    block_size = _tree.check_positive_int(block_size, "block_size", minimum=8)
    if block_size % 8:
        raise ValueError(f"{block_size=} must be a multiple of 8")
    return block_size
