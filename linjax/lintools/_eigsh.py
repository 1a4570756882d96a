"""Extreme eigenpairs of a symmetric operator from Lanczos Ritz pairs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from linjax import _tree
from linjax.lintools._lanczos import lanczos, tridiagonal

_WHICH = ("largest", "smallest")
_REORTHO = ("partial", "full")


def eigsh(
    matvec: Callable[..., Any],
    like: Any,
    k: int,
    *params: Any,
    key: jax.Array,
    num_steps: int | None = None,
    which: str = "largest",
    reortho: str = "partial",
) -> tuple[jax.Array, Any]:
    r"""The ``k`` largest (or smallest) eigenpairs of a symmetric operator.

    Runs :func:`lanczos` from a Gaussian start vector, solves the small tridiagonal
    eigenproblem $T = S \Theta S^\top$ densely (float64 when x64 is enabled) and returns the
    extreme Ritz values $\theta_i$ with Ritz vectors $u_i = Q^\top s_i / \|Q^\top s_i\|$,
    assembled leaf by leaf as pytrees. Extreme, well-separated eigenvalues converge first;
    the Ritz residual is $\|A u_i - \theta_i u_i\| \approx \beta_k |s_{k,i}|$, so raise
    ``num_steps`` until that is small enough for you.

    The default ``reortho="partial"`` reorthogonalises only on the steps where the
    estimated loss of orthogonality reaches $\sqrt{\varepsilon}$ (see :func:`lanczos`):
    the eigenvalues are as accurate as with ``"full"`` (Simon's theorem), at a fraction of
    its $O(\text{num\_steps}^2 n)$ Gram-Schmidt work. ``"full"`` reorthogonalises every
    step; prefer it under ``vmap`` over batched operators or start vectors, where the
    skipped work of ``"partial"`` is done anyway, or when you need a basis orthonormal to
    working precision.

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
        reortho: ``"partial"`` (default) or ``"full"``, passed to :func:`lanczos`.

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
    if reortho not in _REORTHO:
        raise ValueError(f"{reortho=} must be one of {_REORTHO}")
    if num_steps is None:
        num_steps = min(n, 2 * k + 40)
    num_steps = _tree.check_positive_int(num_steps, "num_steps")
    if not k <= num_steps <= n:
        raise ValueError(f"{num_steps=} must satisfy k={k} <= num_steps <= n={n}")

    v0 = _tree.tree_random_like(key, jax.tree.map(_as_struct, like))
    res = lanczos(matvec, v0, num_steps, *params, reortho=reortho)
    theta, s = jnp.linalg.eigh(tridiagonal(res.alphas, res.betas))
    idx = jnp.arange(num_steps - 1, num_steps - 1 - k, -1) if which == "largest" else jnp.arange(k)
    eigvals = theta[idx].astype(res.alphas.dtype)
    eigvecs = _tree.stacked_combine(s[:, idx].T, res.basis)
    # Unit norm to round-off even when the basis is only semiorthogonal ("partial").
    sq = [
        jnp.sum(x.reshape(k, -1).astype(jnp.promote_types(x.dtype, jnp.float32)) ** 2, axis=1)
        for x in jax.tree.leaves(eigvecs)
    ]
    norms = jnp.sqrt(sum(sq[1:], sq[0]))
    eigvecs = jax.tree.map(
        lambda x: (x / norms.reshape((k,) + (1,) * (x.ndim - 1))).astype(x.dtype), eigvecs
    )
    return eigvals, eigvecs


def _as_struct(x: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(jnp.shape(x), x.dtype)
