r"""Simulated game dynamics: projected Euler / RK4 on $\dot x = -F(x)$ as one ``lax.scan``."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

_METHODS = ("euler", "rk4")


def _axpy(a: Any, x: Any, y: Any) -> Any:
    return jax.tree.map(lambda xi, yi: yi + a * xi, x, y)


def game_flow(
    pseudo_grad: Callable[[Any], Any],
    x0: Any,
    *,
    step: Any,
    num_steps: int,
    method: str = "euler",
    project: Callable[[Any], Any] | None = None,
) -> Any:
    r"""Trajectory of the (projected) game dynamics $\dot x = -F(x)$, for checking certificates.

    * ``"euler"``: $x_{k+1} = \Pi(x_k - h F(x_k))$ (simultaneous gradient play; for a
      product set and a block-scalar metric $M(w)$ the blockwise Euclidean projection is the
      $M$-projection, so :func:`sgn_certificate`'s ``euler_step`` applies to it).
    * ``"rk4"``: one classical Runge-Kutta step of $\dot x = -F(x)$, then $\Pi$.

    Runs as a single ``lax.scan``; pure and differentiable (in ``x0``, ``step`` and anything
    ``pseudo_grad`` closes over); the caller jits.

    Args:
        pseudo_grad: ``F(x)``, a pytree shaped like ``x``.
        x0: initial joint strategy, any pytree of arrays.
        step: step size $h$ (a scalar; may be traced).
        num_steps: number of steps (static, ``>= 1``).
        method: ``"euler"`` or ``"rk4"``.
        project: optional projection $\Pi$ onto the strategy set (e.g. ``jnp.clip`` onto a
            box); identity when ``None``.

    Returns:
        The trajectory: ``x0``'s pytree with a leading axis of size ``num_steps + 1``
        (``x0`` first).

    Raises:
        ValueError: for an unknown ``method`` or ``num_steps < 1``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> J = jnp.array([[1.0, 10.0], [0.05, 1.0]])
        >>> traj = vf.game_flow(lambda x: J @ x, jnp.array([1.0, 1.0]), step=0.1, num_steps=50)
        >>> m_norm = jnp.sqrt(jnp.sum(jnp.array([1.0, 200.0]) * traj**2, -1))  # SGN metric
        >>> traj.shape, round(float(m_norm[-1] / m_norm[0]), 3)  # certified: <= 0.474
        ((51, 2), 0.148)
    """
    if method not in _METHODS:
        raise ValueError(f"method={method!r} must be one of {_METHODS}")
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, numbers.Integral)
        or (num_steps < 1)
    ):
        raise ValueError(f"num_steps={num_steps!r} must be an integer >= 1")
    proj = (lambda x: x) if project is None else project

    def euler(x):
        return _axpy(-step, pseudo_grad(x), x)

    def rk4(x):
        k1 = pseudo_grad(x)
        k2 = pseudo_grad(_axpy(-step / 2, k1, x))
        k3 = pseudo_grad(_axpy(-step / 2, k2, x))
        k4 = pseudo_grad(_axpy(-step, k3, x))
        incr = jax.tree.map(lambda a, b, c, d: (a + 2 * b + 2 * c + d) / 6, k1, k2, k3, k4)
        return _axpy(-step, incr, x)

    advance = euler if method == "euler" else rk4

    def body(x, _):
        x = proj(advance(x))
        return x, x

    _, xs = jax.lax.scan(body, x0, None, length=int(num_steps))
    return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), x0, xs)
