import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import lintools as lt
from linjax import testing as lxt

N = 200


@pytest.fixture(scope="module")
def A():
    eigs = jnp.concatenate([jnp.linspace(0.1, 1.0, N - 4), jnp.array([3.0, 4.0, 6.0, 9.0])])
    return lxt.spd_from_spectrum(jax.random.key(7), eigs)[0]


def test_gauss_quadrature_exact_for_polynomials(A, getkey):
    k = 8
    v = jax.random.normal(getkey(), (N,))
    v = v / jnp.linalg.norm(v)
    quad = lt.gauss_quadrature(lt.dense(A), v, k)
    assert quad.nodes.shape == quad.weights.shape == (k,)
    np.testing.assert_allclose(jnp.sum(quad.weights), 1.0, rtol=1e-13)
    Apv = v
    for p in range(2 * k):  # p = 0 .. 2k-1
        exact = v @ Apv
        np.testing.assert_allclose(jnp.sum(quad.weights * quad.nodes**p), exact, rtol=1e-10)
        Apv = A @ Apv


def test_weights_are_squared_first_components(A, getkey):
    # Regression for PyHessian PR #23: first components of T's eigenvectors, real nodes.
    v = jax.random.normal(getkey(), (N,))
    res = lt.lanczos(lt.dense(A), v, 6)
    T = np.asarray(lt.tridiagonal(res.alphas, res.betas))
    theta, S = np.linalg.eigh(T)
    quad = lt.gauss_quadrature(lt.dense(A), v, 6)
    np.testing.assert_allclose(quad.nodes, theta, rtol=1e-12)
    np.testing.assert_allclose(quad.weights, S[0] ** 2, rtol=1e-10)


def test_slq_density_integrates_to_one_and_trace_within_stderr(A, getkey):
    quad = jax.jit(
        lambda key: lt.slq(
            lt.dense(A), jnp.zeros(N), key=key, num_probes=30, num_steps=20, batch_size=7
        )
    )(getkey())
    assert quad.nodes.shape == (30, 20)
    np.testing.assert_allclose(jnp.sum(quad.weights, axis=1), 1.0, rtol=1e-12)
    grid = jnp.linspace(-1.0, 11.0, 4001)
    dens = lt.spectral_density(quad, grid, 0.05)
    integral = jnp.sum(dens) * (grid[1] - grid[0])
    np.testing.assert_allclose(integral, 1.0, rtol=1e-6)
    # trace_f with the identity: the Hutchinson estimate, within 4 standard errors.
    est = lt.trace_f(quad, lambda x: x, N)
    per_probe = jax.vmap(lambda n, w: lt.trace_f(lt.Quadrature(n[None], w[None]), lambda x: x, N))(
        quad.nodes, quad.weights
    )
    stderr = jnp.std(per_probe, ddof=1) / jnp.sqrt(30)
    np.testing.assert_allclose(est, jnp.mean(per_probe), rtol=1e-12)
    assert jnp.abs(est - jnp.trace(A)) <= 4 * stderr
    # log-det: f applied to nodes, against the dense value, within 4 standard errors.
    logdet = lt.trace_f(quad, jnp.log, N)
    assert jnp.abs(logdet - jnp.linalg.slogdet(A)[1]) <= 0.05 * jnp.abs(jnp.linalg.slogdet(A)[1])


def test_slq_density_locates_outliers(A, getkey):
    quad = lt.slq(lt.dense(A), jnp.zeros(N), key=getkey(), num_probes=10, num_steps=40)
    grid = jnp.linspace(0.0, 10.0, 2001)
    dens = lt.spectral_density(quad, grid, 0.02)
    # Mass near each outlier is ~1/N; none between 6.5 and 8.5 (no eigenvalues there).
    near = lambda c: jnp.sum(jnp.where(jnp.abs(grid - c) < 0.1, dens, 0.0)) * (grid[1] - grid[0])
    for c in [3.0, 4.0, 6.0, 9.0]:
        assert 0.2 / N < near(c) < 5.0 / N
    assert near(7.5) < 1e-6


def test_spectral_density_bad_input():
    quad = lt.Quadrature(jnp.zeros((2, 3)), jnp.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="sigma"):
        lt.spectral_density(quad, jnp.linspace(0, 1, 5), 0.0)
    with pytest.raises(ValueError, match="grid"):
        lt.spectral_density(quad, jnp.zeros((2, 2)), 0.1)
    with pytest.raises(ValueError, match="num_probes"):
        lt.slq(lt.dense(jnp.eye(3)), jnp.zeros(3), key=jax.random.key(0), num_probes=0, num_steps=2)
    with pytest.raises(ValueError, match="num_steps=4"):
        lt.slq(lt.dense(jnp.eye(3)), jnp.zeros(3), key=jax.random.key(0), num_probes=1, num_steps=4)
