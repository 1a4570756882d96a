r"""SGN in the Fisher / mirror geometry: entropy-regularised matrix games with softmax policies.

Two players with softmax policies $\pi_i = \mathrm{softmax}(\theta_i)$ over $n_i$ actions
minimise

$$f_1 = \pi_1^\top A\,\pi_2 - \tau_1 H(\pi_1),\qquad f_2 = \pi_1^\top B\,\pi_2 - \tau_2 H(\pi_2)$$

(bimatrix costs; zero-sum is $B = -A$; $H$ the Shannon entropy). The natural policy gradient
(the Fisher-preconditioned gradient $F_i^+\nabla_{\theta_i} f_i$, $F_i = \mathrm{diag}(\pi_i)
- \pi_i\pi_i^\top$) equals the centred $\pi$-gradient, so natural gradient play is entropic
mirror descent: $\theta_i \leftarrow \theta_i - h\,\nabla_{\pi_i} f_i$. Logits are defined up
to a constant; we use coordinates $z_i = Q_i^\top\theta_i \in \mathbb{R}^{n_i-1}$ with $Q_i$
an orthonormal basis of $\mathbf 1^\perp$ (Helmert), i.e. centred logits with their
Euclidean metric. There the natural-gradient field is

$$\Phi_1(z) = Q_1^\top A\,\pi_2 + \tau_1 z_1,\qquad \Phi_2(z) = Q_2^\top B^\top \pi_1 + \tau_2 z_2$$

and Euler on $\Phi$ *is* entropic mirror descent / natural policy gradient. Its Jacobian has
$J_{ii} = \tau_i I$ exactly and $J_{12} = (Q_1^\top A Q_2)(Q_2^\top F_2 Q_2)$ with
$\|F_2\|_2 \le \min(\tfrac12, \max_k \pi_{2k})$, so the SGN constants have closed forms.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linjax.verify._box import Box
from linjax.verify._games import GameConstants


class EntropicGame(NamedTuple):
    """An entropy-regularised two-player matrix game in centred-logit coordinates.

    Attributes:
        pseudo_grad: ``Phi(z)``, ``[d] -> [d]`` with ``d = (n1 - 1) + (n2 - 1)``: the natural
            policy gradient field. ``game_flow(pseudo_grad, z0, step=h, ...)`` is entropic
            mirror descent (multiplicative weights on the regularised costs).
        region: :class:`~linjax.verify.Box` in ``z`` that contains every regularised
            equilibrium (QRE) and is forward invariant for the flow and for Euler steps with
            ``h <= 1 / max(tau)``.
        blocks: ``(n1 - 1, n2 - 1)``.
        constants: sound :class:`~linjax.verify.GameConstants` valid on all of ``region``.
        policies: ``policies(z) -> (pi1, pi2)``.
        coordinates: ``coordinates(logits1, logits2) -> z`` (``log pi`` works as logits).
    """

    pseudo_grad: Callable[[jax.Array], jax.Array]
    region: Box
    blocks: tuple[int, int]
    constants: GameConstants
    policies: Callable[[jax.Array], tuple[jax.Array, jax.Array]]
    coordinates: Callable[[jax.Array, jax.Array], jax.Array]


def helmert_basis(n: int, dtype: Any = None) -> jax.Array:
    """``[n, n - 1]`` orthonormal basis of the vectors with zero sum (Helmert's)."""
    q = np.zeros((n, n - 1))
    for k in range(1, n):
        q[:k, k - 1] = 1.0
        q[k, k - 1] = -k
        q[:, k - 1] /= np.sqrt(k * (k + 1))
    return jnp.asarray(q, dtype)


def _softmax_upper(lo: jax.Array, hi: jax.Array) -> jax.Array:
    """Elementwise upper bound of ``softmax(theta)`` over the box ``lo <= theta <= hi``."""
    top = jnp.max(hi)
    el, eh = jnp.exp(lo - top), jnp.exp(hi - top)
    return eh / (eh + jnp.sum(el) - el)


def _fisher_norm_bound(q: jax.Array, zl: jax.Array, zu: jax.Array) -> jax.Array:
    # ||Q^T F Q|| <= ||F|| = lambda_max(diag(pi) - pi pi^T) <= min(1/2, max_k pi_k).
    c, r = (zl + zu) / 2, (zu - zl) / 2
    theta_c, theta_r = q @ c, jnp.abs(q) @ r
    top = jnp.max(_softmax_upper(theta_c - theta_r, theta_c + theta_r))
    return jnp.minimum(jnp.asarray(0.5, q.dtype), top)


def entropic_matrix_game(cost1: Any, cost2: Any, *, temperature: Any) -> EntropicGame:
    r"""Build the natural-gradient (mirror) game of an entropy-regularised bimatrix game.

    See the module docs for the set-up. The returned constants are *sound on the whole
    invariant region* and are derived in closed form (no bound propagation through the
    softmax, which interval arithmetic would bound very loosely):
    $\mu_i = \tau_i$ (exact), $L_{12} = \|Q_1^\top A Q_2\|_2 \cdot \min(\tfrac12,
    \max_{z \in R}\max_k \pi_{2k})$, $L_{21} = \|Q_2^\top B^\top Q_1\|_2 \cdot \min(\tfrac12,
    \max_k \pi_{1k})$, and $\beta = [[\tau_1, L_{12}], [L_{21}, \tau_2]]$. Pass them to
    :func:`sgn_certificate`.

    What a positive certificate proves:

    * the regularised game has exactly one equilibrium (QRE) in the region $R$, and $R$
      contains every QRE, so it is the unique one;
    * natural-gradient / mirror-descent *flow* in centred logits, started in $R$, stays in
      $R$ and converges to the QRE at rate $\alpha^*$ in $\|\cdot\|_{M(w)}$ (Euclidean on
      centred logits, block weights $w$). Started outside $R$, each coordinate's distance
      to $R$ decays at rate $\tau_i$, but no rate is claimed there;
    * entropic mirror descent $\theta_i \leftarrow \theta_i - h\nabla_{\pi_i} f_i$ with
      $h < 2\alpha^*/\beta^2$ and $h \le 1/\max_i\tau_i$ (so that $R$ stays invariant), or
      with any $h < 2\alpha^*/\beta^2$ when the iterate is clipped to $R$, contracts at the
      factor $\sqrt{1 - 2h\alpha^* + h^2\beta^2}$ per step.

    What it does not prove: anything about the unregularised game ($\tau \to 0$ gives
    $\mu \to 0$, no certificate), about vanilla (non-natural) policy gradient on the logits,
    or about a state-dependent Fisher metric $\mathrm{blkdiag}(w_i F_i(\theta))$ (the metric
    here is constant); the softmax null direction is removed by the coordinates, not
    ignored. Rates are in centred-logit distance; policies converge at least as fast in
    $\ell_2$ because the softmax is $\tfrac12$-Lipschitz.

    Args:
        cost1: ``[n1, n2]`` costs of player 1 (row player), $A$.
        cost2: ``[n1, n2]`` costs of player 2 (column player), $B$, same orientation.
        temperature: entropy weight $\tau > 0$, a scalar or one per player.

    Returns:
        :class:`EntropicGame`.

    Raises:
        ValueError: for mismatched shapes, fewer than two actions, or ``temperature <= 0``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> rps = jnp.array([[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
        >>> game = vf.entropic_matrix_game(rps, -rps, temperature=1.0)
        >>> c = game.constants
        >>> cert = vf.sgn_certificate(c.mu, c.lipschitz, beta=c.beta)
        >>> bool(cert.certified), round(float(cert.margin), 3)
        (True, 0.134)

    References:
        Sharma, "Small-Gain Nash" (2025); Cen et al., "Fast global convergence of natural
        policy gradient methods with entropy regularization" (2021).
    """
    a = jnp.asarray(cost1)
    b = jnp.asarray(cost2)
    dtype = jnp.result_type(a, b, float)
    a, b = a.astype(dtype), b.astype(dtype)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            f"cost1 and cost2 must both have shape [n1, n2], got {a.shape} and {b.shape}"
        )
    n1, n2 = a.shape
    if n1 < 2 or n2 < 2:
        raise ValueError(f"each player needs >= 2 actions, got cost shape {a.shape}")
    tau = jnp.broadcast_to(jnp.asarray(temperature, dtype), (2,))
    if not isinstance(temperature, jax.core.Tracer) and not np.all(np.asarray(tau) > 0):
        raise ValueError(
            f"temperature must be > 0 (one value or one per player), got {np.asarray(temperature)}"
        )
    q1, q2 = helmert_basis(n1, dtype), helmert_basis(n2, dtype)
    v1, v2 = q1.T @ a, q2.T @ b.T  # [n1-1, n2], [n2-1, n1]
    d1 = n1 - 1

    def policies(z):
        return jax.nn.softmax(q1 @ z[:d1]), jax.nn.softmax(q2 @ z[d1:])

    def pseudo_grad(z):
        p1, p2 = policies(z)
        return jnp.concatenate([v1 @ p2 + tau[0] * z[:d1], v2 @ p1 + tau[1] * z[d1:]])

    def coordinates(logits1, logits2):
        return jnp.concatenate([q1.T @ logits1, q2.T @ logits2])

    # z_i' = -tau_i z_i - v_i pi_j with v_i pi_j in [min_l v_i, max_l v_i] per row.
    lower = jnp.concatenate([-jnp.max(v1, 1) / tau[0], -jnp.max(v2, 1) / tau[1]])
    upper = jnp.concatenate([-jnp.min(v1, 1) / tau[0], -jnp.min(v2, 1) / tau[1]])
    region = Box(lower, upper)
    eps = 64 * jnp.finfo(dtype).eps
    phi1 = _fisher_norm_bound(q1, lower[:d1], upper[:d1])
    phi2 = _fisher_norm_bound(q2, lower[d1:], upper[d1:])
    l12 = jnp.linalg.norm(q1.T @ a @ q2, 2) * phi2 * (1 + eps)
    l21 = jnp.linalg.norm(q2.T @ b.T @ q1, 2) * phi1 * (1 + eps)
    zero = jnp.zeros((), dtype)
    lipschitz = jnp.stack([jnp.stack([zero, l12]), jnp.stack([l21, zero])])
    beta = jnp.stack([jnp.stack([tau[0], l12]), jnp.stack([l21, tau[1]])])
    constants = GameConstants(tau * (1 - eps), lipschitz, beta)
    return EntropicGame(pseudo_grad, region, (n1 - 1, n2 - 1), constants, policies, coordinates)
