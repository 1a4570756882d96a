r"""PGD attack on a linear output property: search a box for a counterexample."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linjax.verify._box import Box, check_box
from linjax.verify._property import check_property, margin_fn


class AttackResult(NamedTuple):
    """Best point found and its margin (``margin <= 0``: the property fails at ``x``).

    Attributes:
        x: a point of the box, shaped like ``box.lower``.
        margin: scalar $m(x) = \\min_g \\max_{k \\in g} (c_k^\top f(x) - t_k)$.
    """

    x: jax.Array
    margin: jax.Array


def _check_int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def pgd(margin: Callable, box: Box, x0: jax.Array, steps: int, step_size: jax.Array):
    r"""Signed-gradient descent on ``margin`` from each start ``x0`` ``[R, *shape]``.

    Step $t$ moves by ``step_size * (1 - t / steps)`` along $-\mathrm{sign}(\nabla m)$
    and projects onto the box; the best point of every run is kept. Returns
    ``(xs [R, *shape], margins [R])``. Traceable.
    """
    value_grad = jax.value_and_grad(margin)

    def run(x):
        def body(carry, t):
            x, bx, bm = carry
            m, g = value_grad(x)
            better = m < bm
            bx = jnp.where(better, x, bx)
            bm = jnp.where(better, m, bm)
            g = jnp.where(jnp.isfinite(g), g, 0)
            x = jnp.clip(x - step_size * (1 - t / steps) * jnp.sign(g), box.lower, box.upper)
            return (x, bx, bm), None

        m0 = jnp.asarray(jnp.inf, box.lower.dtype)
        (x, bx, bm), _ = jax.lax.scan(body, (x, x, m0), jnp.arange(steps, dtype=box.lower.dtype))
        m = margin(x)
        better = m < bm
        return jnp.where(better, x, bx), jnp.where(better, m, bm)

    return jax.vmap(run)(x0)


def starts(key: jax.Array, box: Box, num: int) -> jax.Array:
    """The box centre followed by ``num - 1`` uniform points of the box: ``[num, *shape]``."""
    pts = jax.random.uniform(
        key, (num - 1,) + box.lower.shape, box.lower.dtype, box.lower, box.upper
    )
    return jnp.concatenate([box.center[None], pts])


def pgd_attack(
    fn: Callable[[jax.Array], jax.Array],
    box: Box,
    spec: jax.typing.ArrayLike,
    threshold: jax.typing.ArrayLike = 0.0,
    *,
    key: jax.Array,
    steps: int = 50,
    restarts: int = 8,
    step_size: jax.typing.ArrayLike | None = None,
    groups: jax.typing.ArrayLike | None = None,
) -> AttackResult:
    r"""Search ``box`` for an ``x`` with ``spec @ fn(x) > threshold`` false (a counterexample).

    Minimises the property margin $m(x) = \min_g \max_{k\in g}(c_k^\top f(x) - t_k)$ (all
    rows must exceed their thresholds unless ``groups`` makes some rows alternatives; see
    :func:`branch_and_bound`) by projected signed-gradient descent (PGD, Madry et al.
    2018) from the box centre and ``restarts - 1`` uniform random points (drawn from
    ``key``), with a linearly decaying step. Returns the best point of all runs. It can
    only *find* violations: ``margin > 0`` proves nothing.

    Args:
        fn: a function from one array shaped like ``box.lower`` to one real array.
        box: the input set.
        spec: ``[S, n_out]`` (or ``[S, *out_shape]``) rows $c_k$.
        threshold: scalar or ``[S]`` thresholds $t_k$.
        key: a ``jax.random`` key (the restarts are reproducible).
        steps: PGD steps per restart (integer ``>= 1``).
        restarts: number of starting points (integer ``>= 1``; the first is the centre).
        step_size: initial step, scalar or per coordinate; default ``4 (u - l) / steps``.
        groups: optional ``[S]`` integer group ids (rows in one group are alternatives).

    Returns:
        :class:`AttackResult` ``(x, margin)``; ``x`` lies in the box and ``margin <= 0``
        means the property is violated at ``x``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> box = vf.Box(jnp.array([-1.0]), jnp.array([1.0]))
        >>> res = vf.pgd_attack(jnp.square, box, jnp.ones((1, 1)), 0.5, key=jax.random.key(0))
        >>> round(float(res.margin), 3)  # x = 0 gives 0 - 0.5
        -0.5
    """
    box = check_box(box)
    steps = _check_int("steps", steps, 1)
    restarts = _check_int("restarts", restarts, 1)
    like = jax.ShapeDtypeStruct(box.lower.shape, box.lower.dtype)
    prop = check_property(fn, like, spec, threshold, groups)
    if step_size is None:
        step = 4 * (box.upper - box.lower) / steps
    else:
        step = jnp.asarray(step_size, box.lower.dtype)
        if not np.all(np.asarray(step) >= 0):
            raise ValueError(f"step_size must be >= 0, got {step_size!r}")
    margin = margin_fn(fn, prop)

    @jax.jit
    def run(key, box, step):
        xs, ms = pgd(margin, box, starts(key, box, restarts), steps, step)
        i = jnp.argmin(jnp.where(jnp.isnan(ms), jnp.inf, ms))
        return xs[i], ms[i]

    x, m = run(key, box, step)
    return AttackResult(x, m)
