"""Every built-in relaxation holds on its whole interval (dense grids, float64).

Each elementwise function is bounded on many intervals at once (one per input
coordinate: crossing 0, one-sided, tiny, wide and degenerate), and the per-coordinate
lines returned by ``linear_bounds`` (diagonal of ``lA``/``uA``) are checked on a dense
grid of each interval, as are the IBP intervals.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from linjax import verify as vf

GRID = 2001


def _intervals(key, n=120, positive=False):
    k1, k2 = jax.random.split(key)
    centre = 3.0 * jax.random.normal(k1, (n,))
    width = jnp.exp(jax.random.uniform(k2, (n,), minval=-6.0, maxval=2.0))
    lower, upper = centre - width, centre + width
    extra_l = jnp.array([-1.0, 0.0, -2.0, 0.5, -1e-7, 0.0, -8.0, 1e-3])
    extra_u = jnp.array([1.0, 0.0, 3.0, 0.5, 1e-7, 2.0, 8.0, 1e-3])
    lower, upper = jnp.concatenate([lower, extra_l]), jnp.concatenate([upper, extra_u])
    if positive:  # strictly inside the domain
        shift = jnp.maximum(0.0, 0.05 - lower)
        lower, upper = lower + shift, upper + shift
    return vf.Box(lower, upper)


UNARY = {
    "relu": (jax.nn.relu, False),
    "leaky_relu": (lambda x: jax.nn.leaky_relu(x, 0.1), False),
    "leaky_concave": (lambda x: jnp.where(x >= 0, x, 2.0 * x), False),
    "abs": (jnp.abs, False),
    "tanh": (jnp.tanh, False),
    "sigmoid": (jax.nn.sigmoid, False),
    "erf": (lax.erf, False),
    "erfc": (lax.erfc, False),
    "atan": (jnp.arctan, False),
    "asinh": (jnp.arcsinh, False),
    "sinh": (lambda x: jnp.sinh(0.3 * x), False),
    "exp": (lambda x: jnp.exp(0.5 * x), False),
    "expm1": (lambda x: jnp.expm1(0.5 * x), False),
    "cosh": (lambda x: jnp.cosh(0.5 * x), False),
    "square": (jnp.square, False),
    "cube": (lambda x: x**3, False),
    "pow4": (lambda x: x**4, False),
    "clip": (lambda x: jnp.clip(x, -1.0, 2.0), False),
    "relu6": (jax.nn.relu6, False),
    "max_const": (lambda x: jnp.maximum(x, 0.3), False),
    "min_const": (lambda x: jnp.minimum(-0.2, x), False),
    "gelu_exact": (lambda x: jax.nn.gelu(x, approximate=False), False),
    "softplus": (jax.nn.softplus, False),
    "log": (jnp.log, True),
    "log1p": (jnp.log1p, True),
    "sqrt": (jnp.sqrt, True),
    "rsqrt": (lax.rsqrt, True),
    "reciprocal": (lambda x: 1.0 / x, True),
    "inv_square": (lambda x: x**-2, True),
}


@pytest.mark.parametrize("name", list(UNARY))
def test_elementwise_relaxation_holds_on_interval(name, getkey):
    f, positive = UNARY[name]
    box = _intervals(getkey(), positive=positive)
    lin = vf.linear_bounds(f, box)
    iv = vf.ibp(f, box)
    aL, aU = jnp.diagonal(lin.lA), jnp.diagonal(lin.uA)
    # Elementwise: no coupling between coordinates.
    np.testing.assert_array_equal(np.asarray(lin.lA - jnp.diag(aL)), 0.0)
    t = jnp.linspace(0.0, 1.0, GRID)[:, None]
    xs = box.lower + t * (box.upper - box.lower)  # [GRID, n]
    ys = f(xs)
    scale = 1 + jnp.abs(ys)
    assert jnp.all(aL * xs + lin.lb <= ys + 1e-9 * scale), name
    assert jnp.all(ys <= aU * xs + lin.ub + 1e-9 * scale), name
    assert jnp.all((iv.lower <= ys + 1e-9 * scale) & (ys <= iv.upper + 1e-9 * scale)), name
    assert jnp.all(jnp.isfinite(lin.lb) & jnp.isfinite(lin.ub))


def test_s_shaped_crossing_uses_tangents_and_is_tighter_than_ibp_hull(getkey):
    # On [-3, 1], tanh's lower chord is not sound (tanh is convex below 0); the relaxation
    # must switch to a tangent and still be tighter than the constant IBP lines on average.
    box = vf.Box(jnp.array([-3.0]), jnp.array([1.0]))
    lin = vf.linear_bounds(jnp.tanh, box)
    xs = jnp.linspace(-3.0, 1.0, 4001)
    low = lin.lA[0, 0] * xs + lin.lb[0]
    chord = jnp.tanh(-3.0) + (jnp.tanh(1.0) - jnp.tanh(-3.0)) / 4.0 * (xs + 3.0)
    assert jnp.all(low <= jnp.tanh(xs) + 1e-12)
    assert jnp.any(chord > jnp.tanh(xs) + 1e-3)  # the chord would have been unsound
    assert jnp.mean(jnp.tanh(xs) - low) < jnp.mean(jnp.tanh(xs) - jnp.tanh(-3.0))


BINARY = {
    "mul": lambda x, y: x * y,
    "max": jnp.maximum,
    "min": jnp.minimum,
    "div": lambda x, y: x / (2.5 + y),
    "const_div": lambda x, y: 3.0 / (2.5 + y) + 0 * x,
}


@pytest.mark.parametrize("name", list(BINARY))
def test_two_argument_relaxation_holds_on_box(name, getkey):
    g = BINARY[name]
    n = 64
    bx = _intervals(getkey(), n - 8)
    by = vf.Box(jnp.clip(bx.lower[::-1], -2.0, 2.0), jnp.clip(bx.upper[::-1], -2.0, 2.0))
    box = vf.Box(jnp.stack([bx.lower, by.lower]), jnp.stack([bx.upper, by.upper]))

    def f(z):
        return g(z[0], z[1])

    lin = vf.linear_bounds(f, box)  # lA: [n, 2, n]
    idx = jnp.arange(n)
    ax, ay = lin.lA[idx, 0, idx], lin.lA[idx, 1, idx]
    ux, uy = lin.uA[idx, 0, idx], lin.uA[idx, 1, idx]
    t = jax.random.uniform(getkey(), (3000, 2, n))
    corners = jnp.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=t.dtype)[:, :, None]
    t = jnp.concatenate([t, jnp.broadcast_to(corners, (4, 2, n))])
    zs = box.lower + t * (box.upper - box.lower)
    ys = jax.vmap(f)(zs)
    scale = 1 + jnp.abs(ys)
    low = ax * zs[:, 0] + ay * zs[:, 1] + lin.lb
    high = ux * zs[:, 0] + uy * zs[:, 1] + lin.ub
    assert jnp.all(low <= ys + 1e-9 * scale) and jnp.all(ys <= high + 1e-9 * scale)
    iv = vf.ibp(f, box)
    assert jnp.all((iv.lower <= ys + 1e-9 * scale) & (ys <= iv.upper + 1e-9 * scale))


def test_square_of_one_variable_is_not_a_product_of_independent_factors():
    box = vf.Box(jnp.array([-1.0]), jnp.array([2.0]))
    out = vf.ibp(lambda x: x * x, box)
    np.testing.assert_allclose(out.lower, 0.0)  # McCormick on independent factors gives -2
    np.testing.assert_allclose(out.upper, 4.0)


def test_poles_give_infinite_not_nan_bounds():
    box = vf.Box(jnp.array([-1.0, 0.0]), jnp.array([1.0, 1.0]))
    out = vf.crown(lambda x: 1.0 / x, box)
    assert jnp.all(jnp.isinf(out.lower) & jnp.isinf(out.upper))
    out = vf.crown(jnp.log, box)
    assert not jnp.any(jnp.isnan(out.lower)) and not jnp.any(jnp.isnan(out.upper))
    assert jnp.all(jnp.isneginf(out.lower))
