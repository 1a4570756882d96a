"""Symmetric Lanczos tridiagonalisation on pytrees, as one ``lax.scan``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
from jax import lax

from linjax import _tree

_REORTHO = ("full", "none")
_DGKS = 0.7071067811865476  # 1 / sqrt(2)


class LanczosResult(NamedTuple):
    r"""Outcome of :func:`lanczos`: $A Q^\top = Q^\top T + r e_k^\top$.

    Attributes:
        basis: $Q$, a pytree like ``v0`` whose leaves carry a leading axis ``num_steps``;
            its rows are orthonormal (to working precision with ``reortho="full"``).
        alphas: ``[num_steps]`` diagonal of the tridiagonal $T$.
        betas: ``[num_steps - 1]`` off-diagonal of $T$. A zero marks a breakdown: an
            invariant subspace was found and the iteration continued from a fresh vector
            orthogonal to the basis, so $T$ is block diagonal there.
        residual: $r = \beta_k q_{k+1}$, a pytree like ``v0``; its norm bounds how far the
            Ritz pairs are from eigenpairs of $A$.
    """

    basis: Any
    alphas: jax.Array
    betas: jax.Array
    residual: Any


def lanczos(
    matvec: Callable[..., Any],
    v0: Any,
    num_steps: int,
    *params: Any,
    reortho: str = "full",
) -> LanczosResult:
    r"""Run ``num_steps`` steps of the symmetric Lanczos process from ``v0``.

    With $q_1 = v_0 / \|v_0\|$ it builds an orthonormal basis $Q = [q_1, \dots, q_k]$ of the
    Krylov space $\mathcal K_k(A, v_0)$ and the tridiagonal $T = Q A Q^\top$ through
    $w = A q_j - \beta_{j-1} q_{j-1}$, $\alpha_j = q_j^\top w$,
    $w \leftarrow w - \alpha_j q_j$, $\beta_j = \|w\|$, $q_{j+1} = w / \beta_j$.

    With ``reortho="full"`` every new vector is orthogonalised against the whole basis
    twice ("twice is enough"), each pass one block GEMV pair $w \leftarrow w - Q^\top (Q w)$
    per leaf, so the basis stays orthonormal to working precision and no ghost copies of
    converged eigenvalues appear. If $\beta_j$ falls to round-off level (an invariant
    subspace, e.g. a start vector in the span of few eigenvectors) the process records
    $\beta_j = 0$ and continues from a pseudo-random vector orthogonal to the basis instead
    of dividing by zero.

    The loop is a ``lax.scan`` over a preallocated basis, so compile time does not grow
    with ``num_steps``; vectors stay pytrees throughout (no ``ravel_pytree``), so sharded
    leaves stay sharded.

    Args:
        matvec: ``matvec(v, *params)``, a symmetric linear operator on pytrees like ``v0``.
        v0: start vector (any nonzero pytree of real floating arrays; a zero vector is
            replaced by a pseudo-random one).
        num_steps: number of Lanczos steps ``k``, ``1 <= k <= n`` (``n`` = size of ``v0``).
        *params: operator data passed to ``matvec``.
        reortho: ``"full"`` (default) or ``"none"`` (plain three-term recurrence; cheaper,
            but orthogonality is lost as Ritz values converge).

    Returns:
        :class:`LanczosResult` ``(basis, alphas, betas, residual)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import lintools as lt
        >>> A = jnp.diag(jnp.arange(1.0, 6.0))
        >>> res = lt.lanczos(lt.dense(A), jnp.ones(5), 5)
        >>> res.alphas.shape, res.betas.shape
        ((5,), (4,))

    References:
        Lanczos (1950). Paige (1976). Parlett, "The Symmetric Eigenvalue Problem" (1998).
        Giraud et al. (2005), "Rounding error analysis of the classical Gram-Schmidt
        orthogonalization process" (twice is enough).
    """
    _tree.check_floating(v0, "v0")
    num_steps = _tree.check_positive_int(num_steps, "num_steps")
    n = _tree.tree_size(v0)
    if num_steps > n:
        raise ValueError(f"{num_steps=} must be <= the dimension of v0 ({n})")
    if reortho not in _REORTHO:
        raise ValueError(f"{reortho=} must be one of {_REORTHO}")
    op = _tree.check_operator(matvec, v0, params)
    full = reortho == "full"
    dtype = _tree.tree_dtype(v0)
    eps = jnp.finfo(dtype).eps
    restart_key = jr.key(20260101)

    def reorthogonalise(basis, w):
        return _tree.tree_axpy(-1.0, _tree.stacked_combine(_tree.stacked_dot(basis, w), basis), w)

    def random_unit(basis, j):
        # Fresh direction after a breakdown (or for a zero v0): Gaussian, then orthogonalised.
        r = _tree.tree_random_like(jr.fold_in(restart_key, j), v0)
        if full:
            r = reorthogonalise(basis, reorthogonalise(basis, r))
        return _tree.tree_scale(1 / _tree.tree_norm(r), r)

    basis = jax.tree.map(lambda x: jnp.zeros((num_steps,) + x.shape, x.dtype), v0)
    v0_norm = _tree.tree_norm(v0)
    q = lax.cond(
        v0_norm > 0,
        lambda: _tree.tree_scale(1 / jnp.where(v0_norm > 0, v0_norm, 1), v0),
        lambda: random_unit(basis, num_steps),
    )
    zero = jnp.zeros((), dtype)

    def step(carry, j):
        basis, q, q_prev, beta_prev, anorm = carry
        basis = jax.tree.map(lambda b, x: b.at[j].set(x), basis, q)
        w = op(q, *params)
        alpha = _tree.tree_dot(q, w)
        w = _tree.tree_axpy(-alpha, q, _tree.tree_axpy(-beta_prev, q_prev, w))
        if full:
            # One classical Gram-Schmidt pass, and a second only if the first cancelled much
            # of w (Kahan-Parlett "twice is enough" criterion, as in ARPACK's DGKS step).
            w_norm = _tree.tree_norm(w)
            w = reorthogonalise(basis, w)
            w = lax.cond(
                _tree.tree_norm(w) < _DGKS * w_norm,
                lambda: reorthogonalise(basis, w),
                lambda: w,
            )
        # |alpha| + beta_prev + ||w|| bounds a row of T, hence gives a running scale of ||A||.
        anorm = jnp.maximum(anorm, jnp.abs(alpha) + beta_prev + _tree.tree_norm(w))
        breakdown = _tree.tree_norm(w) <= eps * anorm
        w = lax.cond(breakdown, lambda: random_unit(basis, j), lambda: w)
        beta = _tree.tree_norm(w)
        safe_beta = jnp.where(beta > 0, beta, 1)
        q_next = _tree.tree_scale(1 / safe_beta, w)
        beta = jnp.where(breakdown, zero, beta)
        return (basis, q_next, q, beta, anorm), (alpha, beta)

    init = (basis, q, _tree.tree_zeros_like(v0), zero, zero)
    (basis, q_last, *_), (alphas, betas) = lax.scan(step, init, jnp.arange(num_steps))
    # r = beta_k q_{k+1}; zero after a breakdown at the last step, since beta_k = 0 there.
    residual = _tree.tree_scale(betas[-1], q_last)
    return LanczosResult(basis, alphas, betas[:-1], residual)


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """The dense symmetric tridiagonal matrix with diagonal ``alphas``, off-diagonal ``betas``.

    Built in float64 when x64 is enabled (small dense algebra runs in the widest dtype).
    """
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    a, b = alphas.astype(dtype), betas.astype(dtype)
    return jnp.diag(a) + jnp.diag(b, 1) + jnp.diag(b, -1)
