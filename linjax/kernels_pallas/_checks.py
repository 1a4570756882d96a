"""Eager validation shared by the kernels: shapes, static options and concrete gate values."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from linjax import _tree

QKV_LAYOUT = "[batch, seq, heads, head_dim]"


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


def check_qkv(q: Any, k: Any, v: Any) -> None:
    """Self-attention inputs ``[batch, seq, heads, dim]``: one dtype, one length, GQA heads."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_array(x, name, 4, QKV_LAYOUT)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    (b, t, h, d), (bk, s, hk, dk) = q.shape, k.shape
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(
            f"k and v must agree on [batch, seq, heads], got k.shape={k.shape}, v.shape={v.shape}"
        )
    if bk != b:
        raise ValueError(
            f"q and k have different batch sizes: q.shape={q.shape}, k.shape={k.shape}"
        )
    if s != t:
        raise ValueError(
            f"local attention is self-attention over one sequence: q has seq length {t} but k "
            f"and v have {s} (q.shape={q.shape}, k.shape={k.shape})"
        )
    if t < 1:
        raise ValueError(f"sequence length must be >= 1, got q.shape={q.shape}")
    if hk < 1 or h % hk:
        raise ValueError(
            f"q has {h} heads, which must be a multiple of the {hk} heads of k and v "
            f"(grouped-query attention); q.shape={q.shape}, k.shape={k.shape}"
        )
    if dk != d:
        raise ValueError(f"q and k must share head_dim, got q.shape={q.shape}, k.shape={k.shape}")
