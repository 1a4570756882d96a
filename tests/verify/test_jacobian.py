"""jacobian_bounds: sampled Jacobians (jax.jacrev) always lie inside the bounds.

Random MLPs (ReLU, leaky ReLU, tanh, sigmoid, exact and tanh GELU), a small CNN and a
residual net; 2,000 uniform points of the box plus its vertices (all of them for the
3-input nets). At a zero-width box a smooth net's bounds are its Jacobian.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import verify as vf


def box_points(key, box, num):
    """``num`` uniform points of the box plus its vertices (at most 256 random ones)."""
    lo, hi = np.asarray(box.lower), np.asarray(box.upper)
    pts = jax.random.uniform(key, (num,) + lo.shape, lo.dtype, minval=lo, maxval=hi)
    d = lo.size
    if d <= 8:
        bits = (np.arange(2**d)[:, None] >> np.arange(d)[None]) & 1
    else:
        bits = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (256, d)))
    verts = np.where(bits.astype(bool), hi.reshape(-1), lo.reshape(-1)).reshape((-1,) + lo.shape)
    return jnp.concatenate([pts, jnp.asarray(verts, lo.dtype)])


def assert_inside(values, lower, upper, what):
    values, lower, upper = (np.asarray(v) for v in (values, lower, upper))
    worst = max((lower - values).max(), (values - upper).max())
    assert worst <= 1e-9 * (1 + np.abs(values).max()), f"{what}: bound violated by {worst:.3e}"


ACTS = {
    "relu": jax.nn.relu,
    "leaky_relu": jax.nn.leaky_relu,
    "tanh": jnp.tanh,
    "sigmoid": jax.nn.sigmoid,
    "gelu_tanh": jax.nn.gelu,
    "gelu_exact": lambda v: jax.nn.gelu(v, approximate=False),
}


def _dense(key, n_out, n_in, scale=1.0):
    k1, k2 = jax.random.split(key)
    w = scale * jax.random.normal(k1, (n_out, n_in)) / np.sqrt(n_in)
    return w, 0.3 * jax.random.normal(k2, (n_out,))


def mlp(key, act, sizes=(3, 6, 5, 2), scale=1.5):
    keys = jax.random.split(key, len(sizes) - 1)
    layers = [_dense(k, b, a, scale) for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]

    def fn(x):
        for w, b in layers[:-1]:
            x = act(w @ x + b)
        w, b = layers[-1]
        return w @ x + b

    return fn, layers


def cnn(key):
    k1, k2, k3 = jax.random.split(key, 3)
    kernel = jax.random.normal(k1, (2, 1, 3, 3)) / 3
    bias = 0.1 * jax.random.normal(k2, (2, 1, 1))
    w, b = _dense(k3, 3, 2 * 3 * 3)

    def fn(x):  # x: [1, 5, 5] (CHW)
        h = jax.lax.conv_general_dilated(x[None], kernel, (1, 1), "VALID")[0] + bias
        return w @ jax.nn.relu(h).reshape(-1) + b

    return fn


def residual(key):
    ks = jax.random.split(key, 4)
    (w1, b1), (w2, b2), (w3, b3), (w4, b4) = (
        _dense(ks[0], 4, 3, 2.0),
        _dense(ks[1], 4, 4, 2.0),
        _dense(ks[2], 4, 4, 2.0),
        _dense(ks[3], 3, 4),
    )

    def fn(x):
        h = jax.nn.relu(w1 @ x + b1)
        h = h + jax.nn.relu(w2 @ h + b2)  # skip connection: fan-out of h
        h = h + jnp.tanh(w3 @ h + b3)
        return w4 @ h + b4

    return fn


def check_jacobians(fn, box, jb, key, num=2_000):
    xs = box_points(key, box, num)
    jacs = jax.vmap(jax.jacrev(fn))(xs)
    assert jb.lower.shape == jacs.shape[1:]
    assert np.all(np.asarray(jb.lower) <= np.asarray(jb.upper))
    assert_inside(jacs, jb.lower[None], jb.upper[None], "sampled Jacobians")
    return jacs


@pytest.mark.parametrize("act", list(ACTS))
def test_mlp_sound(act, getkey):
    fn, _ = mlp(getkey(), ACTS[act])
    box = vf.Box.from_eps(jnp.array([0.3, -0.2, 0.5]), 0.3)
    methods = ("crown-ibp", "ibp", "crown") if act in ("relu", "tanh") else ("crown-ibp", "ibp")
    out = {m: vf.jacobian_bounds(fn, box, method=m) for m in methods}
    xs = box_points(getkey(), box, 2_000)
    jacs = jax.vmap(jax.jacrev(fn))(xs)
    for m, jb in out.items():
        assert jb.lower.shape == jacs.shape[1:]
        assert np.all(np.asarray(jb.lower) <= np.asarray(jb.upper))
        assert_inside(jacs, jb.lower[None], jb.upper[None], f"{m}: sampled Jacobians")
    # CROWN variants are intersected with IBP: never looser.
    for m in methods[::2]:
        assert np.all(out[m].lower >= out["ibp"].lower - 1e-12)
        assert np.all(out[m].upper <= out["ibp"].upper + 1e-12)


@pytest.mark.slow
def test_cnn_sound(getkey):
    fn = cnn(getkey())
    x0 = jax.random.uniform(getkey(), (1, 5, 5))
    box = vf.Box.from_eps(x0, 0.1)
    jb = vf.jacobian_bounds(fn, box)
    assert jb.lower.shape == (3, 1, 5, 5)
    check_jacobians(fn, box, jb, getkey())


def test_residual_sound(getkey):
    fn = residual(getkey())
    box = vf.Box.from_eps(jnp.array([0.1, 0.4, -0.3]), 0.3)
    for method in ("crown-ibp", "ibp"):
        check_jacobians(fn, box, vf.jacobian_bounds(fn, box, method=method), getkey())


def test_square_map_and_scalar_output(getkey):
    # fn: R^n -> R^n (a pseudo-gradient field) and a scalar fn (shape = input shape).
    fn, _ = mlp(getkey(), jnp.tanh, sizes=(3, 5, 3))
    box = vf.Box.from_eps(jnp.array([0.2, 0.1, -0.4]), 0.2)
    jb = vf.jacobian_bounds(fn, box)
    assert jb.lower.shape == (3, 3)
    check_jacobians(fn, box, jb, getkey())
    scalar = lambda x: jnp.sum(fn(x) ** 2)  # noqa: E731
    jb = vf.jacobian_bounds(scalar, box)
    assert jb.lower.shape == (3,)
    check_jacobians(scalar, box, jb, getkey())


@pytest.mark.parametrize("act", ["tanh", "sigmoid", "gelu_tanh", "gelu_exact"])
def test_zero_width_box_is_the_jacobian(act, getkey):
    fn, _ = mlp(getkey(), ACTS[act])
    x0 = jnp.array([0.3, -0.2, 0.5])
    jac = jax.jacrev(fn)(x0)
    for method in ("crown-ibp", "ibp"):
        jb = vf.jacobian_bounds(fn, vf.Box(x0, x0), method=method)
        np.testing.assert_allclose(jb.lower, jac, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(jb.upper, jac, rtol=1e-9, atol=1e-9)


def test_stable_relu_is_exact_and_unstable_is_clarke():
    w1 = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    w2 = jnp.array([[2.0, -3.0]])
    fn = lambda x: w2 @ jax.nn.relu(w1 @ x)  # noqa: E731
    # Unit 0 on (x0 > 0), unit 1 off (x1 < 0): exactly [2, 0].
    jb = vf.jacobian_bounds(fn, vf.Box(jnp.array([0.5, -1.0]), jnp.array([1.0, -0.5])))
    np.testing.assert_allclose(jb.lower, [[2.0, 0.0]])
    np.testing.assert_allclose(jb.upper, [[2.0, 0.0]])
    # Unit 1 unstable: its entry is the hull of {0, -3}.
    jb = vf.jacobian_bounds(fn, vf.Box(jnp.array([0.5, -1.0]), jnp.array([1.0, 1.0])))
    np.testing.assert_allclose(jb.lower, [[2.0, -3.0]])
    np.testing.assert_allclose(jb.upper, [[2.0, 0.0]])


def test_affine_fn_constant_jacobian():
    w = jnp.array([[1.0, 2.0], [3.0, -4.0]])
    jb = vf.jacobian_bounds(lambda x: w @ x + 1.0, vf.Box.from_eps(jnp.zeros(2), 1.0))
    np.testing.assert_allclose(jb.lower, w)
    np.testing.assert_allclose(jb.upper, w)


def test_crown_ibp_tighter_than_ibp_on_deep_relu(getkey):
    fn, _ = mlp(getkey(), jax.nn.relu, sizes=(3, 8, 8, 8, 2))
    box = vf.Box.from_eps(jnp.array([0.3, -0.2, 0.5]), 0.3)
    a = vf.jacobian_bounds(fn, box, method="ibp")
    b = vf.jacobian_bounds(fn, box, method="crown-ibp")
    check_jacobians(fn, box, b, getkey())
    assert float(jnp.sum(b.upper - b.lower)) < 0.9 * float(jnp.sum(a.upper - a.lower))


def test_jit_and_vmap_over_boxes(getkey):
    fn, _ = mlp(getkey(), jnp.tanh)
    centers = jax.random.normal(getkey(), (4, 3))
    boxes = vf.Box(centers - 0.1, centers + 0.1)
    batched = jax.jit(jax.vmap(lambda b: vf.jacobian_bounds(fn, b)))(boxes)
    for i in range(4):
        one = vf.jacobian_bounds(fn, vf.Box(boxes.lower[i], boxes.upper[i]))
        np.testing.assert_allclose(batched.lower[i], one.lower, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(batched.upper[i], one.upper, rtol=1e-10, atol=1e-12)


def test_bad_inputs():
    fn = lambda x: jnp.ones((2, 3)) @ x  # noqa: E731
    with pytest.raises(ValueError, match="lower <= upper"):
        vf.jacobian_bounds(fn, vf.Box(jnp.ones(3), jnp.zeros(3)))
    with pytest.raises(ValueError, match="box's shape"):
        vf.jacobian_bounds(fn, vf.Box(jnp.zeros(4), jnp.ones(4)))
    with pytest.raises(ValueError, match="method"):
        vf.jacobian_bounds(fn, vf.Box(jnp.zeros(3), jnp.ones(3)), method="lp")
    with pytest.raises(TypeError, match="single array"):
        vf.jacobian_bounds(lambda x: (x, x), vf.Box(jnp.zeros(3), jnp.ones(3)))
    with pytest.raises(NotImplementedError, match="lgamma"):
        vf.jacobian_bounds(jax.lax.lgamma, vf.Box(jnp.ones(3), 2 * jnp.ones(3)))


@pytest.mark.parametrize(
    "act, d",
    [
        (jnp.tanh, lambda z: 1 - jnp.tanh(z) ** 2),
        (jax.nn.sigmoid, lambda z: jax.nn.sigmoid(z) * (1 - jax.nn.sigmoid(z))),
    ],
)
def test_one_hidden_layer_matches_interval_formula(act, d, getkey):
    # J = W2 diag(s'(z)) W1 with z in the exact box of W1 x + b1: the derivative's exact
    # range times constants, summed, is what IBP must give (the derivative is one node).
    (w1, b1), (w2, _) = _dense(getkey(), 6, 3, 2.0), _dense(getkey(), 2, 6)
    fn = lambda x: w2 @ act(w1 @ x + b1)  # noqa: E731
    box = vf.Box.from_eps(jnp.array([0.3, -0.2, 0.5]), 0.4)
    zc, zr = w1 @ box.center + b1, jnp.abs(w1) @ box.radius
    zl, zu = zc - zr, zc + zr
    dmax = jnp.where((zl < 0) & (zu > 0), d(0.0), jnp.maximum(d(zl), d(zu)))
    dmin = jnp.minimum(d(zl), d(zu))
    prod = w2[:, :, None] * w1[None]  # [out, hidden, in]
    lo = jnp.sum(jnp.minimum(prod * dmin[:, None], prod * dmax[:, None]), axis=1)
    hi = jnp.sum(jnp.maximum(prod * dmin[:, None], prod * dmax[:, None]), axis=1)
    jb = vf.jacobian_bounds(fn, box, method="ibp")
    np.testing.assert_allclose(jb.lower, lo, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(jb.upper, hi, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "f",
    [
        jax.nn.gelu,
        lambda v: jax.nn.gelu(v, approximate=False),
        jax.nn.silu,
        jax.nn.softplus,
        jax.nn.elu,
    ],
    ids=["gelu_tanh", "gelu_exact", "silu", "softplus", "elu"],
)
def test_composite_activation_derivative_is_near_exact(f):
    # z * Phi(z), z * sigmoid(z), softplus, elu are one derivative node, bounded on pieces:
    # a dense grid of derivatives lies inside, and the overestimate is small.
    lo, hi = jnp.array([-3.0, -1.0, 0.5, -0.2]), jnp.array([3.0, 0.0, 2.0, -0.1])
    jb = vf.jacobian_bounds(f, vf.Box(lo, hi))
    off = ~np.eye(4, dtype=bool)
    assert np.all(np.asarray(jb.lower)[off] == 0) and np.all(np.asarray(jb.upper)[off] == 0)
    grid = jnp.linspace(lo, hi, 20_001)
    d = jax.vmap(jax.vmap(jax.grad(f)))(grid)
    low, high = jnp.diag(jb.lower), jnp.diag(jb.upper)
    assert_inside(d, low[None], high[None], "derivative grid")
    assert float(jnp.max(d.min(0) - low)) < 0.12 and float(jnp.max(high - d.max(0))) < 0.12


def test_flax_nnx_and_equinox_models(getkey):
    import equinox as eqx
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 6, rngs=rngs)
            self.l2 = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(nnx.gelu(self.l1(x)))

    nnx_net = Net(nnx.Rngs(0))
    eqx_net = eqx.nn.MLP(3, 2, 6, depth=2, activation=jax.nn.softplus, key=getkey())
    centers = jnp.array([[0.3, -0.2, 0.5], [-0.4, 0.1, 0.2]])
    boxes = vf.Box(centers - 0.3, centers + 0.3)
    for fn in (nnx_net, eqx_net):
        batched = jax.jit(jax.vmap(lambda b, fn=fn: vf.jacobian_bounds(fn, b)))(boxes)
        for i in range(2):
            box = vf.Box(boxes.lower[i], boxes.upper[i])
            jb = vf.Box(batched.lower[i], batched.upper[i])
            check_jacobians(fn, box, jb, getkey(), num=1_000)
