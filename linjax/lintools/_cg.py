"""Preconditioned conjugate gradients on pytrees, differentiable by implicit solves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from linjax import _tree

# Recompute r = b - A x from scratch this often: the recursive residual drifts from the
# true one in finite precision (lineax's `stabilise_every`, painless-CG B.2). The iterate is
# kept as x = x_base + dx with the replacement folding dx into x_base ("group update",
# van der Vorst & Ye 2000): replacing r alone, against an x that carries every small update's
# rounding, stalls ill-conditioned solves a decade or more above the attainable accuracy.
_STABILISE_EVERY = 10


class CGResult(NamedTuple):
    """Outcome of :func:`cg`.

    Attributes:
        x: the approximate solution, a pytree like ``b``.
        residual_norm: ``||r||_2`` at the last step, with ``r`` the recursively updated
            residual, replaced by the true ``b - A x`` every 10 steps.
        num_steps: number of CG iterations taken (int32 scalar).
        converged: whether ``residual_norm <= rtol * ||b|| + atol``. ``False`` also when
            non-positive curvature ``p^T A p <= 0`` (or an indefinite preconditioner) was
            met: the iteration then stops and ``x`` is the last iterate before it.
    """

    x: Any
    residual_norm: jax.Array
    num_steps: jax.Array
    converged: jax.Array


def cg(
    matvec: Callable[..., Any],
    b: Any,
    *params: Any,
    x0: Any = None,
    rtol: float = 1e-6,
    atol: float = 0.0,
    max_steps: int | None = None,
    precond: Callable[[Any], Any] | None = None,
) -> CGResult:
    r"""Solve $A x = b$ for symmetric positive definite $A$ by preconditioned CG.

    Iterates $\alpha = r^\top z / p^\top A p$, $x \leftarrow x + \alpha p$,
    $r \leftarrow r - \alpha A p$, $z = P r$, $p \leftarrow z + (r_+^\top z_+ / r^\top z) p$
    until $\|r\|_2 \le \mathrm{rtol}\,\|b\|_2 + \mathrm{atol}$. The true residual
    $b - A x$ is recomputed every 10 steps, so the stopping test does not trust a drifted
    recursion. If $p^\top A p \le 0$ the operator is not positive definite along $p$: the
    solver stops there with ``converged=False`` instead of stepping to a meaningless point
    (the Steihaug exit).

    The solve is wrapped in ``lax.custom_linear_solve``: gradients (and JVPs) with respect
    to ``b`` and to ``*params`` come from a second CG solve with the same tolerances, not from
    differentiating through the iterations, and the solver works under ``jit`` and
    ``vmap`` (a batch of right-hand sides runs until all have converged).

    Args:
        matvec: ``matvec(v, *params)``, linear in ``v`` and symmetric positive definite.
        b: right-hand side, a pytree of floating arrays.
        *params: differentiable operator data passed to ``matvec``.
        x0: initial guess shaped like ``b`` (default zeros).
        rtol: relative tolerance on the residual norm, >= 0.
        atol: absolute tolerance on the residual norm, >= 0.
        max_steps: iteration cap (default ``10 * n`` as in SciPy, ``n`` the size of ``b``).
        precond: ``precond(r) -> z``, a symmetric positive definite approximation of
            $A^{-1}$ (default identity).

    Returns:
        :class:`CGResult` ``(x, residual_norm, num_steps, converged)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import lintools as lt
        >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        >>> res = lt.cg(lt.dense(A), jnp.array([1.0, 2.0]), rtol=1e-6)
        >>> bool(res.converged), res.x.round(4)
        (True, Array([0.0909, 0.6364], dtype=float32))

    References:
        Hestenes, Stiefel (1952), "Methods of conjugate gradients for solving linear systems".
        Shewchuk (1994), "An introduction to the conjugate gradient method without the
        agonizing pain", B.2. Steihaug (1983), "The conjugate gradient method and trust
        regions in large scale optimization".
    """
    _tree.check_floating(b, "b")
    op = _tree.check_operator(matvec, b, params)
    if x0 is not None:
        _tree.check_same_structure(x0, b, "x0", "b")
    if not rtol >= 0:
        raise ValueError(f"{rtol=} must be >= 0")
    if not atol >= 0:
        raise ValueError(f"{atol=} must be >= 0")
    if max_steps is None:
        max_steps = 10 * _tree.tree_size(b)
    max_steps = _tree.check_positive_int(max_steps, "max_steps")
    if precond is not None and not callable(precond):
        raise TypeError(f"precond must be a function r -> z, got {type(precond).__name__}")

    def solve(mv, rhs, guess):
        return _pcg(mv, rhs, guess, rtol, atol, max_steps, precond)

    x, (residual_norm, num_steps, converged) = lax.custom_linear_solve(
        lambda v: op(v, *params),
        b,
        solve=lambda mv, rhs: solve(mv, rhs, x0),
        # The adjoint system has a different right-hand side: x0 is no help there.
        transpose_solve=lambda mv, rhs: solve(mv, rhs, None),
        symmetric=True,
        has_aux=True,
    )
    return CGResult(x, residual_norm, num_steps, converged)


def _pcg(matvec, b, x0, rtol, atol, max_steps, precond):
    """The CG iteration itself; returns ``(x, (residual_norm, num_steps, converged))``."""
    precond = precond if precond is not None else (lambda r: r)
    dtype = _tree.tree_dtype(b)
    b_norm = _tree.tree_norm(b)
    tol = jnp.asarray(rtol, dtype) * b_norm + jnp.asarray(atol, dtype)

    if x0 is None:
        x = _tree.tree_zeros_like(b)
        r = b
    else:
        x = x0
        r = _tree.tree_sub(b, matvec(x0))
    z = precond(r)
    rz = _tree.tree_dot(r, z)
    r_norm = _tree.tree_norm(r)
    # State: x_base, dx, r, p, rz, ||r||, step, healthy (no non-positive curvature met yet).
    # ||r|| is the true residual whenever it is <= tol: a recursive residual that reaches the
    # tolerance triggers a replacement, so the loop never stops on a drifted estimate.
    init = (
        x,
        _tree.tree_zeros_like(b),
        r,
        z,
        rz,
        r_norm,
        jnp.asarray(0, jnp.int32),
        jnp.asarray(True),
    )

    def cond(state):
        *_, r_norm, step, healthy = state
        return (r_norm > tol) & (step < max_steps) & healthy

    def body(state):
        x_base, dx, r, p, rz, _, step, _ = state
        Ap = matvec(p)
        pAp = _tree.tree_dot(p, Ap)
        # Non-positive curvature, or an indefinite preconditioner (r^T P r <= 0): stop and
        # keep the previous iterate, never divide by a non-positive number.
        healthy = (pAp > 0) & (rz > 0)
        alpha = jnp.where(healthy, rz / jnp.where(healthy, pAp, 1), 0)
        dx = _tree.tree_axpy(alpha, p, dx)
        step = step + 1
        r = _tree.tree_axpy(-alpha, Ap, r)

        def replace():
            x_new = _tree.tree_add(x_base, dx)
            return x_new, _tree.tree_zeros_like(dx), _tree.tree_sub(b, matvec(x_new))

        replace_now = (step % _STABILISE_EVERY == 0) | (_tree.tree_norm(r) <= tol)
        x_base, dx, r = lax.cond(replace_now, replace, lambda: (x_base, dx, r))
        z = precond(r)
        rz_new = _tree.tree_dot(r, z)
        beta = jnp.where(healthy, rz_new / jnp.where(rz > 0, rz, 1), 0)
        p = _tree.tree_axpy(beta, p, z)
        return x_base, dx, r, p, rz_new, _tree.tree_norm(r), step, healthy

    x_base, dx, _, _, _, r_norm, step, healthy = lax.while_loop(cond, body, init)
    x = _tree.tree_add(x_base, dx)
    converged = healthy & (r_norm <= tol)
    return x, (r_norm, step, converged)
