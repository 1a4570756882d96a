r"""Linear output properties ``spec @ fn(x) > threshold`` shared by BaB, PGD and VNN-LIB.

A property is rows $c_k^\top f(x) > t_k$, $k = 1..S$, grouped: it holds at $x$ iff in
**every** group **some** row holds. By default every row is its own group, so all rows
must hold. The *margin* of a point is

$$m(x) = \min_{g} \max_{k \in g} \big(c_k^\top f(x) - t_k\big),$$

so the property holds at $x$ iff $m(x) > 0$, and a point with $m(x) \le 0$ is a
counterexample. Row-wise lower bounds $\underline{v}_k \le c_k^\top f - t_k$ on a set give
the lower bound $\min_g \max_{k \in g} \underline{v}_k$ of $m$ there (max and min are
monotone).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Property(NamedTuple):
    """A checked property: ``spec`` ``[S, n_out]`` (flat), ``threshold`` ``[S]``, ``mask``.

    ``mask`` is ``[G, S]`` bool, ``mask[g, k]`` iff row ``k`` is in group ``g``.
    """

    spec: jax.Array
    threshold: jax.Array
    mask: jax.Array
    out_shape: tuple


def check_property(
    fn: Callable, like: jax.ShapeDtypeStruct, spec: Any, threshold: Any, groups: Any = None
) -> Property:
    """Validate ``spec`` / ``threshold`` / ``groups`` against ``fn``'s output shape."""
    if not callable(fn):
        raise TypeError(f"fn must be a callable array -> array, got {type(fn).__name__}")
    out = jax.eval_shape(fn, like)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError("fn must return a single array")
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"fn must return a real floating array, got dtype {out.dtype}")
    out_shape = tuple(out.shape)
    size = int(np.prod(out_shape, dtype=np.int64))
    if spec is None:
        raise ValueError("spec must be an array [S, n_out] (or [S, *out_shape]), got None")
    mat = np.asarray(spec)
    if not np.issubdtype(mat.dtype, np.number) or np.iscomplexobj(mat):
        raise TypeError(f"spec must be a real array, got dtype {mat.dtype}")
    flat_ok = mat.ndim == 2 and mat.shape[1] == size
    if mat.ndim < 2 or mat.shape[0] < 1 or not (flat_ok or mat.shape[1:] == out_shape):
        raise ValueError(
            f"spec.shape={mat.shape} must be [S, {size}] or [S, *{out_shape}] with S >= 1 "
            f"(fn's output has shape {out_shape})"
        )
    s = mat.shape[0]
    mat = mat.reshape(s, size)
    if not np.all(np.isfinite(mat)):
        raise ValueError("spec must be finite")
    t = np.asarray(threshold, dtype=np.float64)
    if t.ndim == 0:
        t = np.full((s,), float(t))
    if t.shape != (s,):
        raise ValueError(f"threshold must be a scalar or have shape ({s},), got shape {t.shape}")
    if not np.all(np.isfinite(t)):
        raise ValueError(f"threshold must be finite, got {t}")
    if groups is None:
        mask = np.eye(s, dtype=bool)
    else:
        g = np.asarray(groups)
        if g.shape != (s,) or not np.issubdtype(g.dtype, np.integer):
            raise ValueError(
                f"groups must be an integer array of shape ({s},) (one group id per spec "
                f"row), got {g.dtype} array of shape {g.shape}"
            )
        ids = np.unique(g)
        mask = g[None, :] == ids[:, None]
    dtype = out.dtype
    return Property(jnp.asarray(mat, dtype), jnp.asarray(t, dtype), jnp.asarray(mask), out_shape)


def reduce_rows(values: jax.Array, mask: jax.Array) -> jax.Array:
    r"""$\min_g \max_{k \in g} v_k$ for row values ``[..., S]`` and a ``[G, S]`` mask."""
    v = jnp.where(mask, values[..., None, :], -jnp.inf)
    return jnp.min(jnp.max(v, axis=-1), axis=-1)


def margin_of(fn: Callable, x: jax.Array, spec, threshold, mask) -> jax.Array:
    """The property margin at ``x`` (``> 0`` iff the property holds there)."""
    y = jnp.reshape(fn(x), (-1,)).astype(spec.dtype)
    return reduce_rows(spec @ y - threshold, mask)


def margin_fn(fn: Callable, prop: Property) -> Callable[[jax.Array], jax.Array]:
    """``x -> m(x)``, the property margin (``> 0`` iff the property holds at ``x``)."""
    return lambda x: margin_of(fn, x, prop.spec, prop.threshold, prop.mask)
