"""Pytree algebra shared by every subpackage.

Vectors in linjax are arbitrary pytrees of floating arrays (flax nnx state, equinox
arrays, dicts). These helpers do the linear algebra leaf by leaf, so sharded leaves stay
sharded and nothing is copied into one flat buffer unless an algorithm asks for it
(:func:`ravel`). "Stacked" trees carry a leading axis of size ``k`` on every leaf (a basis
of ``k`` vectors, a batch of probes).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

PyTree = Any

_HIGHEST = lax.Precision.HIGHEST


def tree_dot(x: PyTree, y: PyTree) -> jax.Array:
    """Euclidean inner product ``sum_leaves <x_leaf, y_leaf>`` of two same-structured trees."""
    leaves = [
        jnp.vdot(a, b, precision=_HIGHEST)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    ]
    return sum(leaves[1:], leaves[0])


def tree_norm(x: PyTree) -> jax.Array:
    """Euclidean norm of a pytree viewed as one vector."""
    return jnp.sqrt(tree_dot(x, x))


def tree_axpy(alpha: jax.typing.ArrayLike, x: PyTree, y: PyTree) -> PyTree:
    """``alpha * x + y`` leaf by leaf (``alpha`` is cast to each leaf's dtype)."""
    return jax.tree.map(lambda a, b: jnp.asarray(alpha, a.dtype) * a + b, x, y)


def tree_scale(alpha: jax.typing.ArrayLike, x: PyTree) -> PyTree:
    """``alpha * x`` leaf by leaf, keeping each leaf's dtype."""
    return jax.tree.map(lambda a: jnp.asarray(alpha, a.dtype) * a, x)


def tree_add(x: PyTree, y: PyTree) -> PyTree:
    """``x + y`` leaf by leaf."""
    return jax.tree.map(jnp.add, x, y)


def tree_sub(x: PyTree, y: PyTree) -> PyTree:
    """``x - y`` leaf by leaf."""
    return jax.tree.map(jnp.subtract, x, y)


def tree_zeros_like(x: PyTree) -> PyTree:
    """Zeros with the structure, shapes and dtypes of ``x``."""
    return jax.tree.map(jnp.zeros_like, x)


def tree_where(pred: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """Select ``x`` where the scalar ``pred`` holds, else ``y``, on every leaf."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), x, y)


def tree_size(x: PyTree) -> int:
    """Total number of scalars in ``x`` (static)."""
    return int(sum(np.prod(_shape(leaf), dtype=np.int64) for leaf in jax.tree.leaves(x)))


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def tree_dtype(x: PyTree) -> jnp.dtype:
    """The common floating dtype of the leaves (their promotion)."""
    return jnp.result_type(*jax.tree.leaves(x))


def tree_random_like(key: jax.Array, like: PyTree, *, kind: str = "normal") -> PyTree:
    """A random tree shaped like ``like``.

    Args:
        key: PRNG key.
        like: tree of arrays or ``jax.ShapeDtypeStruct``s giving shapes and dtypes.
        kind: ``"normal"`` (standard Gaussian) or ``"rademacher"`` (+-1 with equal odds).

    Returns:
        A tree with the structure, shapes and dtypes of ``like``.
    """
    if kind not in ("normal", "rademacher"):
        raise ValueError(f"{kind=} must be 'normal' or 'rademacher'")
    leaves, treedef = jax.tree.flatten(like)
    # One draw per dtype, split into the leaves: a draw per leaf costs a random-number fusion
    # per leaf, and compile time that grows with the number of leaves (seconds each under
    # vmap on CPU).
    dtypes = list(dict.fromkeys(jnp.dtype(leaf.dtype) for leaf in leaves))
    draw = jr.normal if kind == "normal" else jr.rademacher
    out: list[Any] = [None] * len(leaves)
    for k, dtype in zip(jr.split(key, len(dtypes)), dtypes, strict=True):
        idx = [i for i, leaf in enumerate(leaves) if jnp.dtype(leaf.dtype) == dtype]
        shapes = [_shape(leaves[i]) for i in idx]
        sizes = [math.prod(shape) for shape in shapes]
        flat = draw(k, (sum(sizes),), dtype)
        offsets = np.cumsum([0] + sizes)
        for i, shape, start, stop in zip(idx, shapes, offsets[:-1], offsets[1:], strict=True):
            out[i] = flat[start:stop].reshape(shape)
    return jax.tree.unflatten(treedef, out)


def ravel(x: PyTree) -> tuple[jax.Array, Callable[[jax.Array], PyTree]]:
    """Flatten a tree into one 1-D array; returns ``(flat, unravel)``."""
    return ravel_pytree(x)


# Stacked trees: every leaf has a leading axis k (a basis of k vectors).


def stacked_dot(basis: PyTree, x: PyTree) -> jax.Array:
    """Coefficients ``[<b_i, x>]_i`` of ``x`` against a stacked basis, as one GEMV per leaf."""
    parts = [
        jnp.tensordot(b.reshape(b.shape[0], -1), a.reshape(-1), axes=1, precision=_HIGHEST)
        for b, a in zip(jax.tree.leaves(basis), jax.tree.leaves(x), strict=True)
    ]
    return sum(parts[1:], parts[0])


def stacked_combine(coeffs: jax.Array, basis: PyTree) -> PyTree:
    """``sum_i coeffs[..., i] * b_i``: a linear combination of a stacked basis.

    ``coeffs`` may be ``[k]`` (one vector) or ``[m, k]`` (``m`` stacked vectors).
    """

    def leaf(b):
        flat = b.reshape(b.shape[0], -1)
        out = jnp.tensordot(coeffs.astype(b.dtype), flat, axes=1, precision=_HIGHEST)
        return out.reshape(coeffs.shape[:-1] + b.shape[1:])

    return jax.tree.map(leaf, basis)


# Validation helpers: static checks that raise with the offending value named.


def check_floating(x: PyTree, name: str) -> None:
    """Raise ``TypeError`` unless every leaf of ``x`` is a real floating-point array."""
    leaves = jax.tree.leaves(x)
    if not leaves:
        raise ValueError(f"{name} is an empty pytree; expected at least one array leaf")
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name} must have real floating-point leaves, got a leaf with dtype {dtype} "
                f"(shape {_shape(leaf)}); cast with .astype(jnp.float32) or float64"
            )


def check_same_structure(
    x: PyTree, y: PyTree, name_x: str, name_y: str, *, check_dtypes: bool = True
) -> None:
    """Raise ``ValueError`` unless ``x`` and ``y`` have the same structure and shapes.

    Dtypes must match too unless ``check_dtypes=False``.
    """
    sx, sy = jax.tree.structure(x), jax.tree.structure(y)
    if sx != sy:
        raise ValueError(f"{name_x} and {name_y} have different pytree structures: {sx} vs {sy}")
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        if _shape(a) != _shape(b) or (check_dtypes and a.dtype != b.dtype):
            raise ValueError(
                f"{name_x} and {name_y} have mismatched leaves: "
                f"{_shape(a)}/{a.dtype} vs {_shape(b)}/{b.dtype}"
            )


def check_operator(matvec: Callable, like: PyTree, params: tuple, name: str = "matvec") -> Callable:
    """Check statically that ``matvec(like, *params)`` returns a tree shaped like ``like``.

    Returns a matvec whose output is cast to the dtypes of ``like`` (outputs follow the
    input dtype even when the operator holds higher-precision data).
    """
    if not callable(matvec):
        raise TypeError(f"{name} must be callable as {name}(v, *params), got {type(matvec)}")
    try:
        out = jax.eval_shape(matvec, like, *params)
    except Exception as e:  # re-raised with the vector structure the operator was given
        raise TypeError(
            f"{name}(v, *params) failed for v with structure {jax.tree.structure(like)} and "
            f"shapes {[_shape(x) for x in jax.tree.leaves(like)]}: {e}"
        ) from e
    check_same_structure(out, like, f"{name}(v) output", "v", check_dtypes=False)

    def cast_matvec(v, *p):
        return jax.tree.map(lambda o, ref: o.astype(ref.dtype), matvec(v, *p), like)

    return cast_matvec


def check_positive_int(value: Any, name: str, *, minimum: int = 1) -> int:
    """Return ``value`` as an int, raising if it is not a static integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name}={value!r} must be a Python int (a static size), got {type(value)}")
    if value < minimum:
        raise ValueError(f"{name}={value} must be >= {minimum}")
    return int(value)


def check_positive_scalar(value: Any, name: str) -> None:
    """Raise unless a concrete real scalar ``value`` is finite and > 0.

    Traced values (a damping computed under ``jit``) cannot be inspected and pass through
    unchecked; everything known at call time is checked eagerly.
    """
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    real = np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    if isinstance(value, bool) or arr.shape != () or not real:
        raise TypeError(f"{name}={value!r} must be a real scalar")
    if not (np.isfinite(arr) and arr > 0):
        raise ValueError(f"{name}={value!r} must be a finite number > 0")
