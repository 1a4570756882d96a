r"""Sound SGN constants of a game over a box of joint strategies, from Jacobian bounds.

Given elementwise bounds $\underline J \le J(x) \le \overline J$ on the pseudo-gradient's
Jacobian for every $x$ in a box (midpoint $J_c$, radius $R$), and a partition of the strategy
vector into player blocks:

* curvature: $\mu_i \ge \lambda_{\min}(\mathrm{sym}\,J_{c,ii}) - \|\mathrm{sym}\,R_{ii}\|_2$
  (Weyl, since every symmetric $E$ with $|E| \le \mathrm{sym}\,R_{ii}$ has
  $\|E\|_2 \le \|\,|E|\,\|_2 \le \|\mathrm{sym}\,R_{ii}\|_2$); we also take the interval
  Gershgorin bound and keep the larger;
* coupling: $L_{ij} \ge \sup \|J_{ij}\|_2$ via $\|A\|_2 \le \|\,|A|\,\|_2 \le
  \|\,|J_{c,ij}| + R_{ij}\|_2$ for every $A$ in the interval block;
* $\beta$: the same block-norm bound for every block, diagonal included; the Lipschitz
  constant in the metric $M(w)$ is then $\beta(w) \le \|(\sqrt{w_i/w_j}\beta_{ij})\|_2$
  (:func:`~linjax.verify.metric_lipschitz`), for whatever weights are chosen later.

A tiny relative slack covers the rounding of the dense eigen/singular value routines.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linjax.verify._box import Box, check_box


class GameConstants(NamedTuple):
    """SGN constants of a game over a region (:func:`game_constants`).

    Attributes:
        mu: ``[N]`` lower bounds on $\\lambda_{\\min}(\\tfrac12(J_{ii} + J_{ii}^\\top))$.
        lipschitz: ``[N, N]`` upper bounds on $\\|J_{ij}\\|_2$, zero diagonal.
        beta: ``[N, N]`` upper bounds on $\\|J_{ij}\\|_2$ for every block, diagonal
            included. Pass it as ``sgn_certificate(..., beta=constants.beta)``; the
            Lipschitz constant in the metric of weights ``w`` is
            ``metric_lipschitz(beta, w)``.
    """

    mu: jax.Array
    lipschitz: jax.Array
    beta: jax.Array


def check_blocks(blocks: Any, dim: int) -> tuple[np.ndarray, ...]:
    """Block index arrays from sizes ``(d_1, ..., d_N)`` or index lists; must partition."""
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks:
        raise TypeError(
            f"blocks must be a non-empty sequence of block sizes or of index lists, got {blocks!r}"
        )
    if all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in blocks):
        sizes = [int(b) for b in blocks]
        if any(s < 1 for s in sizes) or sum(sizes) != dim:
            raise ValueError(
                f"block sizes {sizes} must be >= 1 and sum to the strategy dimension {dim}"
            )
        edges = np.cumsum([0] + sizes)
        return tuple(np.arange(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True))
    out = []
    for k, b in enumerate(blocks):
        try:
            idx = np.asarray(b)
        except Exception as e:  # noqa: BLE001 - any unconvertible block is a type error
            raise TypeError(f"blocks[{k}] must be a sequence of int indices, got {b!r}") from e
        if idx.ndim != 1 or idx.size == 0 or not np.issubdtype(idx.dtype, np.integer):
            raise TypeError(f"blocks[{k}] must be a non-empty 1-D list of int indices, got {b!r}")
        out.append(idx.astype(np.int64))
    flat = np.concatenate(out)
    counts = np.bincount(flat[(flat >= 0) & (flat < dim)], minlength=dim)
    if np.any((flat < 0) | (flat >= dim)) or np.any(counts != 1):
        missing = np.flatnonzero(counts == 0).tolist()
        repeated = np.flatnonzero(counts > 1).tolist()
        outside = flat[(flat < 0) | (flat >= dim)].tolist()
        raise ValueError(
            f"blocks must partition the strategy indices 0..{dim - 1} (each exactly once); "
            f"missing {missing}, repeated {repeated}, out of range {outside}"
        )
    return tuple(out)


def _spectral_norm(a: jax.Array) -> jax.Array:
    return jnp.linalg.norm(a, 2) if a.size else jnp.zeros((), a.dtype)


def _slack(scale: jax.Array, dim: int) -> jax.Array:
    # Backward-stable dense eig/SVD: errors ~ dim * eps * ||A||; a generous multiple.
    return 16 * dim * jnp.finfo(scale.dtype).eps * scale


def constants_from_jacobian(jacobian: Box, blocks: Sequence[np.ndarray]) -> GameConstants:
    """Sound :class:`GameConstants` from elementwise bounds ``[d, d]`` on the Jacobian."""
    lo, hi = jacobian
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    mag = jnp.abs(mid) + rad
    n = len(blocks)
    mus, norms = [], [[None] * n for _ in range(n)]
    for i, bi in enumerate(blocks):
        for j, bj in enumerate(blocks):
            sub = mag[np.ix_(bi, bj)]
            norms[i][j] = _spectral_norm(sub) + _slack(jnp.max(sub), sub.shape[0])
        c, r = mid[np.ix_(bi, bi)], rad[np.ix_(bi, bi)]
        sc, sr = (c + c.T) / 2, (r + r.T) / 2
        weyl = jnp.linalg.eigvalsh(sc)[0] - _spectral_norm(sr)
        off = jnp.abs(sc) + sr
        off = off - jnp.diag(jnp.diag(off))
        gersh = jnp.min(jnp.diag(sc) - jnp.diag(sr) - jnp.sum(off, axis=1))
        scale = jnp.max(jnp.abs(sc)) + jnp.max(sr)
        mus.append(jnp.maximum(weyl, gersh) - _slack(scale, len(bi)))
    beta = jnp.stack([jnp.stack(row) for row in norms])
    lipschitz = beta * (1 - jnp.eye(n, dtype=beta.dtype))
    return GameConstants(jnp.stack(mus), lipschitz, beta)


def _check_region(region: Any) -> Box:
    region = check_box(region, "region")
    if region.lower.ndim != 1:
        raise ValueError(
            f"region must be a box of flat joint strategies, shape [d]; got {region.lower.shape}"
        )
    return region


def _check_pseudo_grad(pseudo_grad: Any, region: Box) -> None:
    if not callable(pseudo_grad):
        raise TypeError(f"pseudo_grad must be callable [d] -> [d], got {type(pseudo_grad)}")
    like = jax.ShapeDtypeStruct(region.lower.shape, region.lower.dtype)
    out = jax.eval_shape(pseudo_grad, like)
    if not isinstance(out, jax.ShapeDtypeStruct) or out.shape != like.shape:
        raise ValueError(
            f"pseudo_grad must map the joint strategy [d] = {like.shape} to an array of the "
            f"same shape, got {out}"
        )


def _sub_boxes(region: Box, splits: Any) -> Box:
    """The grid of ``prod(splits)`` sub-boxes of ``region`` (stacked on a leading axis)."""
    d = region.lower.shape[0]
    if isinstance(splits, numbers.Integral) and not isinstance(splits, bool):
        splits = (int(splits),) * d
    splits = tuple(splits)
    if len(splits) != d or not all(
        isinstance(k, numbers.Integral) and not isinstance(k, bool) and k >= 1 for k in splits
    ):
        raise ValueError(f"splits={splits!r} must be an int >= 1 or {d} ints >= 1")
    grids = np.meshgrid(*[np.arange(k) for k in splits], indexing="ij")
    cells = np.stack([g.ravel() for g in grids], 1)  # [pieces, d]
    k = np.asarray(splits)
    lo, width = region.lower, (region.upper - region.lower) / k
    lower = lo + width * cells
    upper = jnp.where(cells + 1 == k, region.upper, lo + width * (cells + 1))
    return Box(lower, upper)


def _jacobian_bounds(pseudo_grad: Callable, region: Box, method: str) -> Box:
    from linjax.verify._jacobian import jacobian_bounds

    return jacobian_bounds(pseudo_grad, region, method=method)


def game_constants(
    pseudo_grad: Callable[[jax.Array], jax.Array],
    region: Box,
    blocks: Sequence[int] | Sequence[Sequence[int]],
    *,
    splits: int | Sequence[int] = 1,
    method: str = "crown-ibp",
    jacobian: Box | None = None,
) -> GameConstants:
    r"""Sound SGN constants $(\mu, L, \beta)$ of a game over a box of joint strategies.

    The pseudo-gradient $F(x) = (\nabla_{x_1} f_1, \dots, \nabla_{x_N} f_N)$ maps the flat
    joint strategy $x \in \mathbb{R}^d$ to $\mathbb{R}^d$. Its Jacobian is bounded
    elementwise over ``region`` by :func:`~linjax.verify.jacobian_bounds` (bound
    propagation, no sampling), and the block constants follow from those intervals (Weyl /
    Gershgorin for $\mu_i$, the norm of the entrywise magnitude bound for $L_{ij}$ and
    $\beta_{ij}$; see the module docs). The result is a proof, up to floating-point rounding
    (covered by a small slack): for every $x$ in the box,
    $\lambda_{\min}(\mathrm{sym}\,J_{ii}(x)) \ge \mu_i$ and $\|J_{ij}(x)\|_2 \le L_{ij}$.
    For a sampled (inner) estimate to compare with, see :func:`sampled_game_constants`.

    Interval bounds loosen quickly with the width of the box (e.g. $\tanh' = 1 - \tanh^2$
    is bounded by products of intervals); ``splits`` cuts the region into a grid of
    sub-boxes, bounds the Jacobian on each (``vmap``) and takes the worst constant over
    them, which is still sound and usually much tighter.

    Args:
        pseudo_grad: ``F: [d] -> [d]``, any JAX code the bound propagation supports.
        region: :class:`~linjax.verify.Box` with ``[d]`` ends.
        blocks: the players' parts of ``x``: block sizes ``(d_1, ..., d_N)`` (contiguous) or
            index lists; they must partition ``0..d-1``.
        splits: pieces per coordinate (an int, or one per coordinate; static): the region is
            covered by ``prod(splits)`` sub-boxes.
        method: passed to :func:`~linjax.verify.jacobian_bounds` (``"ibp"``,
            ``"crown-ibp"``, ``"crown"``).
        jacobian: optional precomputed elementwise Jacobian bounds (``[d, d]`` box, e.g. from
            another method) to use instead of bound propagation (``splits`` must be 1).

    Returns:
        :class:`GameConstants` with ``mu [N]``, ``lipschitz [N, N]``, ``beta [N, N]``.

    Raises:
        TypeError / ValueError: for a malformed region, blocks that do not partition the
            strategy vector, or a ``jacobian`` of the wrong shape.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> J = jnp.array([[1.0, 10.0], [0.05, 1.0]])
        >>> c = vf.game_constants(lambda x: J @ x, vf.Box(-jnp.ones(2), jnp.ones(2)), (1, 1))
        >>> [round(float(v), 3) for v in (c.mu[0], c.lipschitz[0, 1], c.lipschitz[1, 0])]
        [1.0, 10.0, 0.05]
    """
    region = _check_region(region)
    d = region.lower.shape[0]
    idx = check_blocks(blocks, d)
    _check_pseudo_grad(pseudo_grad, region)
    if jacobian is None:
        pieces = _sub_boxes(region, splits)
        if pieces.lower.shape[0] == 1:
            jacobian = _jacobian_bounds(pseudo_grad, region, method)
        else:
            per_box = jax.vmap(
                lambda b: constants_from_jacobian(_jacobian_bounds(pseudo_grad, b, method), idx)
            )(pieces)
            return GameConstants(
                jnp.min(per_box.mu, 0), jnp.max(per_box.lipschitz, 0), jnp.max(per_box.beta, 0)
            )
    elif splits != 1:
        raise ValueError(f"splits={splits!r} must be 1 when jacobian bounds are given")
    jacobian = check_box(jacobian, "jacobian")
    if jacobian.lower.shape != (d, d):
        raise ValueError(
            f"jacobian bounds must have shape [d, d] = {(d, d)}, got {jacobian.lower.shape}"
        )
    return constants_from_jacobian(jacobian, idx)


def sampled_game_constants(
    pseudo_grad: Callable[[jax.Array], jax.Array],
    region: Box,
    blocks: Sequence[int] | Sequence[Sequence[int]],
    *,
    key: jax.Array,
    num_samples: int = 1024,
) -> GameConstants:
    r"""Sampled estimate of the SGN constants: NOT sound, an inner estimate for comparison.

    Evaluates the exact Jacobian (``jax.jacfwd``) at ``num_samples`` uniform points of the
    box and takes the worst case over them: $\min \lambda_{\min}(\mathrm{sym}\,J_{ii})$ and
    $\max \|J_{ij}\|_2$. The true constants over the region lie between this estimate and
    :func:`game_constants` (``mu_sound <= mu_true <= mu_sampled``, and the reverse order
    for ``lipschitz`` and ``beta``), which makes the pair a measure of how tight the sound
    bounds are.

    Args:
        pseudo_grad: ``F: [d] -> [d]``.
        region: :class:`~linjax.verify.Box` with ``[d]`` ends.
        blocks: as in :func:`game_constants`.
        key: PRNG key for the sample points.
        num_samples: number of points (``>= 1``).

    Returns:
        :class:`GameConstants` estimated from the samples.
    """
    region = _check_region(region)
    d = region.lower.shape[0]
    idx = check_blocks(blocks, d)
    _check_pseudo_grad(pseudo_grad, region)
    if (
        isinstance(num_samples, bool)
        or not isinstance(num_samples, numbers.Integral)
        or (num_samples < 1)
    ):
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    lo, hi = region
    xs = jax.random.uniform(key, (int(num_samples), d), lo.dtype, minval=lo, maxval=hi)
    jac = jax.vmap(jax.jacfwd(pseudo_grad))(xs)
    n = len(idx)
    mus, norms = [], [[None] * n for _ in range(n)]
    for i, bi in enumerate(idx):
        for j, bj in enumerate(idx):
            sub = jac[:, bi][:, :, bj]
            norms[i][j] = jnp.max(jnp.linalg.norm(sub, 2, axis=(1, 2)))
        sub = jac[:, bi][:, :, bi]
        mus.append(jnp.min(jnp.linalg.eigvalsh((sub + jnp.swapaxes(sub, 1, 2)) / 2)[:, 0]))
    beta = jnp.stack([jnp.stack(row) for row in norms])
    return GameConstants(jnp.stack(mus), beta * (1 - jnp.eye(n, dtype=beta.dtype)), beta)
