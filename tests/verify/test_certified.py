"""certified_loss: CE at eps=0, an upper bound of CE on the box, and certified training."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from linjax import data
from linjax import verify as vf


def small_net(key, n_in=5, hidden=8, n_out=4, act=jax.nn.relu):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    w1 = 1.5 * jax.random.normal(k1, (hidden, n_in)) / np.sqrt(n_in)
    b1 = 0.2 * jax.random.normal(k2, (hidden,))
    w2 = 1.5 * jax.random.normal(k3, (n_out, hidden)) / np.sqrt(hidden)
    b2 = 0.2 * jax.random.normal(k4, (n_out,))
    return lambda x: w2 @ act(w1 @ x + b1) + b2


def ce(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


CASES = [("ibp", None), ("crown-ibp", None), ("crown-ibp", 0.3)]


@pytest.mark.parametrize("method, beta", CASES)
def test_eps_zero_is_cross_entropy(method, beta, getkey):
    fn = small_net(getkey(), act=jnp.tanh)
    x = jax.random.uniform(getkey(), (6, 5))
    y = jnp.array([0, 1, 2, 3, 1, 0])
    loss = vf.certified_loss(fn, x, y, 0.0, method=method, beta=beta)
    np.testing.assert_allclose(loss, jnp.mean(ce(jax.vmap(fn)(x), y)), rtol=1e-10)


@pytest.mark.parametrize("method, beta", CASES)
@pytest.mark.parametrize("act", [jax.nn.relu, jnp.tanh])
def test_upper_bounds_cross_entropy_on_the_box(method, beta, act, getkey):
    fn = small_net(getkey(), act=act)
    eps, clip = 0.15, (0.0, 1.0)
    xs = jax.random.uniform(getkey(), (4, 5))
    for i, label in enumerate([0, 1, 2, 3]):
        x, y = xs[i], jnp.array(label)
        bound = vf.certified_loss(fn, x[None], y[None], eps, method=method, beta=beta, clip=clip)
        lo, hi = jnp.clip(x - eps, *clip), jnp.clip(x + eps, *clip)
        pts = jax.random.uniform(getkey(), (1_000, 5), minval=lo, maxval=hi)
        sampled = ce(jax.vmap(fn)(pts), jnp.full(1_000, label))
        assert float(jnp.max(sampled)) <= float(bound) + 1e-10
        # Strictly a worst case: above the CE at the centre, and tighter than naive logits.
        assert float(bound) >= float(ce(fn(x), y))


def test_beta_zero_is_ibp_and_mixing_is_linear(getkey):
    fn = small_net(getkey())
    x, y = jax.random.uniform(getkey(), (3, 5)), jnp.array([0, 2, 3])

    def margins(beta):
        return jax.vmap(
            lambda xi, yi: vf._certified.margin_lower_bounds(
                fn, xi, yi, 0.1, method="crown-ibp", beta=beta, clip=None, num_classes=4
            )
        )(x, y)

    m0, m1, mh = margins(0.0), margins(1.0), margins(0.5)
    np.testing.assert_allclose(mh, 0.5 * (m0 + m1), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        vf.certified_loss(fn, x, y, 0.1, method="crown-ibp", beta=0.0),
        vf.certified_loss(fn, x, y, 0.1, method="ibp"),
        rtol=1e-12,
    )
    # The true class has margin exactly 0.
    np.testing.assert_array_equal(m1[jnp.arange(3), y], 0.0)


def test_jit_grad_traced_eps_and_beta(getkey):
    w = jax.random.normal(getkey(), (4, 5))
    x, y = jax.random.uniform(getkey(), (3, 5)), jnp.array([0, 2, 3])

    def loss(w, eps, beta):
        return vf.certified_loss(
            lambda v: jnp.tanh(w @ v), x, y, eps, method="crown-ibp", beta=beta
        )

    val, grad = jax.jit(jax.value_and_grad(loss))(w, 0.1, 0.5)
    np.testing.assert_allclose(val, loss(w, 0.1, 0.5), rtol=1e-12)
    assert grad.shape == w.shape and bool(jnp.all(jnp.isfinite(grad)))
    # Finite-difference check of one directional derivative.
    d = jax.random.normal(getkey(), w.shape)
    h = 1e-6
    fd = (loss(w + h * d, 0.1, 0.5) - loss(w - h * d, 0.1, 0.5)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(grad, d), fd, rtol=1e-5, atol=1e-8)


def ibp_certified_accuracy(fn, x, y, eps, clip=(0.0, 1.0)):
    def one(xi, yi):
        out = vf.ibp(fn, vf.Box(jnp.clip(xi - eps, *clip), jnp.clip(xi + eps, *clip)))
        lb = out.lower[yi] - out.upper
        return jnp.all(jnp.where(jnp.arange(lb.shape[0]) == yi, True, lb > 0))

    return float(jnp.mean(jax.jit(jax.vmap(one))(x, y)))


def _train(loss_fn, params, steps, lr=1e-2):
    opt = optax.adam(lr)
    state = opt.init(params)

    @jax.jit
    def step(params, state, eps):
        loss, grads = jax.value_and_grad(loss_fn)(params, eps)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for i in range(steps):
        eps = 0.05 * min(1.0, i / (steps // 2))  # epsilon ramp, traced
        params, state, loss = step(params, state, eps)
        losses.append(float(loss))
    return params, losses


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        return self.l2(jax.nn.relu(self.l1(x)))


@pytest.mark.slow
def test_ibp_training_flax_nnx_digits():
    digits = data.load_digits()
    x, y = digits.x_train, digits.y_train
    graphdef, params0 = nnx.split(NnxMLP(nnx.Rngs(0)))

    def model(p):
        return lambda v: nnx.merge(graphdef, p)(v)

    def standard(p, eps):
        return jnp.mean(ce(jax.vmap(model(p))(x), y))

    def robust(p, eps):
        return vf.certified_loss(model(p), x, y, eps, method="ibp", clip=(0.0, 1.0))

    std, _ = _train(standard, params0, 100)
    rob, losses = _train(robust, params0, 100)
    assert losses[-1] < 0.5 * losses[0]
    xt, yt = digits.x_test, digits.y_test
    clean = float(jnp.mean(jnp.argmax(jax.vmap(model(rob))(xt), 1) == yt))
    assert clean > 0.85
    cert_std = ibp_certified_accuracy(model(std), xt, yt, 0.03)
    cert_rob = ibp_certified_accuracy(model(rob), xt, yt, 0.03)
    assert cert_rob > cert_std + 0.2, (cert_std, cert_rob)


@pytest.mark.slow
def test_crown_ibp_training_equinox_digits():
    digits = data.load_digits()
    x, y = digits.x_train[:512], digits.y_train[:512]
    net = eqx.nn.MLP(64, 10, 32, depth=1, activation=jax.nn.relu, key=jax.random.key(1))
    params0, static = eqx.partition(net, eqx.is_array)

    def model(p):
        return eqx.combine(p, static)

    def standard(p, eps):
        return jnp.mean(ce(jax.vmap(model(p))(x), y))

    def robust(p, eps):
        return vf.certified_loss(model(p), x, y, eps, method="crown-ibp", beta=0.5, clip=(0.0, 1.0))

    std, _ = _train(standard, params0, 60)
    rob, losses = _train(robust, params0, 60)
    assert losses[-1] < 0.5 * losses[0]
    xt, yt = digits.x_test, digits.y_test
    cert_std = ibp_certified_accuracy(model(std), xt, yt, 0.02)
    cert_rob = ibp_certified_accuracy(model(rob), xt, yt, 0.02)
    assert cert_rob > cert_std + 0.1, (cert_std, cert_rob)


def test_bad_inputs():
    fn = small_net(jax.random.key(0))
    x, y = jnp.zeros((2, 5)), jnp.array([0, 1])
    with pytest.raises(ValueError, match="method"):
        vf.certified_loss(fn, x, y, 0.1, method="crown")
    with pytest.raises(ValueError, match="beta"):
        vf.certified_loss(fn, x, y, 0.1, beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        vf.certified_loss(fn, x, y, 0.1, method="crown-ibp", beta=1.5)
    with pytest.raises(ValueError, match="eps"):
        vf.certified_loss(fn, x, y, -0.1)
    with pytest.raises(ValueError, match="clip"):
        vf.certified_loss(fn, x, y, 0.1, clip=(1.0, 0.0))
    with pytest.raises(ValueError, match="labels"):
        vf.certified_loss(fn, x, jnp.array([0, 1, 2]), 0.1)
    with pytest.raises(ValueError, match="labels must be in"):
        vf.certified_loss(fn, x, jnp.array([0, 4]), 0.1)
    with pytest.raises(TypeError, match="integers"):
        vf.certified_loss(fn, x, jnp.array([0.0, 1.0]), 0.1)
    with pytest.raises(ValueError, match="one example"):
        vf.certified_loss(fn, jnp.zeros((2, 6)), y, 0.1)
    with pytest.raises(ValueError, match="logits"):
        vf.certified_loss(lambda v: jnp.sum(v), x, y, 0.1)
