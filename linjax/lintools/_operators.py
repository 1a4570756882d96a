"""Linear operators as plain functions ``matvec(v, *params) -> pytree``.

An operator is any function linear in its first argument (matfree's contract).
Differentiable data travels in ``*params`` rather than in closures, so solvers and
estimators can differentiate with respect to it. The combinators here return new matvecs
that forward the same ``*params`` to every operator they wrap.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from linjax import _tree

MatVec = Callable[..., Any]


def dense(matrix: jax.typing.ArrayLike, like: Any = None) -> MatVec:
    r"""Wrap a dense matrix as a matvec.

    Computes $v \mapsto A v$ with ``HIGHEST`` matmul precision. Without ``like`` the operator
    acts on 1-D arrays of length ``n``; with ``like`` (a pytree with ``n`` scalars in total)
    it acts on pytrees of that structure by raveling them, which is how tests compare
    pytree results with flat ones.

    Args:
        matrix: ``[n, n]`` array.
        like: optional pytree (arrays or ``ShapeDtypeStruct``) fixing the vector structure.

    Returns:
        ``matvec(v) -> A v``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import lintools as lt
        >>> lt.dense(jnp.diag(jnp.array([1.0, 2.0])))(jnp.ones(2))
        Array([1., 2.], dtype=float32)
    """
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"matrix must be square [n, n], got shape {matrix.shape}")
    if like is None:

        def matvec(v):
            return jnp.matmul(matrix, v, precision=lax.Precision.HIGHEST)

        return matvec
    size = _tree.tree_size(like)
    if size != matrix.shape[0]:
        raise ValueError(f"like has {size} scalars but matrix is {matrix.shape}")

    def tree_matvec(v):
        flat, unravel = _tree.ravel(v)
        return unravel(jnp.matmul(matrix, flat, precision=lax.Precision.HIGHEST).astype(flat.dtype))

    return tree_matvec


def damped(matvec: MatVec, damping: jax.typing.ArrayLike) -> MatVec:
    r"""Add a multiple of the identity: $v \mapsto A v + \lambda v$.

    Args:
        matvec: ``matvec(v, *params)``.
        damping: $\lambda$, a scalar (may be traced).

    Returns:
        ``matvec(v, *params) -> A(params) v + damping * v``.
    """
    _check_callable(matvec, "matvec")

    def damped_matvec(v, *params):
        return _tree.tree_axpy(damping, v, matvec(v, *params))

    return damped_matvec


def add(*matvecs: MatVec) -> MatVec:
    r"""Sum of operators: $v \mapsto \sum_i A_i v$; ``*params`` go to every term."""
    if not matvecs:
        raise ValueError("add() needs at least one matvec")
    for i, mv in enumerate(matvecs):
        _check_callable(mv, f"matvecs[{i}]")

    def sum_matvec(v, *params):
        out = matvecs[0](v, *params)
        for mv in matvecs[1:]:
            out = _tree.tree_add(out, mv(v, *params))
        return out

    return sum_matvec


def scale(matvec: MatVec, factor: jax.typing.ArrayLike) -> MatVec:
    r"""Scaled operator: $v \mapsto c\,A v$."""
    _check_callable(matvec, "matvec")

    def scaled_matvec(v, *params):
        return _tree.tree_scale(factor, matvec(v, *params))

    return scaled_matvec


def compose(*matvecs: MatVec) -> MatVec:
    r"""Product of operators, applied right to left: ``compose(A, B)(v) = A(B(v))``.

    ``*params`` go to every factor.
    """
    if not matvecs:
        raise ValueError("compose() needs at least one matvec")
    for i, mv in enumerate(matvecs):
        _check_callable(mv, f"matvecs[{i}]")

    def composed_matvec(v, *params):
        for mv in reversed(matvecs):
            v = mv(v, *params)
        return v

    return composed_matvec


def _check_callable(fn: Any, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be a function matvec(v, *params), got {type(fn).__name__}")
