r"""Small-Gain Nash (SGN) certificates: the margin, its maximisation over weights, step sizes.

Player $i$ of an $N$-player game has a curvature bound $\mu_i$ (the symmetric part of the
diagonal Jacobian block of the pseudo-gradient satisfies $\tfrac12(J_{ii} + J_{ii}^\top)
\succeq \mu_i I$) and coupling bounds $L_{ij} \ge \|J_{ij}\|_2$. For block weights $w > 0$,
the SGN matrix $C(w)$ has $C_{ii} = 2 w_i \mu_i$ and $C_{ij} = -(w_i L_{ij} + w_j L_{ji})$, and

$$\alpha^*(w) = \tfrac12 \lambda_{\min}(W^{-1/2} C(w) W^{-1/2})
             = \lambda_{\min}(D - S(w)),\quad
  S_{ij} = \tfrac12\big(\sqrt{w_i/w_j}\,L_{ij} + \sqrt{w_j/w_i}\,L_{ji}\big),$$

with $D = \mathrm{diag}(\mu)$. If $\alpha^*(w) > 0$ the pseudo-gradient is
$\alpha^*$-strongly monotone in the metric $M(w) = \mathrm{blkdiag}(w_i I_{d_i})$.

Maximising over the weights has a closed form for every $N$ (not only two players):
$\alpha^*(e^t)$ is concave in the log-weights $t$ (the spectral radius of a non-negative
matrix with log-convex entries is log-convex, Kingman 1961), and its supremum is the
smallest real eigenvalue $\tau$ of the Z-matrix $A = D - L$ (off-diagonal $-L_{ij}$). It is
attained at $w_i = y_i / x_i$ with $x$, $y$ the right and left Perron vectors of $A$: then
$W^{1/2} x$ is both a left and a right eigenvector of $W^{1/2} A W^{-1/2}$, so the symmetric
part has the same smallest eigenvalue. In particular some weights certify the game iff $A$
is a non-singular M-matrix (the classical small-gain condition).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

#: RK4 step guideline ``h <= RK4_CONSTANT / beta`` (a heuristic below RK4's real-axis
#: stability limit of about 2.785; the SGN authors' code uses 2.5).
RK4_CONSTANT = 2.5

_BISECTION_STEPS = 100
_INVERSE_ITERATIONS = 4


class SGNCertificate(NamedTuple):
    """The result of :func:`sgn_certificate`.

    Attributes:
        weights: ``[N]`` block weights $w$ (``weights[0] == 1``); the metric is
            $M(w) = \\mathrm{blkdiag}(w_i I_{d_i})$.
        margin: scalar $\\alpha^*(w)$, the certified strong-monotonicity modulus in $M(w)$
            and the contraction rate of the flow $\\dot x = -F(x)$.
        certified: bool scalar, ``margin > 0``.
        euler_step: scalar; projected Euler contracts in $\\|\\cdot\\|_{M(w)}$ for every step
            $0 < h <$ ``euler_step`` $= 2\\alpha^*/\\beta^2$ (``0`` when not certified,
            ``nan`` when no ``beta`` was given). The fastest guaranteed factor,
            $\\sqrt{1 - \\alpha^{*2}/\\beta^2}$, is at ``euler_step / 2``.
        rk4_step: scalar RK4 step *guideline* ``2.5 / beta`` (a heuristic, not a proof;
            ``0`` when not certified, ``nan`` without ``beta``).
        weight_band: ``[2]`` open interval of ratios $w_2/w_1$ with $\\alpha^*(w) > 0$
            (two players only; ``nan`` for other $N$ or when no weights certify).
    """

    weights: jax.Array
    margin: jax.Array
    certified: jax.Array
    euler_step: jax.Array
    rk4_step: jax.Array
    weight_band: jax.Array


def _concrete(x: Any) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _as_float(x: Any, name: str) -> jax.Array:
    x = x if isinstance(x, jax.core.Tracer) else jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    return x


def check_mu_lipschitz(mu: Any, lipschitz: Any) -> tuple[jax.Array, jax.Array]:
    """Validate ``mu [N]`` and ``lipschitz [N, N]`` (off-diagonal >= 0); zero the diagonal."""
    mu = _as_float(mu, "mu")
    lipschitz = _as_float(lipschitz, "lipschitz")
    if mu.ndim != 1 or mu.shape[0] < 1:
        raise ValueError(f"mu must have shape [N] with N >= 1, got shape {mu.shape}")
    n = mu.shape[0]
    if lipschitz.shape != (n, n):
        raise ValueError(f"lipschitz must have shape [N, N] = {(n, n)}, got {lipschitz.shape}")
    off = ~np.eye(n, dtype=bool)
    if _concrete(lipschitz):
        lip = np.asarray(lipschitz)
        bad = off & ~(lip >= 0)  # also NaN
        if np.any(bad):
            i, j = (int(k) for k in np.argwhere(bad)[0])
            raise ValueError(
                f"lipschitz bounds must be >= 0 (and not NaN) off the diagonal; "
                f"lipschitz[{i}, {j}]={lip[i, j]}"
            )
    if _concrete(mu) and not np.all(np.isfinite(np.asarray(mu))):
        raise ValueError(f"mu must be finite, got {np.asarray(mu)}")
    dtype = jnp.result_type(mu, lipschitz)
    return mu.astype(dtype), jnp.where(off, lipschitz, 0).astype(dtype)


def _check_weights(weights: Any, n: int, dtype: Any) -> jax.Array:
    weights = _as_float(weights, "weights")
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape [N] = {(n,)}, got {weights.shape}")
    if _concrete(weights):
        w = np.asarray(weights)
        if not np.all((w > 0) & np.isfinite(w)):
            raise ValueError(f"weights must be positive and finite, got weights={w}")
    return weights.astype(dtype)


def _coupling(lipschitz: jax.Array, weights: jax.Array) -> jax.Array:
    # S_ij = (sqrt(w_i/w_j) L_ij + sqrt(w_j/w_i) L_ji) / 2, the symmetrised scaled coupling.
    r = jnp.sqrt(weights)
    k = lipschitz * (r[:, None] / r[None, :])
    return (k + k.T) / 2


def _margin(mu: jax.Array, lipschitz: jax.Array, weights: jax.Array) -> jax.Array:
    return jnp.linalg.eigvalsh(jnp.diag(mu) - _coupling(lipschitz, weights))[0]


def sgn_margin(mu: Any, lipschitz: Any, weights: Any) -> jax.Array:
    r"""The SGN margin $\alpha^*(w) = \lambda_{\min}(D - S(w))$ for block weights $w$.

    With $D = \mathrm{diag}(\mu)$ and $S_{ij} = \tfrac12(\sqrt{w_i/w_j}L_{ij} +
    \sqrt{w_j/w_i}L_{ji})$; equal to $\tfrac12\lambda_{\min}(W^{-1/2}C(w)W^{-1/2})$. If the
    block bounds hold on a convex region, then for all $x, y$ in it
    $\langle F(x) - F(y), x - y\rangle_{M(w)} \ge \alpha^*(w)\|x - y\|^2_{M(w)}$.
    Differentiable in all arguments; pure, ``jit``/``vmap`` safe.

    Args:
        mu: ``[N]`` curvature lower bounds $\mu_i$ (may be negative).
        lipschitz: ``[N, N]`` coupling bounds, ``lipschitz[i, j] >= ||dF_i/dx_j||_2``
            (``>= 0``); the diagonal is ignored.
        weights: ``[N]`` positive block weights.

    Returns:
        Scalar margin (positive means the game is certified strongly monotone in $M(w)$).

    Raises:
        ValueError: for mismatched shapes, negative or NaN off-diagonal ``lipschitz``, or
            non-positive ``weights`` (values are checked when not traced).

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> mu, lip = jnp.array([1.0, 1.0]), jnp.array([[0.0, 10.0], [0.05, 0.0]])
        >>> round(float(vf.sgn_margin(mu, lip, jnp.array([1.0, 1.0]))), 4)  # Euclidean
        -4.025
        >>> round(float(vf.sgn_margin(mu, lip, jnp.array([1.0, 200.0]))), 4)
        0.2929

    References:
        Sharma, "Small-Gain Nash: certified contraction to Nash equilibria in
        differentiable games" (2025).
    """
    mu, lipschitz = check_mu_lipschitz(mu, lipschitz)
    weights = _check_weights(weights, mu.shape[0], mu.dtype)
    return _margin(mu, lipschitz, weights)


def metric_lipschitz(block_norms: Any, weights: Any) -> jax.Array:
    r"""Upper bound on $\|M(w)^{1/2} J M(w)^{-1/2}\|_2$ from bounds on the block norms.

    If $\|J_{ij}\|_2 \le B_{ij}$ for all blocks (diagonal included), then
    $\|M^{1/2} J M^{-1/2}\|_2 \le \|(\sqrt{w_i/w_j}\,B_{ij})_{ij}\|_2$ (the norm of a block
    matrix is at most the norm of its matrix of block norms). This is $\beta(w)$, the
    Lipschitz constant of the pseudo-gradient in the metric, used for the Euler step.

    Args:
        block_norms: ``[N, N]`` non-negative bounds $B_{ij}$ (``GameConstants.beta``).
        weights: ``[N]`` positive block weights.

    Returns:
        Scalar $\beta(w)$.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> b = jnp.array([[1.0, 10.0], [0.05, 1.0]])
        >>> round(float(vf.metric_lipschitz(b, jnp.array([1.0, 200.0]))), 4)  # 1 + sqrt(.5)
        1.7071
    """
    b = _as_float(block_norms, "block_norms")
    if b.ndim != 2 or b.shape[0] != b.shape[1]:
        raise ValueError(f"block_norms must have shape [N, N], got {b.shape}")
    if _concrete(b) and not np.all(np.asarray(b) >= 0):
        raise ValueError(f"block_norms must be >= 0 and not NaN, got {np.asarray(b)}")
    weights = _check_weights(weights, b.shape[0], b.dtype)
    r = jnp.sqrt(weights)
    return jnp.linalg.norm(b * (r[:, None] / r[None, :]), 2)


def sgn_band(mu: Any, lipschitz: Any, *, margin: Any = 0.0) -> jax.Array:
    r"""Two players: the open interval of ratios $r = w_2/w_1$ with $\alpha^*(w) > $ ``margin``.

    With $\tilde\mu_i = \mu_i - \alpha$ and $p = L_{12}L_{21}$, weights certify margin
    $\alpha$ iff $\tilde\mu_i > 0$ and $\tilde\mu_1\tilde\mu_2 > p$, and then

    $$r_\pm = \frac{2\tilde\mu_1\tilde\mu_2 - p \pm 2\sqrt{\tilde\mu_1\tilde\mu_2
              (\tilde\mu_1\tilde\mu_2 - p)}}{L_{21}^2}$$

    (computed as $r_- = L_{12}^2 / (L_{21}^2 r_+)$ for accuracy; $r_+ = \infty$ when
    $L_{21} = 0$, $r_- = 0$ when $L_{12} = 0$).

    Args:
        mu: ``[2]`` curvature bounds.
        lipschitz: ``[2, 2]`` coupling bounds (diagonal ignored).
        margin: target margin $\alpha$ (default 0: the feasible band).

    Returns:
        ``[2]`` array ``(r_minus, r_plus)``; ``(nan, nan)`` when no ratio reaches ``margin``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> band = vf.sgn_band(jnp.array([1.0, 1.0]), jnp.array([[0.0, 10.0], [0.05, 0.0]]))
        >>> [round(float(b), 2) for b in band]
        [34.31, 1165.69]
    """
    mu, lipschitz = check_mu_lipschitz(mu, lipschitz)
    if mu.shape[0] != 2:
        raise ValueError(f"sgn_band is for two players, got N={mu.shape[0]}")
    return _band(mu, lipschitz, jnp.asarray(margin, mu.dtype))


def _band(mu: jax.Array, lipschitz: jax.Array, margin: jax.Array) -> jax.Array:
    m1, m2 = mu[0] - margin, mu[1] - margin
    l12, l21 = lipschitz[0, 1], lipschitz[1, 0]
    m, p = m1 * m2, l12 * l21
    ok = (m1 > 0) & (m2 > 0) & (m > p)
    num = 2 * m - p + 2 * jnp.sqrt(jnp.where(ok, m * (m - p), 0))
    num = jnp.where(ok, num, 1)
    hi = jnp.where(l21 > 0, num / jnp.where(l21 > 0, l21**2, 1), jnp.inf)
    lo = l12**2 / num
    nan = jnp.full((), jnp.nan, mu.dtype)
    return jnp.stack([jnp.where(ok, lo, nan), jnp.where(ok, hi, nan)])


def _tiny(mu: jax.Array, lipschitz: jax.Array) -> jax.Array:
    # Coupling floor that makes the coupling graph strongly connected, so the optimal
    # weights are finite: costs at most ~ scale * eps**(1/3) of margin (one-way couplings).
    scale = jnp.maximum(jnp.max(jnp.abs(mu)), jnp.max(lipschitz))
    eps = jnp.finfo(mu.dtype).eps ** (2 / 3)
    return eps * jnp.where(scale > 0, scale, 1)


def _two_player_weights(mu: jax.Array, lipschitz: jax.Array) -> jax.Array:
    # r* = L12 / L21 balances w1 L12 = w2 L21 (both sides floored, r = 1 when uncoupled).
    tiny = _tiny(mu, lipschitz)
    r = jnp.maximum(lipschitz[0, 1], tiny) / jnp.maximum(lipschitz[1, 0], tiny)
    return jnp.stack([jnp.ones((), mu.dtype), r])


def _m_matrix(a: jax.Array) -> jax.Array:
    """Whether the Z-matrix ``a`` is a non-singular M-matrix: elimination pivots all > 0."""
    n = a.shape[0]
    rows = jnp.arange(n)

    def body(k, carry):
        m, ok = carry
        p = m[k, k]
        ok = ok & (p > 0)
        factor = jnp.where(rows > k, m[:, k] / jnp.where(p > 0, p, 1), 0)
        return m - factor[:, None] * m[k][None, :], ok

    return jax.lax.fori_loop(0, n, body, (a, jnp.array(True)))[1]


def _perron_weights(mu: jax.Array, lipschitz: jax.Array) -> jax.Array:
    """Margin-optimal weights ``y / x`` from the Perron vectors of ``diag(mu) - L``."""
    n = mu.shape[0]
    eye = jnp.eye(n, dtype=mu.dtype)
    lip = lipschitz + _tiny(mu, lipschitz) * (1 - eye)
    a = jnp.diag(mu) - lip
    # tau (smallest real eigenvalue of the Z-matrix a) lies in [Gershgorin, min diagonal].
    lo = jnp.min(mu - jnp.sum(lip, axis=1))
    hi = jnp.min(mu)
    width = hi - lo
    lo = lo - 1e-3 * width - _tiny(mu, lipschitz)

    def bisect(_, bounds):
        lo, hi = bounds
        mid = (lo + hi) / 2
        ok = _m_matrix(a - mid * eye)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, bisect, (lo, hi))
    # Inverse iteration just below tau: (a - sigma I)^{-1} >= 0 and its Perron vector is x.
    shift = a - (lo - 1e-7 * (width + _tiny(mu, lipschitz))) * eye

    def power(mat):
        def body(_, v):
            v = jnp.abs(jnp.linalg.solve(mat, v))
            return v / jnp.max(v)

        return jax.lax.fori_loop(0, _INVERSE_ITERATIONS, body, jnp.ones(n, mu.dtype))

    x, y = power(shift), power(shift.T)
    floor = jnp.finfo(mu.dtype).tiny
    w = jnp.maximum(y, floor) / jnp.maximum(x, floor)
    return w / w[0]


def sgn_certificate(mu: Any, lipschitz: Any, *, beta: Any = None) -> SGNCertificate:
    r"""Maximise the SGN margin over block weights and return the certificate.

    * Two players: the closed form $r^* = w_2/w_1 = L_{12}/L_{21}$, which balances
      $w_1 L_{12} = w_2 L_{21}$ and gives
      $\alpha^*_{\max} = \tfrac{\mu_1+\mu_2}{2} - \sqrt{(\tfrac{\mu_1-\mu_2}{2})^2 + L_{12}L_{21}}$,
      plus the feasible band of ratios (:func:`sgn_band`).
    * $N$ players: the exact maximiser over log-weights. $\alpha^*(e^t)$ is concave in $t$
      and is maximised at $w = y/x$ from the right/left Perron vectors $x, y$ of the
      Z-matrix $D - L$, whose smallest real eigenvalue is the maximum margin. We find that
      eigenvalue by bisection (100 steps; an M-matrix test by elimination pivots), then the
      Perron vectors by inverse iteration just below it. All ``lax`` loops: ``jit``-able.

    One-way couplings ($L_{ij} > 0 = L_{ji}$) put the optimum at an infinite ratio; all
    couplings are floored at ``eps**(2/3) * scale`` first, so the weights stay finite and
    the margin is within about ``scale * eps**(1/3)`` of its supremum. The returned margin
    is always :func:`sgn_margin` evaluated at the returned weights with the given bounds.

    The weights maximise $\alpha^*$, not the Euler step $2\alpha^*/\beta(w)^2$.

    Args:
        mu: ``[N]`` curvature lower bounds.
        lipschitz: ``[N, N]`` coupling bounds (``>= 0``; diagonal ignored).
        beta: optional Lipschitz information for the step sizes: a scalar bound on
            $\|M(w)^{1/2} J M(w)^{-1/2}\|_2$ valid *at the returned weights*, or ``[N, N]``
            block-norm bounds (``GameConstants.beta``), turned into $\beta(w)$ at the
            returned weights by :func:`metric_lipschitz` (the sound choice).

    Returns:
        :class:`SGNCertificate`.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> cert = vf.sgn_certificate(jnp.array([1.0, 1.0]),
        ...                           jnp.array([[0.0, 10.0], [0.05, 0.0]]),
        ...                           beta=jnp.array([[1.0, 10.0], [0.05, 1.0]]))
        >>> print(round(float(cert.weights[1]), 1), round(float(cert.margin), 4),
        ...       bool(cert.certified), round(float(cert.euler_step), 4))
        200.0 0.2929 True 0.201

    References:
        Sharma, "Small-Gain Nash" (2025); Kingman, "A convexity property of positive
        matrices" (1961); Berman & Plemmons, "Nonnegative matrices in the mathematical
        sciences" (M-matrices).
    """
    mu, lipschitz = check_mu_lipschitz(mu, lipschitz)
    n = mu.shape[0]
    if n == 1:
        weights = jnp.ones((1,), mu.dtype)
    elif n == 2:
        weights = _two_player_weights(mu, lipschitz)
    else:
        weights = _perron_weights(mu, lipschitz)
    margin = _margin(mu, lipschitz, weights)
    certified = margin > 0
    if n == 2:
        band = _band(mu, lipschitz, jnp.zeros((), mu.dtype))
    else:
        band = jnp.full((2,), jnp.nan, mu.dtype)
    if beta is None:
        b = jnp.full((), jnp.nan, mu.dtype)
    else:
        beta = _as_float(beta, "beta")
        if beta.ndim == 0:
            if _concrete(beta) and not float(beta) > 0:
                raise ValueError(f"beta must be > 0, got beta={float(beta)}")
            b = beta.astype(mu.dtype)
        elif beta.shape == (n, n):
            b = metric_lipschitz(beta, weights).astype(mu.dtype)
        else:
            raise ValueError(
                f"beta must be a scalar or have shape [N, N] = {(n, n)}, got {beta.shape}"
            )
    zero = jnp.zeros((), mu.dtype)
    euler = jnp.where(certified, 2 * margin / b**2, zero)
    rk4 = jnp.where(certified, RK4_CONSTANT / b, zero)
    if beta is None:
        euler = rk4 = b
    return SGNCertificate(weights, margin, certified, euler, rk4, band)
