"""Gauss-Newton direction, the optax transform (flax nnx + equinox, orbax) and unlearning."""

from functools import partial

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from linjax import _tree
from linjax import curvature as cv
from linjax import testing as lxt


def _linear(p, x):
    return x @ p["w"] + p["b"]


def _tanh_mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@pytest.fixture(scope="module")
def classification():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(5), 4)
    x = jax.random.normal(k1, (48, 4))
    y = jnp.argmax(x @ jax.random.normal(k2, (4, 3)), axis=1)
    params = {
        "w1": jax.random.normal(k3, (4, 8)) / 2.0,
        "b1": jnp.zeros(8),
        "w2": jax.random.normal(k4, (8, 3)) / 3.0,
        "b2": jnp.zeros(3),
    }
    return params, x, y


def test_gauss_newton_on_linear_least_squares_is_the_newton_step(getkey):
    x = jax.random.normal(getkey(), (30, 5))
    y = jax.random.normal(getkey(), (30, 2))
    params = {"w": jax.random.normal(getkey(), (5, 2)), "b": jnp.ones(2)}

    def loss(p):
        return cv.squared_error(_linear(p, x), y)

    flat, unravel = ravel_pytree(params)

    @jax.jit
    def newton_step(flat):
        H = jax.hessian(lambda f: loss(unravel(f)))(flat)
        return unravel(jnp.linalg.solve(H, jax.grad(lambda f: loss(unravel(f)))(flat)))

    g = jax.grad(loss)(params)
    newton = newton_step(flat)
    d, res = jax.jit(
        lambda p: cv.gauss_newton_direction(
            _linear, cv.squared_error, p, (x, y), damping=1e-12, max_steps=12, rtol=1e-13
        )
    )(params)
    assert res.converged and int(res.num_steps) <= 12
    lxt.assert_trees_close(d, newton, rtol=1e-9, atol=1e-11)
    # One full step lands on the least-squares solution: the gradient vanishes there.
    stepped = jax.tree.map(jnp.subtract, params, d)
    assert _tree.tree_norm(jax.grad(loss)(stepped)) <= 1e-9 * _tree.tree_norm(g)


def test_direction_matches_dense_damped_ggn_solve(classification):
    params, x, y = classification
    damping = 1e-2
    batch = (x, y)
    solve = partial(
        cv.gauss_newton_direction,
        _tanh_mlp,
        cv.softmax_cross_entropy,
        damping=damping,
        max_steps=200,
        rtol=1e-12,
    )

    @jax.jit
    def run(p):
        g = jax.grad(lambda p: cv.softmax_cross_entropy(_tanh_mlp(p, x), y))(p)
        G = lxt.materialize(cv.ggn(_tanh_mlp, cv.softmax_cross_entropy, p, batch), p)
        # An explicit right-hand side is used as given.
        doubled = solve(p, batch, grads=jax.tree.map(lambda a: 2.0 * a, g))[0]
        return solve(p, batch), doubled, g, G

    (d, res), doubled, g, G = run(params)
    assert res.converged
    ref = np.linalg.solve(G + damping * np.eye(G.shape[0]), ravel_pytree(g)[0])
    np.testing.assert_allclose(ravel_pytree(d)[0], ref, rtol=1e-8, atol=1e-10)
    assert _tree.tree_dot(g, d) > 0  # uphill, like the gradient
    lxt.assert_trees_close(doubled, jax.tree.map(lambda a: 2.0 * a, d), rtol=1e-7, atol=1e-10)


def _train(opt, apply_fn, params, batch, num_steps):
    def loss_fn(p):
        return cv.softmax_cross_entropy(apply_fn(p, batch[0]), batch[1])

    @jax.jit
    def step(params, state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grads, state, params, batch=batch)
        return optax.apply_updates(params, updates), state, loss

    state = opt.init(params)
    losses = []
    for _ in range(num_steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    losses.append(float(loss_fn(params)))
    return params, state, losses


def _roundtrip(tmp_path, state):
    ckptr = ocp.StandardCheckpointer()
    path = tmp_path / "state"
    ckptr.save(path, state)
    ckptr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckptr.restore(path, abstract)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    return restored


def _gn_chain(apply_fn):
    return optax.chain(
        cv.gauss_newton(apply_fn, cv.softmax_cross_entropy, damping=0.1, max_steps=10),
        optax.scale(-1.0),
    )


def test_gauss_newton_trains_a_flax_nnx_model_and_state_roundtrips(classification, tmp_path):
    _, x, y = classification
    x = x.astype(jnp.float32)

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(4, 8, rngs=rngs)
            self.l2 = nnx.Linear(8, 3, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    graphdef, params = nnx.split(MLP(nnx.Rngs(0)), nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    trained, state, losses = _train(_gn_chain(apply_fn), apply_fn, params, (x, y), 6)
    assert losses[-1] < 0.5 * losses[0]
    assert all(b < a for a, b in zip(losses[:-1], losses[1:], strict=True))
    gn_state = state[0]
    assert isinstance(gn_state, cv.GaussNewtonState)
    assert int(gn_state.count) == 6 and 1 <= int(gn_state.cg_steps) <= 10
    assert gn_state.cg_residual_norm.dtype == jnp.float32
    restored = _roundtrip(tmp_path, state)
    assert isinstance(restored[0], cv.GaussNewtonState)
    assert nnx.merge(graphdef, trained)(x).shape == (48, 3)


def test_gauss_newton_trains_an_equinox_model_and_state_roundtrips(classification, tmp_path):
    _, x, y = classification
    model = eqx.nn.MLP(4, 3, 8, 1, activation=jnp.tanh, key=jax.random.key(1))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply_fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    _, state, losses = _train(_gn_chain(apply_fn), apply_fn, params, (x, y), 6)
    assert losses[-1] < 0.5 * losses[0]
    assert int(state[0].count) == 6
    _roundtrip(tmp_path, state)


def test_gauss_newton_update_errors(classification):
    params, x, y = classification
    opt = cv.gauss_newton(_tanh_mlp, cv.softmax_cross_entropy, damping=1.0, max_steps=3)
    state = opt.init(params)
    with pytest.raises(ValueError, match="needs the parameters"):
        opt.update(params, state, batch=(x, y))
    with pytest.raises(ValueError, match="needs the batch"):
        opt.update(params, state, params)
    with pytest.raises(ValueError, match="grads and params have different pytree"):
        opt.update({"w": jnp.zeros(3)}, state, params, batch=(x, y))


@pytest.mark.parametrize("damping", [0.0, -1.0, float("nan")])
def test_bad_damping(damping):
    with pytest.raises(ValueError, match="damping=.* must be a finite number > 0"):
        cv.gauss_newton(_linear, cv.squared_error, damping=damping, max_steps=3)


def test_bad_static_arguments(classification):
    params, x, y = classification
    batch = (x, y)
    with pytest.raises(ValueError, match="max_steps=0 must be >= 1"):
        cv.gauss_newton(_linear, cv.squared_error, damping=1.0, max_steps=0)
    with pytest.raises(TypeError, match="max_steps=2.5"):
        cv.gauss_newton(_linear, cv.squared_error, damping=1.0, max_steps=2.5)
    with pytest.raises(ValueError, match="rtol=-1"):
        cv.gauss_newton(_linear, cv.squared_error, damping=1.0, max_steps=2, rtol=-1)
    with pytest.raises(TypeError, match="damping=.* must be a real scalar"):
        cv.gauss_newton_direction(
            _tanh_mlp, cv.softmax_cross_entropy, params, batch, damping="1", max_steps=2
        )
    with pytest.raises(ValueError, match="step_size=0"):
        cv.gauss_newton_unlearn(
            _tanh_mlp,
            cv.softmax_cross_entropy,
            params,
            batch,
            batch,
            damping=1.0,
            step_size=0,
            num_steps=1,
            max_cg_steps=2,
        )
    with pytest.raises(ValueError, match="scaling='bogus'"):
        cv.gauss_newton_unlearn(
            _tanh_mlp,
            cv.softmax_cross_entropy,
            params,
            batch,
            batch,
            damping=1.0,
            step_size=0.1,
            num_steps=1,
            max_cg_steps=2,
            scaling="bogus",
        )
    with pytest.raises(TypeError, match="retain_batch must be a pair"):
        cv.gauss_newton_unlearn(
            _tanh_mlp,
            cv.softmax_cross_entropy,
            params,
            batch,
            x,
            damping=1.0,
            step_size=0.1,
            num_steps=1,
            max_cg_steps=2,
        )


@pytest.fixture(scope="module")
def unlearning_problem():
    # Four Gaussian blobs, a small tanh MLP trained to fit them; forget class 0.
    key = jax.random.key(21)
    centres = 3.0 * jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    k1, k2, k3, k4 = jax.random.split(key, 4)
    y = jnp.repeat(jnp.arange(4), 40)
    x = centres[y] + 0.7 * jax.random.normal(k1, (160, 2))
    params = {
        "w1": jax.random.normal(k2, (2, 16)) / np.sqrt(2),
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k3, (16, 4)) / 4.0,
        "b2": jnp.zeros(4),
    }
    opt = optax.adam(3e-2)

    def loss(p):
        return cv.softmax_cross_entropy(_tanh_mlp(p, x), y)

    @jax.jit
    def fit(params):
        def step(carry, _):
            p, s = carry
            u, s = opt.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, opt.init(params)), length=300)[0][0]

    params = fit(params)
    forget = (x[y == 0], y[y == 0])
    retain = (x[y != 0], y[y != 0])
    return params, forget, retain


def _losses(params, forget, retain):
    f = cv.softmax_cross_entropy(_tanh_mlp(params, forget[0]), forget[1])
    r = cv.softmax_cross_entropy(_tanh_mlp(params, retain[0]), retain[1])
    return float(f), float(r)


def test_unlearning_raises_forget_loss_much_more_than_retain_loss(unlearning_problem):
    params, forget, retain = unlearning_problem
    f0, r0 = _losses(params, forget, retain)
    unlearned = jax.jit(
        lambda p: cv.gauss_newton_unlearn(
            _tanh_mlp,
            cv.softmax_cross_entropy,
            p,
            forget,
            retain,
            damping=1e-2,
            step_size=0.01,
            num_steps=4,
            max_cg_steps=30,
        )
    )(params)
    f1, r1 = _losses(unlearned, forget, retain)
    assert f1 - f0 > 1.0  # the forget set is really unlearned (measured: +15.6)
    assert f1 - f0 > 100 * (r1 - r0)  # measured: retain +0.0015
    # Plain gradient ascent reaching the same forget loss damages the retain set far more.
    g = jax.grad(lambda p: cv.softmax_cross_entropy(_tanh_mlp(p, forget[0]), forget[1]))(params)
    ascend = lambda t: _losses(_tree.tree_axpy(t, g, params), forget, retain)
    lo, hi = 0.0, 1.0
    while ascend(hi)[0] < f1:
        lo, hi = hi, 2 * hi
    for _ in range(40):  # bisect the ascent step length that matches f1
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ascend(mid)[0] < f1 else (lo, mid)
    r_ascent = ascend(hi)[1]
    assert r1 - r0 < 0.25 * (r_ascent - r0)  # measured: 0.0015 vs 0.058


def test_unlearning_fixed_scaling_is_a_plain_gauss_newton_ascent_step(unlearning_problem):
    params, forget, retain = unlearning_problem
    kwargs = dict(damping=0.1, max_cg_steps=20, rtol=1e-12)
    out = cv.gauss_newton_unlearn(
        _tanh_mlp,
        cv.softmax_cross_entropy,
        params,
        forget,
        retain,
        step_size=3.0,
        num_steps=1,
        scaling="fixed",
        **kwargs,
    )
    g = jax.grad(lambda p: cv.softmax_cross_entropy(_tanh_mlp(p, forget[0]), forget[1]))(params)
    d, _ = cv.gauss_newton_direction(
        _tanh_mlp,
        cv.softmax_cross_entropy,
        params,
        retain,
        damping=0.1,
        max_steps=20,
        rtol=1e-12,
        grads=g,
    )
    lxt.assert_trees_close(out, _tree.tree_axpy(3.0, d, params), rtol=1e-10, atol=1e-12)


def test_unlearning_trust_region_step_has_the_requested_size(unlearning_problem):
    params, forget, retain = unlearning_problem
    damping, eps = 1e-2, 0.05
    out = cv.gauss_newton_unlearn(
        _tanh_mlp,
        cv.softmax_cross_entropy,
        params,
        forget,
        retain,
        damping=damping,
        step_size=eps,
        num_steps=1,
        max_cg_steps=200,
        scaling="trust_region",
        rtol=1e-12,
    )
    delta = jax.tree.map(jnp.subtract, out, params)
    G = cv.ggn(_tanh_mlp, cv.softmax_cross_entropy, params, retain)
    quad = 0.5 * _tree.tree_dot(delta, _tree.tree_axpy(damping, delta, G(delta)))
    np.testing.assert_allclose(quad, eps, rtol=1e-8)
