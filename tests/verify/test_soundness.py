"""Soundness against sampling: every sampled output lies inside IBP / CROWN / CROWN-IBP bounds.

For each network, 10,000 uniform points of the input box plus its vertices (all of them
for small inputs, 1024 random ones otherwise) are pushed through the network and must
land inside the bounds (1e-9 relative slack), for the identity spec and a random spec.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from linjax import verify as vf

METHODS = {
    "ibp": lambda fn, box, spec=None: vf.ibp(fn, box),
    "crown": lambda fn, box, spec=None: vf.crown(fn, box, spec=spec),
    "crown-ibp": lambda fn, box, spec=None: vf.crown(fn, box, spec=spec, intermediate="ibp"),
}


def _dense(key, n_out, n_in, scale=1.0):
    k1, k2 = jax.random.split(key)
    w = scale * jax.random.normal(k1, (n_out, n_in)) / np.sqrt(n_in)
    return w, 0.3 * jax.random.normal(k2, (n_out,))


def mlp(act, sizes=(3, 6, 5, 2)):
    def build(key):
        layers = [
            _dense(k, b, a, 2.0)
            for k, a, b in zip(
                jax.random.split(key, len(sizes) - 1), sizes[:-1], sizes[1:], strict=True
            )
        ]

        def fn(x):
            for w, b in layers[:-1]:
                x = act(w @ x + b)
            w, b = layers[-1]
            return w @ x + b

        return fn, jnp.array([0.3, -0.2, 0.5]), 0.4

    return build


def cnn(key):
    k1, k2, k3 = jax.random.split(key, 3)
    kernel = jax.random.normal(k1, (2, 1, 3, 3)) / 3
    bias = 0.1 * jax.random.normal(k2, (2, 1, 1))
    w, b = _dense(k3, 3, 2 * 3 * 3)

    def fn(x):  # x: [1, 5, 5] (CHW)
        h = jax.lax.conv_general_dilated(x[None], kernel, (1, 1), "VALID")[0] + bias
        return w @ jax.nn.relu(h).reshape(-1) + b

    return fn, jax.random.uniform(jax.random.fold_in(key, 9), (1, 5, 5)), 0.1


def residual(key):
    ks = jax.random.split(key, 4)
    (w1, b1), (w2, b2), (w3, b3), (w4, b4) = (
        _dense(ks[0], 4, 3, 2.0),
        _dense(ks[1], 4, 4, 2.0),
        _dense(ks[2], 4, 4, 2.0),
        _dense(ks[3], 2, 4),
    )

    def fn(x):
        h = jax.nn.relu(w1 @ x + b1)
        h = h + jax.nn.relu(w2 @ h + b2)  # skip connection: fan-out of h
        h = h + jnp.tanh(w3 @ h + b3)
        return w4 @ h + b4

    return fn, jnp.array([0.1, 0.4, -0.3]), 0.3


def softmax_net(key):
    (w1, b1), (w2, b2) = _dense(key, 4, 3, 2.0), _dense(jax.random.fold_in(key, 1), 2, 4)

    def fn(x):
        return w2 @ jax.nn.softmax(w1 @ x + b1) + b2

    return fn, jnp.array([0.2, 0.1, -0.4]), 0.2


def layer_norm_net(key):
    (w1, b1), (w2, b2) = _dense(key, 4, 3, 2.0), _dense(jax.random.fold_in(key, 1), 2, 4)

    def fn(x):
        h = w1 @ x + b1
        mu = jnp.mean(h)
        var = jnp.mean(jnp.square(h - mu))
        return w2 @ jax.nn.relu((h - mu) * jax.lax.rsqrt(var + 1e-3)) + b2

    return fn, jnp.array([0.2, 0.1, -0.4]), 0.1


def product_net(key):
    ks = jax.random.split(key, 3)
    (w1, b1), (w2, b2), (w3, b3) = (
        _dense(ks[0], 4, 3, 2.0),
        _dense(ks[1], 4, 3, 2.0),
        _dense(ks[2], 2, 4),
    )

    def fn(x):  # gated branch product (as in GLU / SiLU-style gates)
        return w3 @ (jnp.tanh(w1 @ x + b1) * jax.nn.sigmoid(w2 @ x + b2)) + b3

    return fn, jnp.array([0.2, 0.1, -0.4]), 0.4


def division_net(key):
    (w1, b1), (w2, b2) = _dense(key, 4, 3, 2.0), _dense(jax.random.fold_in(key, 1), 2, 4)

    def fn(x):  # x / (1 + x^2) style ratios and a max-pool-like reduction
        h = w1 @ x + b1
        r = h / (1.0 + jnp.square(h)) + jnp.max(h) - jnp.min(h)
        return w2 @ r + b2

    return fn, jnp.array([0.2, 0.1, -0.4]), 0.3


def nnx_mlp(key):
    rngs = nnx.Rngs(int(jax.random.randint(key, (), 0, 1000)))
    model = nnx.Sequential(
        nnx.Linear(3, 6, rngs=rngs, param_dtype=jnp.float64),
        nnx.relu,
        nnx.Linear(6, 6, rngs=rngs, param_dtype=jnp.float64),
        nnx.LayerNorm(6, rngs=rngs, param_dtype=jnp.float64),
        nnx.gelu,
        nnx.Linear(6, 2, rngs=rngs, param_dtype=jnp.float64),
    )
    return (lambda x: model(x)), jnp.array([0.3, -0.2, 0.5]), 0.3


def nnx_cnn(key):
    rngs = nnx.Rngs(int(jax.random.randint(key, (), 0, 1000)))
    conv = nnx.Conv(1, 2, (3, 3), padding="VALID", rngs=rngs, param_dtype=jnp.float64)
    dense = nnx.Linear(2 * 3 * 3, 2, rngs=rngs, param_dtype=jnp.float64)

    def fn(x):  # x: [5, 5, 1] (HWC)
        return dense(nnx.relu(conv(x)).reshape(-1))

    return fn, jax.random.uniform(jax.random.fold_in(key, 3), (5, 5, 1)), 0.1


def eqx_mlp(key):
    model = eqx.nn.MLP(3, 2, 6, 2, activation=jax.nn.tanh, key=key)
    return model, jnp.array([0.3, -0.2, 0.5]), 0.4


def eqx_layer_norm(key):
    k1, k2 = jax.random.split(key)
    lin1, norm, lin2 = eqx.nn.Linear(3, 5, key=k1), eqx.nn.LayerNorm(5), eqx.nn.Linear(5, 2, key=k2)
    return (lambda x: lin2(jax.nn.silu(norm(lin1(x))))), jnp.array([0.3, -0.2, 0.5]), 0.2


NETS = {
    "relu": mlp(jax.nn.relu),
    "tanh": mlp(jnp.tanh),
    "sigmoid": mlp(jax.nn.sigmoid),
    "leaky_relu": mlp(lambda x: jax.nn.leaky_relu(x, 0.1)),
    "gelu_exact": mlp(lambda x: jax.nn.gelu(x, approximate=False)),
    "gelu_tanh": mlp(lambda x: jax.nn.gelu(x, approximate=True)),
    "softplus": mlp(jax.nn.softplus),
    "elu": mlp(jax.nn.elu),
    "abs_clip": mlp(lambda x: jnp.clip(jnp.abs(x) - 0.5, -1.0, 1.0)),
    "exp_square": mlp(lambda x: jnp.exp(0.3 * x) + 0.1 * jnp.square(x) + 0.05 * x**3),
    "cnn": cnn,
    "residual": residual,
    "softmax": softmax_net,
    "layer_norm": layer_norm_net,
    "branch_product": product_net,
    "division_max": division_net,
    "nnx_mlp": nnx_mlp,
    "nnx_cnn": nnx_cnn,
    "eqx_mlp": eqx_mlp,
    "eqx_layer_norm": eqx_layer_norm,
}


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("net", list(NETS))
def test_bounds_contain_samples(net, method, getkey, check_sound):
    fn, x0, eps = NETS[net](getkey())
    box = vf.Box.from_eps(x0, eps)
    out = METHODS[method](fn, box)
    assert out.lower.shape == jax.eval_shape(fn, x0).shape
    check_sound(fn, box, out, getkey())


@pytest.mark.parametrize("net", ["relu", "gelu_exact", "residual", "cnn", "branch_product"])
def test_spec_bounds_and_linear_bounds_contain_samples(net, getkey, check_sound):
    fn, x0, eps = NETS[net](getkey())
    box = vf.Box.from_eps(x0, eps)
    out_size = jax.eval_shape(fn, x0).size
    spec = jax.random.normal(getkey(), (4, out_size))
    for method in ("crown", "crown-ibp"):
        out = METHODS[method](fn, box, spec)
        assert out.lower.shape == (4,)
        check_sound(fn, box, out, getkey(), spec=spec)
    lin = vf.linear_bounds(fn, box, spec=spec)
    xs = jax.random.uniform(getkey(), (2000,) + x0.shape, minval=box.lower, maxval=box.upper)
    ys = jax.vmap(fn)(xs).reshape(len(xs), -1) @ spec.T
    flat = xs.reshape(len(xs), -1)
    low = flat @ lin.lA.reshape(4, -1).T + lin.lb
    high = flat @ lin.uA.reshape(4, -1).T + lin.ub
    assert np.all(np.asarray(low - ys) <= 1e-9) and np.all(np.asarray(ys - high) <= 1e-9)


STRUCTURAL = {
    "scatter_set": lambda x: jnp.tanh(x.at[1].set(2 * x[3])),
    "scatter_add": lambda x: jnp.tanh(x.at[jnp.array([0, 0, 2])].add(x[1:])),
    "avg_pool": lambda x: jax.lax.reduce_window(
        x.reshape(2, 2), 0.0, jax.lax.add, (2, 1), (1, 1), "VALID"
    ).ravel(),
    "max_pool": lambda x: jax.lax.reduce_window(
        x.reshape(2, 2), -jnp.inf, jax.lax.max, (2, 1), (1, 1), "VALID"
    ).ravel(),
    "dynamic_update_slice": lambda x: jax.lax.dynamic_update_slice(jnp.zeros(6), jnp.tanh(x), (1,)),
    "sort": lambda x: jnp.sort(x) * 2,
    "cummax": jax.lax.cummax,
    "floor": lambda x: jnp.floor(3 * x),
    "max_min_axes": lambda x: jnp.max(x.reshape(2, 2), axis=1) - jnp.min(x),
    "where_bounded": lambda x: jnp.where(x[:2] > x[2:], jnp.exp(x[:2]), x[2:] ** 2),
    "stack": lambda x: jnp.tanh(jnp.stack([x[:2], 2 * x[2:], jnp.ones(2)]).sum(0)),
    "unstack": lambda x: (lambda a, b: jnp.tanh(a - 2 * b))(*jax.lax.unstack(x.reshape(2, 2))),
}


@pytest.mark.parametrize("method", ["ibp", "crown"])
@pytest.mark.parametrize("name", list(STRUCTURAL))
def test_structural_and_concretised_primitives(name, method, getkey, check_sound):
    fn = STRUCTURAL[name]
    box = vf.Box.from_eps(jnp.array([0.1, 0.5, -0.3, 1.0]), 0.3)
    check_sound(fn, box, METHODS[method](fn, box), getkey())
