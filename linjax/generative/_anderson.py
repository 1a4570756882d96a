r"""Anderson-accelerated fixed-point iteration with a fixed budget, per sample."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linjax import _tree
from linjax.generative._velocity import check_callable, check_output

_HIGHEST = lax.Precision.HIGHEST


class AndersonResult(NamedTuple):
    """Output of :func:`anderson_fixed_point`.

    Attributes:
        x: the last iterate $z_K$, a pytree like the starting point.
        residual_norm: $\\|G(z_{K-1}) - z_{K-1}\\|$, the residual at the last point where $G$
            was evaluated (an upper-bound proxy for the error of $z_K$), shape
            ``x``'s batch shape (``()`` when ``batch_dims=0``).
    """

    x: Any
    residual_norm: jax.Array


def _batch_shape(x: Any, batch_dims: int) -> tuple[int, ...]:
    leaves = jax.tree.leaves(x)
    shapes = {tuple(leaf.shape[:batch_dims]) for leaf in leaves}
    if any(leaf.ndim < batch_dims for leaf in leaves) or len(shapes) != 1:
        raise ValueError(
            f"every leaf of x0 must share the {batch_dims=} leading batch axes, got leaf "
            f"shapes {[tuple(leaf.shape) for leaf in leaves]}"
        )
    if batch_dims and all(leaf.ndim == batch_dims for leaf in leaves):
        raise ValueError(
            f"x0 has no axes beyond its {batch_dims=} leading batch axes (leaf shapes "
            f"{[tuple(leaf.shape) for leaf in leaves]}); pass batch_dims=0 to treat x0 as "
            "one sample (e.g. under vmap)"
        )
    return shapes.pop()


def anderson_fixed_point(
    fn: Callable[[Any], Any],
    x0: Any,
    *,
    num_iterations: int,
    window: int = 1,
    mixing: float = 1.0,
    ridge: float | None = None,
    batch_dims: int = 0,
) -> AndersonResult:
    r"""Solve $z = G(z)$ with ``num_iterations`` evaluations of $G$ and Anderson mixing.

    Iteration $k$ evaluates $g_k = G(z_k)$ and $f_k = g_k - z_k$, keeps the last $m + 1$ pairs
    $(z_j, f_j)$ ($m$ = ``window``) and mixes them (type-II Anderson acceleration):

    $$\alpha = \operatorname*{arg\,min}_{\sum_j \alpha_j = 1}
        \Big\|\sum_j \alpha_j f_j\Big\|^2 , \qquad
    z_{k+1} = \sum_j \alpha_j z_j + \beta \sum_j \alpha_j f_j ,$$

    solved as $\gamma = \arg\min \|f_k - Y\gamma\|^2 + \lambda\|\gamma\|^2$ with
    $Y = [f_k - f_j]_{j \ne k}$, $\alpha_j = \gamma_j$, $\alpha_k = 1 - \sum_j\gamma_j$. The
    first iteration (one pair) and ``window=0`` are (damped) Picard, $z_{k+1} = z_k + \beta
    f_k$. For an affine $G$ on $\mathbb R^d$ a window $m \ge d$ gives the exact fixed point
    after at most $d + 1$ evaluations (Anderson with full memory is GMRES on the residual),
    while Picard converges only linearly, at the spectral radius of $G$'s Jacobian.

    The ridge is relative, $\lambda = $ ``ridge`` $\cdot \max_j \|f_k - f_j\|^2$, so it does not
    depend on the scale of $z$; the small $(m+1) \times (m+1)$ system is assembled and solved
    in float64 when x64 is enabled (highest matmul precision otherwise). The default ridge is
    100 machine epsilons of the samples' dtype ($2 \cdot 10^{-14}$ for float64, $10^{-5}$ for
    float32 samples), the resolution at which their residuals carry information; a larger
    ridge damps the extrapolation when the residuals are nearly collinear, at the price of the
    exact termination above. Slots not yet filled get zero weight, and at an exact fixed point
    ($f = 0$) the weights are zero rather than NaN, so a fixed point is returned unchanged.
    The loop is a ``lax.fori_loop`` with a static trip count (reverse-differentiable by
    unrolling, not by implicit differentiation).

    With ``batch_dims > 0`` the leading axes of ``x0`` index independent problems: each
    sample gets its own mixing weights (as ``vmap`` would give), while ``fn`` is still called
    once per iteration on the whole batch.

    Args:
        fn: ``fn(z) -> G(z)``, structured, shaped and typed like ``z``.
        x0: starting point, a pytree of floating arrays.
        num_iterations: number of evaluations $K \ge 1$ of ``fn`` (static).
        window: history $m \ge 0$ (static); ``m + 1`` pairs are kept.
        mixing: damping $\beta > 0$ (1: undamped).
        ridge: relative Tikhonov regularisation $> 0$ of the least-squares problem
            (``None``: 100 machine epsilons of ``x0``'s dtype).
        batch_dims: number of leading batch axes of ``x0`` (static).

    Returns:
        :class:`AndersonResult` ``(x, residual_norm)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> A = jnp.array([[0.5, 0.4], [-0.3, 0.6]]); c = jnp.array([1.0, 2.0])
        >>> res = gen.anderson_fixed_point(lambda z: A @ z + c, jnp.zeros(2),
        ...                                num_iterations=4, window=2)
        >>> bool(jnp.allclose(res.x, A @ res.x + c, atol=1e-5))
        True

    References:
        Anderson (1965), "Iterative Procedures for Nonlinear Integral Equations", J. ACM
        12(4); Walker, Ni (2011), "Anderson Acceleration for Fixed-Point Iterations", SIAM
        J. Numer. Anal. 49(4), https://doi.org/10.1137/10078356X
    """
    check_callable(fn, "fn", "fn(z)")
    _tree.check_floating(x0, "x0")
    num_iterations = _tree.check_positive_int(num_iterations, "num_iterations")
    window = _tree.check_positive_int(window, "window", minimum=0)
    batch_dims = _tree.check_positive_int(batch_dims, "batch_dims", minimum=0)
    _tree.check_positive_scalar(mixing, "mixing")
    if ridge is not None:
        _tree.check_positive_scalar(ridge, "ridge")
    check_output(fn, (x0,), x0, "fn(z)")
    batch_shape = _batch_shape(x0, batch_dims)
    num = math.prod(batch_shape)

    leaves, treedef = jax.tree.flatten(x0)
    dtype = _tree.tree_dtype(x0)
    sizes = [math.prod(leaf.shape[batch_dims:]) for leaf in leaves]
    splits = [int(i) for i in np.cumsum(sizes)[:-1]]

    def flatten(tree):  # -> [num, n] in the common dtype
        parts = [leaf.reshape(num, -1).astype(dtype) for leaf in jax.tree.leaves(tree)]
        return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def unflatten(flat):
        parts = jnp.split(flat, splits, axis=1) if len(leaves) > 1 else [flat]
        out = [
            p.reshape(leaf.shape).astype(leaf.dtype) for p, leaf in zip(parts, leaves, strict=True)
        ]
        return jax.tree.unflatten(treedef, out)

    size = window + 1
    acc = jax.dtypes.canonicalize_dtype(jnp.float64)  # float64 when x64 is on
    if ridge is None:
        ridge = 100 * float(jnp.finfo(dtype).eps)
    beta = jnp.asarray(mixing, dtype)

    def body(k, carry):
        z, zs, fs, _ = carry
        f = flatten(fn(unflatten(z))) - z
        slot = k % size
        zs, fs = zs.at[slot].set(z), fs.at[slot].set(f)
        # Older, filled slots take part in the least-squares problem; the newest is implicit.
        use = (jnp.arange(size) < k + 1) & (jnp.arange(size) != slot)
        y = jnp.where(use[:, None, None], f[None] - fs, 0).astype(acc)  # [m+1, num, n]
        gram = jnp.einsum("ibn,jbn->bij", y, y, precision=_HIGHEST)
        rhs = jnp.einsum("ibn,bn->bi", y, f.astype(acc), precision=_HIGHEST)
        scale = jnp.max(jnp.diagonal(gram, axis1=1, axis2=2), axis=1)  # [num]
        lam = jnp.where(scale > 0, jnp.asarray(ridge, acc) * scale, 1)
        # Unused slots get a unit diagonal and zero right-hand side, hence zero weight.
        diag = jnp.where(use[None], lam[:, None], 1.0)
        system = gram + diag[:, :, None] * jnp.eye(size, dtype=acc)
        gamma = jnp.linalg.solve(system, rhs[..., None])[..., 0]
        gamma = jnp.where(use[None], gamma, 0).astype(dtype)  # [num, m+1]
        # z_{k+1} = (z_k + beta f_k) - sum_j gamma_j [(z_k - z_j) + beta (f_k - f_j)]
        delta = (z[None] - zs) + beta * (f[None] - fs)
        z_next = z + beta * f - jnp.einsum("bi,ibn->bn", gamma, delta, precision=_HIGHEST)
        return z_next, zs, fs, jnp.linalg.norm(f.astype(acc), axis=1)

    z0 = flatten(x0)
    history = jnp.zeros((size, *z0.shape), dtype)
    init = (z0, history, history, jnp.zeros((num,), acc))
    z, _, _, res = lax.fori_loop(0, num_iterations, body, init)
    return AndersonResult(unflatten(z), res.reshape(batch_shape).astype(dtype))
