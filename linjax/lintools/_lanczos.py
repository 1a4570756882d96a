"""Symmetric Lanczos tridiagonalisation on pytrees, as one ``lax.scan``."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
from jax import lax

from linjax import _tree

_REORTHO = ("full", "partial", "none")
_DGKS = 0.7071067811865476  # 1 / sqrt(2)


class LanczosResult(NamedTuple):
    r"""Outcome of :func:`lanczos`: $A Q^\top = Q^\top T + r e_k^\top$.

    Attributes:
        basis: $Q$, a pytree like ``v0`` whose leaves carry a leading axis ``num_steps``;
            its rows are orthonormal to working precision with ``reortho="full"``, to
            $\sqrt{\varepsilon}$ with ``reortho="partial"``.
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

    In floating point the three-term recurrence alone loses orthogonality as soon as a Ritz
    value converges, and ghost copies of converged eigenvalues appear in $T$.
    ``reortho`` picks the remedy:

    * ``"full"``: every new vector is orthogonalised against the whole basis by classical
      Gram-Schmidt, one block GEMV pair $w \leftarrow w - Q^\top (Q w)$ per leaf, with a
      second pass only when the first cancels much of $w$ ("twice is enough", the DGKS
      test). $Q$ stays orthonormal to working precision; each step costs $O(k n)$ on top
      of the matvec.
    * ``"partial"``: Simon's partial reorthogonalisation. The loss of orthogonality
      $\omega_{j,i} \approx q_j^\top q_i$ is *estimated*, at $O(k)$ scalar cost per step,
      by Paige's recurrence
      $\beta_j \omega_{j+1,i} = \beta_i \omega_{j,i+1} + (\alpha_i - \alpha_j)\omega_{j,i}
      + \beta_{i-1}\omega_{j,i-1} - \beta_{j-1}\omega_{j-1,i} \pm \epsilon_1 \|A\|$
      (the rounding term with the sign that increases $|\omega|$, and
      $\epsilon_1 = \sqrt n\,\varepsilon/2$, so the estimate errs on the safe side). Only
      when $\max_i |\omega_{j+1,i}|$ exceeds $\sqrt{\varepsilon}$ is $w$ orthogonalised
      against the basis as in ``"full"``, and so is the next vector (the three-term
      recurrence would otherwise copy the loss in $q_j$ into $q_{j+2}$); both estimates
      are then reset to $\epsilon_1$. The reorthogonalisation sits under ``lax.cond``, so
      steps that do not need it skip its $O(kn)$ work; on a benign spectrum that is most
      steps. This keeps the basis *semiorthogonal*, $|q_j^\top q_i| \lesssim
      \sqrt{\varepsilon}$ for $i \ne j$ (about ``1.5e-8`` in float64), not orthonormal.
      Simon (1984) proves that semiorthogonality suffices for $T$ to be, to working
      precision, the projection of $A$ onto the Krylov space: $T = N^\top A N +
      O(\varepsilon \|A\|)$ with $N$ an orthonormal basis of $\operatorname{span}(Q)$
      (the tests check $\|N^\top A N - T\|_{\max} \le 10^{-13} \|A\|$ on clustered,
      geometric and well-separated spectra).
      The Ritz values (eigenvalues of $T$) are therefore as accurate as with ``"full"``
      and free of ghosts. What is weaker: $Q$ itself is orthonormal only to
      $\sqrt{\varepsilon}$ (Ritz vectors $Q^\top s$ have unit norm to about that, so
      normalise them), and on the steps that reorthogonalised, the dropped Gram-Schmidt
      coefficients (of size $\sqrt{\varepsilon}\beta_j$) make
      $A Q^\top = Q^\top T + r e_k^\top$ hold to $O(\sqrt{\varepsilon}\|A\|)$ rather than
      round-off in those columns. Under ``vmap`` with a batched operator or start vector
      the ``lax.cond`` predicates become batched and JAX turns them into ``select``: both
      branches run every step, so ``"partial"`` then costs as much as ``"full"`` (but is
      still correct).
    * ``"none"``: the plain three-term recurrence; cheapest, but orthogonality is lost as
      Ritz values converge (fine for Gauss quadrature, not for eigenvectors).

    If $\beta_j$ falls to round-off level (an invariant subspace, e.g. a start vector in the
    span of few eigenvectors) the process records $\beta_j = 0$ and continues from a
    pseudo-random vector orthogonal to the basis instead of dividing by zero.

    The loop is a ``lax.scan`` over a preallocated basis, so compile time does not grow
    with ``num_steps``; vectors stay pytrees throughout (no ``ravel_pytree``), so sharded
    leaves stay sharded.

    Args:
        matvec: ``matvec(v, *params)``, a symmetric linear operator on pytrees like ``v0``.
        v0: start vector (any nonzero pytree of real floating arrays; a zero vector is
            replaced by a pseudo-random one).
        num_steps: number of Lanczos steps ``k``, ``1 <= k <= n`` (``n`` = size of ``v0``).
        *params: operator data passed to ``matvec``.
        reortho: ``"full"`` (default), ``"partial"`` or ``"none"``, see above.

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
        orthogonalization process" (twice is enough). H. D. Simon (1984), "The Lanczos
        algorithm with partial reorthogonalization", Math. Comp. 42(165); Larsen (1998),
        PROPACK.
    """
    return _lanczos(matvec, v0, num_steps, *params, reortho=reortho)[0]


def _lanczos(
    matvec: Callable[..., Any], v0: Any, num_steps: int, *params: Any, reortho: str
) -> tuple[LanczosResult, jax.Array]:
    """:func:`lanczos`, plus the number of steps that reorthogonalised against the basis."""
    _tree.check_floating(v0, "v0")
    num_steps = _tree.check_positive_int(num_steps, "num_steps")
    n = _tree.tree_size(v0)
    if num_steps > n:
        raise ValueError(f"{num_steps=} must be <= the dimension of v0 ({n})")
    if reortho not in _REORTHO:
        raise ValueError(f"{reortho=} must be one of {_REORTHO}")
    op = _tree.check_operator(matvec, v0, params)
    full, partial = reortho == "full", reortho == "partial"
    dtype = _tree.tree_dtype(v0)
    eps = float(jnp.finfo(dtype).eps)
    # Partial reorthogonalisation: threshold of semiorthogonality, and the per-step rounding
    # contribution fl(A q) - A q ~ eps1 ||A|| (the rule of thumb of SLEPc's partial Lanczos).
    delta = math.sqrt(eps)
    eps1 = math.sqrt(n) * eps / 2
    restart_key = jr.key(20260101)

    def reorthogonalise(basis, w):
        return _tree.tree_axpy(-1.0, _tree.stacked_combine(_tree.stacked_dot(basis, w), basis), w)

    def reorthogonalise_dgks(basis, w):
        # One classical Gram-Schmidt pass, and a second only if the first cancelled much of w
        # (Kahan-Parlett "twice is enough" criterion, as in ARPACK's DGKS step).
        w_norm = _tree.tree_norm(w)
        w = reorthogonalise(basis, w)
        return lax.cond(
            _tree.tree_norm(w) < _DGKS * w_norm,
            lambda: reorthogonalise(basis, w),
            lambda: w,
        )

    def random_unit(basis, j):
        # Fresh direction after a breakdown (or for a zero v0): Gaussian, then orthogonalised.
        r = _tree.tree_random_like(jr.fold_in(restart_key, j), v0)
        if full or partial:
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
    idx = jnp.arange(num_steps + 1)

    def omega_update(omega, omega_prev, alphas, betas, j, beta_prev, beta, anorm):
        # Row j+1 of the estimates from rows j and j-1 (entries i <= j; omega[j] = 1), all i
        # at once; alphas[:j+1] and betas[:j] are known. Returns [num_steps + 1].
        a, b = jnp.append(alphas, zero), jnp.append(betas, zero)
        up = jnp.append(omega[1:], zero)  # omega_{j, i+1}
        down = jnp.concatenate([zero[None], omega[:-1]])  # omega_{j, i-1}
        b_down = jnp.concatenate([zero[None], b[:-1]])  # beta_{i-1}
        t = b * up + (a - alphas[j]) * omega + b_down * down - beta_prev * omega_prev
        noise = eps1 * anorm
        inv_beta = 1 / jnp.where(beta > 0, beta, 1)
        t = (t + jnp.where(t >= 0, noise, -noise)) * inv_beta
        out = jnp.where(idx < j, t, zero)
        out = jnp.where(idx == j, noise * inv_beta, out)  # local: q_{j+1}^T q_j
        return jnp.where(idx == j + 1, 1, out)

    def reset(j):
        # Estimates of a vector just orthogonalised against q_1..q_j.
        return jnp.where(idx <= j, eps1, jnp.where(idx == j + 1, 1, zero)).astype(dtype)

    def step(carry, j):
        basis, q, q_prev, beta_prev, anorm, alphas, betas, omega, omega_prev, force, count = carry
        basis = jax.tree.map(lambda b, x: b.at[j].set(x), basis, q)
        w = _tree.tree_axpy(-beta_prev, q_prev, op(q, *params))
        # alpha from w after removing the beta q_prev part (Paige's stable ordering), so that
        # q^T w ~ 0 to round-off and the local orthogonality q_{j+1}^T q_j stays at eps.
        alpha = _tree.tree_dot(q, w)
        w = _tree.tree_axpy(-alpha, q, w)
        alphas = alphas.at[j].set(alpha)
        if full:
            w = reorthogonalise_dgks(basis, w)
            count = count + 1
        elif partial:
            beta_raw = _tree.tree_norm(w)
            anorm = jnp.maximum(anorm, jnp.abs(alpha) + beta_prev + beta_raw)
            new = omega_update(omega, omega_prev, alphas, betas, j, beta_prev, beta_raw, anorm)
            # "not <=" so that a NaN estimate (beta_raw = 0) reorthogonalises too.
            lost = ~(jnp.max(jnp.where(idx <= j, jnp.abs(new), 0)) <= delta)
            do = lost | force
            w = lax.cond(do, lambda: reorthogonalise_dgks(basis, w), lambda: w)
            new = jnp.where(do, reset(j), new)
            # Reorthogonalise the vector after a triggered one as well (Simon), then stop.
            force = do & ~force
            count = count + do
            omega_prev, omega = omega, new
        # |alpha| + beta_prev + ||w|| bounds a row of T, hence gives a running scale of ||A||.
        anorm = jnp.maximum(anorm, jnp.abs(alpha) + beta_prev + _tree.tree_norm(w))
        breakdown = _tree.tree_norm(w) <= eps * anorm
        w = lax.cond(breakdown, lambda: random_unit(basis, j), lambda: w)
        if partial:
            omega = jnp.where(breakdown, reset(j), omega)
        beta = _tree.tree_norm(w)
        safe_beta = jnp.where(beta > 0, beta, 1)
        q_next = _tree.tree_scale(1 / safe_beta, w)
        beta = jnp.where(breakdown, zero, beta)
        betas = betas.at[j].set(beta)
        carry = (basis, q_next, q, beta, anorm, alphas, betas, omega, omega_prev, force, count)
        return carry, None

    omega0 = jnp.zeros(num_steps + 1, dtype).at[0].set(1)
    init = (
        basis,
        q,
        _tree.tree_zeros_like(v0),
        zero,
        zero,
        jnp.zeros(num_steps, dtype),
        jnp.zeros(num_steps, dtype),
        omega0,
        jnp.zeros(num_steps + 1, dtype),
        jnp.zeros((), bool),
        jnp.zeros((), jnp.int32),
    )
    carry, _ = lax.scan(step, init, jnp.arange(num_steps))
    basis, q_last, *_, alphas, betas, _, _, _, count = carry
    # r = beta_k q_{k+1}; zero after a breakdown at the last step, since beta_k = 0 there.
    residual = _tree.tree_scale(betas[-1], q_last)
    return LanczosResult(basis, alphas, betas[:-1], residual), count


def tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """The dense symmetric tridiagonal matrix with diagonal ``alphas``, off-diagonal ``betas``.

    Built in float64 when x64 is enabled (small dense algebra runs in the widest dtype).
    """
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    a, b = alphas.astype(dtype), betas.astype(dtype)
    return jnp.diag(a) + jnp.diag(b, 1) + jnp.diag(b, -1)
