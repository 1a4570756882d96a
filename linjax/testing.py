"""Public test helpers: dense oracles, matrices with a prescribed spectrum, tree comparisons.

Used by linjax's own tests and meant for users who test code built on linjax.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

from linjax import _tree


def materialize(matvec: Callable[..., Any], like: Any, *params: Any) -> jax.Array:
    """The dense ``[n, n]`` matrix of a pytree operator, in raveled coordinates.

    Column ``j`` is ``ravel(matvec(e_j, *params))``, computed by one vmapped matvec over the
    identity; use for small ``n`` only.

    Args:
        matvec: ``matvec(v, *params)``.
        like: pytree giving the vector structure.
        *params: operator data.

    Returns:
        ``[n, n]`` array ``A`` with ``ravel(matvec(v)) == A @ ravel(v)``.
    """
    flat, unravel = _tree.ravel(jax.tree.map(jnp.zeros_like, like))
    eye = jnp.eye(flat.size, dtype=flat.dtype)

    def column(e):
        return _tree.ravel(matvec(unravel(e), *params))[0]

    return jax.vmap(column, out_axes=1)(eye)


def spd_from_spectrum(key: jax.Array, eigvals: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
    """A symmetric matrix ``Q diag(eigvals) Q^T`` with a Haar-random orthogonal ``Q``.

    Args:
        key: PRNG key.
        eigvals: ``[n]`` prescribed eigenvalues (any sign; positive gives SPD).

    Returns:
        ``(A, Q)`` with ``A`` ``[n, n]`` exactly symmetric and the eigenvectors in the
        columns of ``Q``.
    """
    eigvals = jnp.asarray(eigvals)
    n = eigvals.shape[0]
    g = jr.normal(key, (n, n), eigvals.dtype)
    q, r = jnp.linalg.qr(g)
    q = q * jnp.sign(jnp.diag(r))[None, :]  # Haar measure (Mezzadri 2007)
    a = (q * eigvals[None, :]) @ q.T
    return 0.5 * (a + a.T), q


def rel_err(actual: Any, expected: Any) -> jax.Array:
    """``||actual - expected|| / ||expected||`` over whole pytrees (Euclidean norms)."""
    diff = _tree.tree_norm(jax.tree.map(jnp.subtract, actual, expected))
    return diff / _tree.tree_norm(expected)


def assert_trees_close(
    actual: Any, expected: Any, *, rtol: float = 1e-6, atol: float = 0.0
) -> None:
    """Assert two pytrees have the same structure and leaves close elementwise."""
    sa, se = jax.tree.structure(actual), jax.tree.structure(expected)
    if sa != se:
        raise AssertionError(f"tree structures differ: {sa} vs {se}")
    pairs = zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True)
    for i, (a, e) in enumerate(pairs):
        np.testing.assert_allclose(
            np.asarray(a), np.asarray(e), rtol=rtol, atol=atol, err_msg=f"leaf {i}"
        )


def assert_no_retrace(fn: Callable[..., Any], *calls: Sequence[Any], **jit_kwargs: Any) -> list:
    """Assert ``jax.jit(fn)`` traces once for several argument tuples of the same shapes.

    Args:
        fn: the (un-jitted) function under test.
        *calls: argument tuples, each passed as ``fn(*args)``; at least two.
        **jit_kwargs: forwarded to ``jax.jit`` (e.g. ``static_argnames``).

    Returns:
        The outputs of the calls.

    Raises:
        AssertionError: if ``fn`` was traced more than once.
    """
    if len(calls) < 2:
        raise ValueError(f"assert_no_retrace needs at least two calls, got {len(calls)}")
    traces = []

    def counted(*args):
        traces.append(None)
        return fn(*args)

    jitted = jax.jit(counted, **jit_kwargs)
    outs = [jax.block_until_ready(jitted(*args)) for args in calls]
    if len(traces) != 1:
        raise AssertionError(f"{getattr(fn, '__name__', fn)} was traced {len(traces)} times")
    return outs
