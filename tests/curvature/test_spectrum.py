"""Hessian spectra and sharpness against dense eigvalsh; usable inside a jitted step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from linjax import curvature as cv
from linjax import lintools as lt


def _apply(params, x):
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def _loss(params, x, y):
    return cv.softmax_cross_entropy(_apply(params, x), y)


@pytest.fixture(scope="module")
def problem():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(11), 4)
    params = {
        "w1": jax.random.normal(k1, (6, 9)) / np.sqrt(6),
        "b1": jnp.zeros(9),
        "w2": jax.random.normal(k2, (9, 4)) / 3.0,
        "b2": jnp.zeros(4),
    }
    x = 2.0 * jax.random.normal(k3, (40, 6))
    y = jax.random.randint(k4, (40,), 0, 4)
    flat, unravel = ravel_pytree(params)
    H = np.asarray(jax.jit(jax.hessian(lambda f: _loss(unravel(f), x, y)))(flat))
    H = 0.5 * (H + H.T)
    return params, x, y, H, np.linalg.eigvalsh(H)


def test_hessian_eigs_match_dense_eigvalsh(problem, getkey):
    params, x, y, H, w = problem
    d = w.size
    vals, vecs = jax.jit(lambda p, k: cv.hessian_eigs(_loss, p, x, y, k=3, key=k, num_steps=d))(
        params, getkey()
    )
    ref = w[::-1][:3]
    np.testing.assert_allclose(vals, ref, rtol=1e-8, atol=1e-10 * np.abs(w).max())
    assert jax.tree.structure(vecs) == jax.tree.structure(params)
    for i in range(3):
        u = ravel_pytree(jax.tree.map(lambda a, i=i: a[i], vecs))[0]
        assert np.linalg.norm(H @ u - vals[i] * u) <= 1e-7 * np.abs(w).max()


def test_hessian_density_nodes_and_trace(problem, getkey):
    params, x, y, H, w = problem
    d, num_probes = w.size, 8
    quad = jax.jit(
        lambda p, k: cv.hessian_density(_loss, p, x, y, key=k, num_probes=num_probes, num_steps=d)
    )(params, getkey())
    assert quad.nodes.shape == (num_probes, d)
    np.testing.assert_allclose(quad.weights.sum(-1), 1.0, rtol=1e-10)
    # With num_steps = d each rule's nodes are the whole spectrum.
    np.testing.assert_allclose(np.sort(quad.nodes[0]), w, atol=1e-8 * np.abs(w).max())
    # tr(H) from SLQ is Hutchinson with the same probes: within 4 sigma of the exact trace.
    sigma = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / num_probes)
    assert abs(lt.trace_f(quad, lambda t: t, d) - np.trace(H)) <= 4 * sigma


def test_sharpness_inside_jitted_training_step_matches_dense_and_does_not_retrace(problem):
    params, x, y, H, w = problem
    opt = optax.sgd(0.1)
    traces = []

    @jax.jit
    def train_step(params, opt_state, key):
        traces.append(None)
        loss, grads = jax.value_and_grad(_loss)(params, x, y)
        report = cv.sharpness(_loss, params, x, y, key=key, num_steps=40, num_probes=64)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, report

    state, losses, reports = opt.init(params), [], []
    for i in range(3):
        params, state, loss, report = train_step(params, state, jax.random.key(i))
        losses.append(float(loss))
        reports.append(report)
    # The first report is at the initial parameters, whose dense Hessian the fixture holds.
    assert isinstance(reports[0], cv.SharpnessReport)
    np.testing.assert_allclose(reports[0].lambda_max, w[-1], rtol=1e-6)
    sigma = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)) / 64)
    assert abs(reports[0].trace - np.trace(H)) <= 4 * sigma
    assert all(np.isfinite(r.lambda_max) and np.isfinite(r.trace) for r in reports)
    assert len(traces) == 1
    assert losses[2] < losses[1] < losses[0]


def test_spectrum_bad_input(problem, getkey):
    params, x, y, _, w = problem
    with pytest.raises(ValueError, match="k=500"):
        cv.hessian_eigs(_loss, params, x, y, k=500, key=getkey())
    with pytest.raises(ValueError, match="num_steps=0"):
        cv.sharpness(_loss, params, x, y, key=getkey(), num_steps=0)
    with pytest.raises(ValueError, match="num_probes=0"):
        cv.hessian_density(_loss, params, x, y, key=getkey(), num_probes=0, num_steps=4)
    with pytest.raises(ValueError, match="num_steps"):
        cv.hessian_density(_loss, params, x, y, key=getkey(), num_probes=2, num_steps=w.size + 1)
