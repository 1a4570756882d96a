"""Extreme eigenpairs of a symmetric operator from Lanczos Ritz pairs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from linjax import _tree
from linjax.lintools._lanczos import lanczos, tridiagonal

_WHICH = ("largest", "smallest")


def eigsh(
    matvec: Callable[..., Any],
    like: Any,
    k: int,
    *params: Any,
    key: jax.Array,
    num_steps: int | None = None,
    which: str = "largest",
) -> tuple[jax.Array, Any]:
    r"""The ``k`` largest (or smallest) eigenpairs of a symmetric operator.

    Runs :func:`lanczos` with full reorthogonalisation from a Gaussian start vector, solves
    the small tridiagonal eigenproblem $T = S \Theta S^\top$ densely (float64 when x64 is
    enabled) and returns the extreme Ritz values $\theta_i$ with Ritz vectors
    $u_i = Q^\top s_i$, assembled leaf by leaf as pytrees. Extreme, well-separated
    eigenvalues converge first; the Ritz residual is $\|A u_i - \theta_i u_i\| =
    \beta_k |s_{k,i}|$, so raise ``num_steps`` until that is small enough for you.

    Args:
        matvec: ``matvec(v, *params)``, symmetric.
        like: a pytree (arrays or ``ShapeDtypeStruct``) giving the vector structure, shapes
            and dtype.
        k: number of eigenpairs, ``1 <= k <= n``.
        *params: operator data passed to ``matvec``.
        key: PRNG key for the start vector.
        num_steps: Lanczos steps (matvecs), ``k <= num_steps <= n``; default
            ``min(n, 2 k + 40)``.
        which: ``"largest"`` (descending order) or ``"smallest"`` (ascending order).

    Returns:
        ``(eigvals [k], eigvecs)``, ``eigvecs`` a pytree like ``like`` with leading axis ``k``
        holding unit-norm vectors.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import lintools as lt
        >>> A = jnp.diag(jnp.arange(1.0, 11.0))
        >>> vals, vecs = lt.eigsh(lt.dense(A), jnp.zeros(10), 2, key=jax.random.key(0))
        >>> vals.round(3)
        Array([10.,  9.], dtype=float32)

    References:
        Golub, Van Loan, "Matrix Computations", 4th ed., §10.1. Parlett (1998), ch. 13.
    """
    _tree.check_floating(like, "like")
    n = _tree.tree_size(like)
    k = _tree.check_positive_int(k, "k")
    if k > n:
        raise ValueError(f"{k=} must be <= the dimension of the operator ({n})")
    if which not in _WHICH:
        raise ValueError(f"{which=} must be one of {_WHICH}")
    if num_steps is None:
        num_steps = min(n, 2 * k + 40)
    num_steps = _tree.check_positive_int(num_steps, "num_steps")
    if not k <= num_steps <= n:
        raise ValueError(f"{num_steps=} must satisfy k={k} <= num_steps <= n={n}")

    v0 = _tree.tree_random_like(key, jax.tree.map(_as_struct, like))
    res = lanczos(matvec, v0, num_steps, *params, reortho="full")
    theta, s = jnp.linalg.eigh(tridiagonal(res.alphas, res.betas))
    idx = jnp.arange(num_steps - 1, num_steps - 1 - k, -1) if which == "largest" else jnp.arange(k)
    eigvals = theta[idx].astype(res.alphas.dtype)
    eigvecs = _tree.stacked_combine(s[:, idx].T, res.basis)
    return eigvals, eigvecs


def _as_struct(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype)
