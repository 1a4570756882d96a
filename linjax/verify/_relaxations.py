r"""Linear relaxations of scalar functions on an interval $[l, u]$ (elementwise arrays).

Every function here returns lines $a^L x + c^L \le f(x) \le a^U x + c^U$ valid on all of
$[l, u]$, as arrays ``(aL, cL, aU, cU)`` of the broadcast shape of ``l`` and ``u``. They
are written without data-dependent control flow (``where`` and fixed-length
``fori_loop`` only), so they run under ``jit``/``vmap``/``grad``; denominators are made
safe so that no NaN appears in forward or reverse mode for degenerate intervals
($l = u$), where chords fall back to the tangent at the point (exact there).

The shapes handled (CROWN, Zhang et al. 2018; auto_LiRPA's ``BoundSShaped``):

* convex $f$: upper = chord, lower = tangent at the midpoint; concave: the mirror image;
* S-shaped $f$ (convex on $(-\infty, 0]$, concave on $[0, \infty)$: tanh, logistic, erf,
  atan, asinh) on an interval crossing 0: the lower line is the chord if it lies below $f$
  ($f'(l) > k$), else the tangent at $\min(d_L, m)$ where $d_L \le 0$ is the point whose
  tangent passes through $(u, f(u))$ (found by bisection keeping the sound side); the
  upper line is the same construction on $-f(-x)$;
* reverse-S $f$ (concave then convex: $x^3$, erfc) by negation of an S-shaped one;
* piecewise-linear $f(x) = \text{right}\cdot x$ for $x \ge 0$ and $\text{left}\cdot x$
  below (ReLU, leaky ReLU, abs): the chord on one side and a line through the kink on the
  other, with CROWN's adaptive slope (the slope of the longer side);
* products $xy$ of two intervals: McCormick planes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

Fn = Callable[[jax.Array], jax.Array]

#: Bisection steps for S-shaped tangent points (the interval shrinks 2**-60: exact in f64).
BISECTION_STEPS = 60


class PivotFreedom(NamedTuple):
    """Where a relaxation has a free slope (alpha-CROWN hook).

    At ``crossing`` elements the line through the pivot ``(px, py)`` may take any slope in
    ``[slope_min, slope_max]``; it is the lower line where ``convex`` and the upper line
    elsewhere. ``init`` is the slope CROWN chose.
    """

    convex: jax.Array
    crossing: jax.Array
    slope_min: jax.Array
    slope_max: jax.Array
    px: jax.Array
    py: jax.Array
    init: jax.Array


def _safe_width(l: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    w = u - l
    ok = w > 0
    return ok, jnp.where(ok, w, 1)


def tangent(f: Fn, df: Fn, t: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Slope and offset of the tangent of ``f`` at ``t``."""
    a = df(t)
    return a, f(t) - a * t


def chord(f: Fn, df: Fn, l: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Slope and offset of the chord of ``f`` on ``[l, u]`` (the tangent if ``l == u``)."""
    ok, w = _safe_width(l, u)
    fl, fu = f(l), f(u)
    k = jnp.where(ok, (fu - fl) / w, df(l))
    return k, fl - k * l


def convex(f: Fn, df: Fn, l: jax.Array, u: jax.Array):
    """``(aL, cL, aU, cU)`` for convex ``f``: tangent at the midpoint below, chord above."""
    aL, cL = tangent(f, df, (l + u) / 2)
    aU, cU = chord(f, df, l, u)
    return aL, cL, aU, cU


def concave(f: Fn, df: Fn, l: jax.Array, u: jax.Array):
    """``(aL, cL, aU, cU)`` for concave ``f``: chord below, tangent at the midpoint above."""
    aL, cL = chord(f, df, l, u)
    aU, cU = tangent(f, df, (l + u) / 2)
    return aL, cL, aU, cU


def s_shaped_lower(f: Fn, df: Fn, l: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
    r"""Lower line of an S-shaped ``f`` (convex for $x \le 0$, concave for $x \ge 0$).

    With $\varphi(d) = f(d) + f'(d)(u - d) - f(u)$ (how far the tangent at $d$ passes
    above $(u, f(u))$), the tangent at any $d \le 0$ with $\varphi(d) \le 0$ is below $f$
    on $[l, u]$: below on the convex part by convexity, and on the concave part $f$ minus
    the line is concave, so it is smallest at $0$ or $u$, where it is $\ge 0$. $\varphi$ is
    increasing on $(-\infty, 0]$; if $\varphi(l) \ge 0$ the chord lies below $f$ instead.
    Bisection keeps the endpoint with $\varphi \le 0$, so the result is sound whatever the
    number of steps; the smoothing choice $\min(d_L, m)$ follows auto_LiRPA.
    """
    fu = f(u)
    k, ck = chord(f, df, l, u)

    def phi(d):
        return f(d) + df(d) * (u - d) - fu

    use_tangent = (l < 0) & (phi(l) < 0)

    def step(_, lohi):
        lo, hi = lohi
        mid = (lo + hi) / 2
        ok = phi(mid) <= 0
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = lax.fori_loop(0, BISECTION_STEPS, step, (l, jnp.minimum(u, 0)))
    # The bisection path has the wrong derivative (it moves with the bracket, not with
    # the root). Re-attach the implicit-function derivative dd = -dphi / phi'(d) with a
    # term that is exactly zero in value, so the bound (and its soundness) is unchanged.
    lo = lax.stop_gradient(lo)
    value, slope = jax.jvp(phi, (lo,), (jnp.ones_like(lo),))
    slope = lax.stop_gradient(slope)
    ok = slope > 0
    lo = lo - jnp.where(ok, (value - lax.stop_gradient(value)) / jnp.where(ok, slope, 1), 0)
    t = jnp.minimum(lo, (l + u) / 2)
    aT, cT = tangent(f, df, t)
    return jnp.where(use_tangent, aT, k), jnp.where(use_tangent, cT, ck)


def s_shaped(f: Fn, df: Fn, l: jax.Array, u: jax.Array):
    """``(aL, cL, aU, cU)`` for an S-shaped ``f``; the upper line reflects ``-f(-x)``."""
    aL, cL = s_shaped_lower(f, df, l, u)
    # g(x) = -f(-x) is S-shaped too; g >= a x + c on [-u, -l] gives f(y) <= a y - c.
    aU, cU = s_shaped_lower(lambda x: -f(-x), lambda x: df(-x), -u, -l)
    return aL, cL, aU, -cU


def reverse_s_shaped(f: Fn, df: Fn, l: jax.Array, u: jax.Array):
    """``(aL, cL, aU, cU)`` for ``f`` concave on ``x <= 0`` and convex on ``x >= 0``."""
    aL, cL, aU, cU = s_shaped(lambda x: -f(x), lambda x: -df(x), l, u)
    return -aU, -cU, -aL, -cL


def piecewise_linear(l: jax.Array, u: jax.Array, left, right):
    r"""Relaxation of $f(x) = \text{right}\cdot x$ ($x \ge 0$), $\text{left}\cdot x$ ($x < 0$).

    Stable intervals are exact. On a crossing interval the chord is the upper line if
    $f$ is convex (left <= right) and the lower line otherwise; the other line goes
    through the kink $(0, 0)$ with the slope of the longer side (CROWN's adaptive choice:
    for ReLU, slope 1 iff $u > -l$).

    Returns:
        ``((aL, cL, aU, cU), PivotFreedom)``.
    """
    left = jnp.asarray(left, l.dtype)
    right = jnp.asarray(right, l.dtype)
    shape = jnp.broadcast_shapes(l.shape, u.shape, left.shape, right.shape)
    l, u, left, right = (jnp.broadcast_to(v, shape) for v in (l, u, left, right))
    ok, w = _safe_width(l, u)
    k = jnp.where(ok, (right * u - left * l) / w, right)
    ck = l * (left - k)
    pos, neg = l >= 0, u <= 0
    crossing = ~pos & ~neg
    is_convex = left <= right
    pivot = jnp.where(u > -l, right, left)
    zero = jnp.zeros_like(l)
    exact = jnp.where(pos, right, left)
    aL = jnp.where(crossing, jnp.where(is_convex, pivot, k), exact)
    cL = jnp.where(crossing & ~is_convex, ck, zero)
    aU = jnp.where(crossing, jnp.where(is_convex, k, pivot), exact)
    cU = jnp.where(crossing & is_convex, ck, zero)
    freedom = PivotFreedom(
        convex=is_convex,
        crossing=crossing,
        slope_min=jnp.minimum(left, right),
        slope_max=jnp.maximum(left, right),
        px=zero,
        py=zero,
        init=pivot,
    )
    return (aL, cL, aU, cU), freedom


def mccormick(lx: jax.Array, ux: jax.Array, ly: jax.Array, uy: jax.Array):
    r"""McCormick planes for $xy$ on $[l_x, u_x] \times [l_y, u_y]$.

    $(x - l_x)(y - l_y) \ge 0$ gives $xy \ge l_y x + l_x y - l_x l_y$ and
    $(x - l_x)(y - u_y) \le 0$ gives $xy \le u_y x + l_x y - l_x u_y$ (auto_LiRPA's
    ``BoundMul`` choice).

    Returns:
        ``((aLx, aLy), cL, (aUx, aUy), cU)``.
    """
    return (ly, lx), -lx * ly, (uy, lx), -lx * uy
