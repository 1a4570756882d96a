"""Tightness invariants that provably hold (and values computed independently).

Not tested on purpose (they are false in general, see reference/verify.md §4 and §6.4):
CROWN <= IBP elementwise (the adaptive ReLU lower slope loses to IBP on a lone unstable
neuron, checked below as a counterexample), ``intermediate="crown"`` <= ``"ibp"`` on the
final bounds, and monotonicity of CROWN in eps.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import verify as vf


def _random_relu_net(key, d=3, h=6, o=2):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w1, b1 = jax.random.normal(k1, (h, d)), 0.5 * jax.random.normal(k2, (h,))
    w2, b2 = jax.random.normal(k3, (o, h)), 0.5 * jax.random.normal(k4, (o,))
    return (w1, b1, w2, b2), lambda x: w2 @ jax.nn.relu(w1 @ x + b1) + b2


def test_auto_lirpa_toy_example():
    # auto_LiRPA examples/simple/toy.py: IBP [-6, 4], CROWN [-3, 3] (true range [-2, 1]).
    w1, w2 = jnp.array([[1.0, -1.0], [2.0, -1.0]]), jnp.array([[1.0, -1.0]])
    box = vf.Box(jnp.array([-1.0, -2.0]), jnp.array([2.0, 1.0]))

    def net(x):
        return w2 @ jax.nn.relu(w1 @ x)

    np.testing.assert_allclose(vf.ibp(net, box), [[-6.0], [4.0]])
    np.testing.assert_allclose(vf.crown(net, box), [[-3.0], [3.0]])
    np.testing.assert_allclose(vf.crown(net, box, intermediate="ibp"), [[-3.0], [3.0]])


def _crown_one_hidden_layer_numpy(params, lower, upper, spec):
    """CROWN for W2 relu(W1 x + b1) + b2 in plain numpy, minimised over box vertices."""
    w1, b1, w2, b2 = (np.asarray(p) for p in params)
    c, r = (lower + upper) / 2, (upper - lower) / 2
    zl, zu = w1 @ c + b1 - np.abs(w1) @ r, w1 @ c + b1 + np.abs(w1) @ r
    lo_slope, up_slope, up_off = np.zeros_like(zl), np.zeros_like(zl), np.zeros_like(zl)
    for j in range(len(zl)):
        if zl[j] >= 0:
            lo_slope[j] = up_slope[j] = 1.0
        elif zu[j] > 0:
            up_slope[j] = zu[j] / (zu[j] - zl[j])
            up_off[j] = -up_slope[j] * zl[j]
            lo_slope[j] = 1.0 if zu[j] > -zl[j] else 0.0
    verts = np.array(list(itertools.product(*zip(lower, upper, strict=True))))
    lows, highs = [], []
    for row in np.asarray(spec):
        out = []
        for sign in (1.0, -1.0):
            lam = sign * row @ w2
            a = np.where(lam >= 0, lam * lo_slope, lam * up_slope)
            off = np.where(lam >= 0, 0.0, lam * up_off).sum() + sign * row @ b2
            # The linear function a (W1 x + b1) + off is minimised at a vertex of the box.
            out.append(min(a @ (w1 @ v + b1) + off for v in verts))
        lows.append(out[0])
        highs.append(-out[1])
    return np.array(lows), np.array(highs)


@pytest.mark.parametrize("seed", range(4))
def test_one_hidden_layer_matches_hand_computation(seed, getkey):
    params, net = _random_relu_net(jax.random.key(seed))
    box = vf.Box.from_eps(jax.random.normal(getkey(), (3,)), 0.6)
    spec = jax.random.normal(getkey(), (3, 2))
    want_lo, want_hi = _crown_one_hidden_layer_numpy(
        params, np.asarray(box.lower), np.asarray(box.upper), spec
    )
    for mode in ("crown", "ibp"):  # pre-activations of one affine layer: both modes agree
        got = vf.crown(net, box, spec=spec, intermediate=mode)
        np.testing.assert_allclose(got.lower, want_lo, rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(got.upper, want_hi, rtol=1e-10, atol=1e-10)


def test_crown_is_not_always_tighter_than_ibp():
    # One unstable ReLU on [-1, 2]: CROWN's adaptive lower line y >= z gives -1, IBP gives 0.
    box = vf.Box(jnp.array([-1.0]), jnp.array([2.0]))
    assert vf.crown(jax.nn.relu, box).lower[0] == -1.0
    assert vf.ibp(jax.nn.relu, box).lower[0] == 0.0


def _affine_net(key, stop_gradient=jax.lax.stop_gradient):
    ks = jax.random.split(key, 5)
    w1 = jax.random.normal(ks[0], (4, 6))
    kernel = jax.random.normal(ks[1], (2, 1, 2, 2))
    w2 = jax.random.normal(ks[2], (3, 4 + 2 * 2 * 2))
    b = jax.random.normal(ks[3], (3,))

    def fn(x):  # x: [6]
        h = w1 @ x
        img = jnp.pad(x.reshape(1, 2, 3), ((0, 0), (0, 1), (0, 0)))  # [1, 3, 3]
        conv = jax.lax.conv_general_dilated(img[None], kernel, (1, 1), "VALID")[0]
        z = jnp.concatenate([h - 0.5 * jnp.sum(x), conv.reshape(-1)])
        z = z + jnp.roll(z, 1)[::-1] / 3.0  # residual-style fan-out of z
        z = z - stop_gradient(jnp.cumsum(z)) / 5.0  # stop_gradient has a zero VJP
        z = (
            jnp.where(jnp.arange(12) % 2 == 0, z, -z)
            + z[jnp.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])]
        )
        z = (
            z
            + jax.lax.dynamic_slice(jnp.tile(z, 2), (3,), (12,))
            + jnp.mean(z.reshape(3, 4).T, 1).sum()
        )
        return w2 @ z + b - x[:3] * 2.0

    return fn


def test_affine_networks_are_bounded_exactly(getkey):
    key = getkey()
    fn = _affine_net(key)
    box = vf.Box.from_eps(jax.random.normal(getkey(), (6,)), 0.7)
    jac = jax.jacfwd(_affine_net(key, stop_gradient=lambda v: v))(box.center)
    mid = fn(box.center)
    rad = jnp.abs(jac) @ box.radius
    for mode in ("crown", "ibp"):
        out = vf.crown(fn, box, intermediate=mode)
        np.testing.assert_allclose(out.lower, mid - rad, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out.upper, mid + rad, rtol=1e-12, atol=1e-12)
        lin = vf.linear_bounds(fn, box)
        np.testing.assert_allclose(lin.lA, jac, atol=1e-12)
        np.testing.assert_allclose(lin.uA, jac, atol=1e-12)
    iv = vf.ibp(fn, box)  # sound, but not exact for a composition of affine maps
    assert jnp.all(iv.lower <= mid - rad + 1e-12) and jnp.all(iv.upper >= mid + rad - 1e-12)
    assert jnp.any(iv.upper > mid + rad + 1e-6)


@pytest.mark.parametrize("act", [jax.nn.relu, jnp.tanh, jax.nn.gelu, jax.nn.softmax])
def test_zero_width_box_gives_the_point_value(act, getkey):
    params, _ = _random_relu_net(getkey())
    w1, b1, w2, b2 = params

    def net(x):
        return w2 @ act(w1 @ x + b1) + b2

    x0 = jax.random.normal(getkey(), (3,))
    box = vf.Box(x0, x0)
    for out in (vf.ibp(net, box), vf.crown(net, box), vf.crown(net, box, intermediate="ibp")):
        np.testing.assert_allclose(out.lower, net(x0), rtol=1e-10, atol=1e-10)
        np.testing.assert_allclose(out.upper, net(x0), rtol=1e-10, atol=1e-10)


def test_ibp_is_monotone_in_eps(getkey):
    _, net = _random_relu_net(getkey())
    x0 = jax.random.normal(getkey(), (3,))
    prev = None
    for eps in (0.0, 0.1, 0.3, 0.9):
        out = vf.ibp(lambda x: jnp.tanh(net(x)), vf.Box.from_eps(x0, eps))
        if prev is not None:
            assert jnp.all(out.lower <= prev.lower) and jnp.all(out.upper >= prev.upper)
        prev = out


def test_crown_intermediate_bounds_never_looser_than_ibp_for_one_layer(getkey):
    # For a single hidden layer the pre-activations are affine in x: both are exact.
    params, net = _random_relu_net(getkey())
    box = vf.Box.from_eps(jax.random.normal(getkey(), (3,)), 0.5)
    a, b = vf.crown(net, box), vf.crown(net, box, intermediate="ibp")
    np.testing.assert_allclose(a.lower, b.lower, rtol=1e-12)
    np.testing.assert_allclose(a.upper, b.upper, rtol=1e-12)


@pytest.mark.parametrize("mode", ["crown", "ibp"])
def test_linear_bounds_concretise_to_crown_box(mode, getkey):
    _, inner = _random_relu_net(getkey(), o=4)

    def net(x):
        return jnp.tanh(inner(x))[:3] * 2.0

    box = vf.Box.from_eps(jax.random.normal(getkey(), (3,)), 0.4)
    lin = vf.linear_bounds(net, box, intermediate=mode)
    out = vf.crown(net, box, intermediate=mode)
    c, r = box.center, box.radius
    np.testing.assert_allclose(lin.lA @ c - jnp.abs(lin.lA) @ r + lin.lb, out.lower, rtol=1e-12)
    np.testing.assert_allclose(lin.uA @ c + jnp.abs(lin.uA) @ r + lin.ub, out.upper, rtol=1e-12)


def test_spec_bound_is_at_least_the_interval_combination(getkey):
    # One backward pass per spec row picks the relaxation by the sign of the combined
    # coefficient, so it is never looser than combining the per-output intervals.
    _, net = _random_relu_net(getkey(), o=3)
    box = vf.Box.from_eps(jax.random.normal(getkey(), (3,)), 0.5)
    spec = jax.random.normal(getkey(), (5, 3))
    per_out = vf.crown(net, box)
    combined = jnp.maximum(spec, 0) @ per_out.lower + jnp.minimum(spec, 0) @ per_out.upper
    assert jnp.all(vf.crown(net, box, spec=spec).lower >= combined - 1e-10)
