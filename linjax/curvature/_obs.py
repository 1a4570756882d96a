r"""Optimal Brain Surgeon pruning with the M-FAC inverse Fisher.

For a loss that is locally quadratic with curvature $F$ around trained weights $w$, removing
weight $j$ and letting the others move optimally costs (Hassibi & Stork 1993)

$$\rho_j = \frac{w_j^2}{2\,[F^{-1}]_{jj}}, \qquad
\delta w = -\frac{w_j}{[F^{-1}]_{jj}}\, F^{-1} e_j .$$

M-FAC supplies $[F^{-1}]_{jj}$ for every $j$ and $F^{-1}u$ for any $u$ in $O(md)$.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from linjax.curvature._mfac import (
    MFACState,
    _flatten,
    _ihvp_flat,
    _leading_shape,
    _leaf_dtypes,
    _unflatten,
    inverse_diagonal_flat,
)

PyTree = Any


def _saliency_flat(state: MFACState, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    diag = inverse_diagonal_flat(state)
    w = w.astype(jnp.result_type(w.dtype, diag.dtype))
    return jnp.square(w) / (2 * diag.astype(w.dtype)), diag


def obs_saliency(state: MFACState, params: PyTree) -> PyTree:
    r"""OBS saliency $\rho_j = w_j^2 / (2 [F^{-1}]_{jj})$ of every weight.

    The predicted increase of a quadratic loss with curvature $F$ when weight $j$ alone is
    removed and the others are re-optimised. Lower means safer to prune. Uses
    :func:`~linjax.curvature.mfac_inverse_diagonal` ($2m^2 d$ flops, an ``[m, d]``
    temporary).

    Args:
        state: :class:`~linjax.curvature.MFACState` built from gradients at (or near)
            ``params``.
        params: the weights $w$, with the structure and leaf shapes of the state's ``like``.

    Returns:
        Pytree shaped like ``params`` with its leaf dtypes, all entries >= 0.

    Raises:
        ValueError: if ``params``' structure or a leaf shape differs from the state's.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> state = cv.mfac_from_grads(jnp.array([[3.0, 0.0]]), damping=1.0)  # F = diag(10, 1)
        >>> cv.obs_saliency(state, jnp.array([1.0, 1.0])).round(4)
        Array([5. , 0.5], dtype=float32)

    References:
        Hassibi, Stork (1993), "Second order derivatives for network pruning: Optimal Brain
        Surgeon", NeurIPS. Frantar, Kurtic, Alistarh (2021), arXiv:2107.03356, §4.
    """
    _leading_shape(params, state.like, "params", allow_batch=False)
    sal, _ = _saliency_flat(state, _flatten(params, ()))
    return _unflatten(sal, state.like, _leaf_dtypes(params))


def obs_prune(params: PyTree, state: MFACState, sparsity: float | jax.Array) -> PyTree:
    r"""Prune the fraction ``sparsity`` of weights with the lowest OBS saliency, with compensation.

    Let $S$ be the $k = \operatorname{round}(\text{sparsity} \cdot d)$ weights of lowest
    saliency $\rho_j = w_j^2 / (2[F^{-1}]_{jj})$ (ties broken by position; weights that are
    already zero go first). The surviving weights are moved by the OBS compensation and the
    pruned ones are then set exactly to zero:

    $$w \leftarrow w + F^{-1} u, \quad u_j = -\frac{w_j}{[F^{-1}]_{jj}}\ (j \in S),\ u_j = 0
    \text{ otherwise}; \qquad w_S \leftarrow 0 .$$

    **Approximation for many weights at once.** The exact multi-weight OBS step is
    $\delta w = -F^{-1} E_S \left([F^{-1}]_{SS}\right)^{-1} w_S$, which needs the
    $|S| \times |S|$ block of $F^{-1}$. As in the reference pruner, that block is replaced
    by its diagonal, i.e. the single-weight OBS updates are summed. This is exact for
    $|S| = 1$ and when the pruned weights do not interact through $F^{-1}$; otherwise the
    compensation is approximate, so pruned entries are forced to zero afterwards. For high
    sparsities, prune gradually (several calls with increasing ``sparsity`` and fresh
    gradients, as the paper does with 16 recomputations per step).

    Cost: one :func:`~linjax.curvature.mfac_inverse_diagonal`, one sort of $d$ saliencies
    and one M-FAC product.

    Args:
        params: the weights $w$, with the structure and leaf shapes of the state's ``like``.
        state: :class:`~linjax.curvature.MFACState` built from gradients at ``params``.
        sparsity: fraction of weights to prune, in ``[0, 1]``; may be traced (a schedule),
            concrete values are checked eagerly.

    Returns:
        Pruned weights shaped like ``params`` with its leaf dtypes; exactly $k$ entries are
        forced to zero (others may be zero already).

    Raises:
        ValueError: if ``sparsity`` is outside ``[0, 1]`` or ``params`` does not match the
            state's structure.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> state = cv.mfac_from_grads(jnp.array([[3.0, 0.0, 0.0]]), damping=1.0)
        >>> cv.obs_prune(jnp.array([0.2, 1.0, 2.0]), state, 1 / 3).round(4)  # w_0 is cheapest
        Array([0., 1., 2.], dtype=float32)

    References:
        Hassibi, Stork (1993), "Second order derivatives for network pruning: Optimal Brain
        Surgeon", NeurIPS. Frantar, Kurtic, Alistarh (2021), arXiv:2107.03356, §4.
    """
    if not isinstance(sparsity, jax.core.Tracer):
        arr = np.asarray(sparsity)
        if arr.shape != () or not np.issubdtype(arr.dtype, np.number) or isinstance(sparsity, bool):
            raise TypeError(f"{sparsity=} must be a real scalar in [0, 1]")
        if not 0 <= float(arr) <= 1:
            raise ValueError(f"{sparsity=} must be in [0, 1]")
    _leading_shape(params, state.like, "params", allow_batch=False)
    w = _flatten(params, ())
    d = w.shape[0]
    sal, diag = _saliency_flat(state, w)
    k = jnp.round(jnp.asarray(sparsity, jnp.float32) * d).astype(jnp.int32)
    order = jnp.argsort(sal, stable=True)
    pruned = jnp.zeros(d, jnp.bool_).at[order].set(jnp.arange(d) < k)
    wc = w.astype(sal.dtype)
    u = jnp.where(pruned, -wc / diag.astype(wc.dtype), 0)
    compensated = wc + _ihvp_flat(state, u, None, 0).astype(wc.dtype)
    new = jnp.where(pruned, 0, compensated)
    return _unflatten(new, state.like, _leaf_dtypes(params))
