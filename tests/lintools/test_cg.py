import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import lintools as lt
from linjax import testing as lxt


def _spd(getkey, n=30, cond=100.0):
    eigs = jnp.geomspace(1.0, cond, n)
    return lxt.spd_from_spectrum(getkey(), eigs)[0]


@pytest.mark.parametrize("rtol", [1e-4, 1e-8, 1e-11])
def test_cg_reaches_requested_tolerance(getkey, rtol):
    # In exact arithmetic CG needs <= n steps; in floating point that holds while the
    # condition number is moderate (ill-conditioned spectra delay it: see the next test).
    A = _spd(getkey, cond=10.0)
    b = jax.random.normal(getkey(), (30,))
    res = jax.jit(lambda b: lt.cg(lt.dense(A), b, rtol=rtol))(b)
    assert res.converged
    assert res.num_steps <= 30
    true_res = jnp.linalg.norm(b - A @ res.x)
    assert true_res <= rtol * jnp.linalg.norm(b) * 1.01
    np.testing.assert_allclose(res.residual_norm, true_res, rtol=1e-3, atol=1e-14)
    if rtol == 1e-11:
        np.testing.assert_allclose(res.x, jnp.linalg.solve(A, b), rtol=1e-9)


def test_cg_ill_conditioned_still_meets_tolerance(getkey):
    # cond 1e6 in float64: the attainable residual is ~ eps * ||A|| * ||x|| ~ 1e-10 ||b||,
    # so ask for 1e-9 (a decade above the floor) and check the answer, not the recursion.
    A = _spd(getkey, n=40, cond=1e6)
    b = jax.random.normal(getkey(), (40,))
    res = lt.cg(lt.dense(A), b, rtol=1e-9)
    assert res.converged
    true_res = jnp.linalg.norm(b - A @ res.x)
    assert true_res <= 1e-9 * jnp.linalg.norm(b)
    np.testing.assert_allclose(res.residual_norm, true_res, rtol=1e-12)


def test_cg_below_attainable_accuracy_reports_not_converged(getkey):
    # Asking for less than rounding allows must come back as converged=False at max_steps,
    # with the residual it did reach, never a false "converged".
    A = _spd(getkey, n=40, cond=1e6)
    b = jax.random.normal(getkey(), (40,))
    res = lt.cg(lt.dense(A), b, rtol=1e-14)
    assert not res.converged
    assert res.num_steps == 400
    assert jnp.linalg.norm(b - A @ res.x) <= 1e-8 * jnp.linalg.norm(b)


def test_cg_distinct_eigenvalues_converges_in_that_many_steps(getkey):
    eigs = jnp.repeat(jnp.array([1.0, 2.0, 5.0, 10.0, 20.0]), 8)
    A, _ = lxt.spd_from_spectrum(getkey(), eigs)
    b = jax.random.normal(getkey(), (40,))
    res = lt.cg(lt.dense(A), b, rtol=1e-10)
    assert res.converged
    assert res.num_steps <= 5
    assert jnp.linalg.norm(A @ res.x - b) <= 1e-10 * jnp.linalg.norm(b)


def test_cg_a_norm_error_bound(getkey):
    # ||x_k - x*||_A <= 2 ((sqrt(kappa) - 1) / (sqrt(kappa) + 1))^k ||x0 - x*||_A.
    A = _spd(getkey, n=50, cond=400.0)
    b = jax.random.normal(getkey(), (50,))
    xs = jnp.linalg.solve(A, b)
    a_norm = lambda e: jnp.sqrt(e @ A @ e)
    rho = (20.0 - 1) / (20.0 + 1)
    for k in [1, 3, 7, 15, 25]:
        x = lt.cg(lt.dense(A), b, rtol=0.0, max_steps=k).x
        assert a_norm(x - xs) <= 2 * rho**k * a_norm(xs) * (1 + 1e-8)


def test_cg_indefinite_operator_stops_unconverged(getkey):
    eigs = jnp.concatenate([jnp.linspace(1.0, 2.0, 10), -jnp.linspace(1.0, 2.0, 10)])
    A, _ = lxt.spd_from_spectrum(getkey(), eigs)
    b = jax.random.normal(getkey(), (20,))
    res = lt.cg(lt.dense(A), b, rtol=1e-10)
    assert not res.converged
    assert jnp.all(jnp.isfinite(res.x))
    assert res.num_steps < 20


def test_cg_negative_definite_first_step():
    res = lt.cg(lt.dense(-jnp.eye(3)), jnp.ones(3))
    assert not res.converged
    assert int(res.num_steps) == 1
    np.testing.assert_array_equal(res.x, jnp.zeros(3))


def test_cg_zero_rhs_is_zero_and_converged():
    res = lt.cg(lt.dense(jnp.eye(3)), jnp.zeros(3))
    assert res.converged and int(res.num_steps) == 0
    np.testing.assert_array_equal(res.x, jnp.zeros(3))


def test_cg_preconditioner_and_x0(getkey):
    d = jnp.geomspace(1.0, 1e4, 60)
    A, _ = lxt.spd_from_spectrum(getkey(), jnp.ones(60) * 0.5)
    A = A + jnp.diag(d)  # badly scaled diagonal: Jacobi preconditioning helps a lot
    b = jax.random.normal(getkey(), (60,))
    plain = lt.cg(lt.dense(A), b, rtol=1e-10)
    jacobi = lt.cg(lt.dense(A), b, rtol=1e-10, precond=lambda r: r / jnp.diag(A))
    assert plain.converged and jacobi.converged
    assert jacobi.num_steps < plain.num_steps
    np.testing.assert_allclose(jacobi.x, jnp.linalg.solve(A, b), rtol=1e-8)
    warm = lt.cg(lt.dense(A), b, rtol=1e-10, x0=jacobi.x)
    assert int(warm.num_steps) <= 1


def test_cg_gradient_matches_dense_solve(getkey):
    # d/dparams of a loss of the solution: implicit differentiation through the solve.
    M = jax.random.normal(getkey(), (12, 12))
    b = jax.random.normal(getkey(), (12,))
    c = jax.random.normal(getkey(), (12,))

    def matvec(v, M, lam):
        return M.T @ (M @ v) + lam * v

    def loss_cg(M, lam, b):
        return c @ lt.cg(matvec, b, M, lam, rtol=1e-13).x

    def loss_dense(M, lam, b):
        return c @ jnp.linalg.solve(M.T @ M + lam * jnp.eye(12), b)

    g_cg = jax.grad(loss_cg, argnums=(0, 1, 2))(M, 0.5, b)
    g_dense = jax.grad(loss_dense, argnums=(0, 1, 2))(M, 0.5, b)
    lxt.assert_trees_close(g_cg, g_dense, rtol=1e-8, atol=1e-10)
    # Forward mode too.
    t_cg = jax.jvp(lambda lam: loss_cg(M, lam, b), (0.5,), (1.0,))[1]
    t_dense = jax.jvp(lambda lam: loss_dense(M, lam, b), (0.5,), (1.0,))[1]
    np.testing.assert_allclose(t_cg, t_dense, rtol=1e-8)


def test_cg_vmap_over_right_hand_sides(getkey):
    A = _spd(getkey)
    B = jax.random.normal(getkey(), (5, 30))
    res = jax.jit(jax.vmap(lambda b: lt.cg(lt.dense(A), b, rtol=1e-11)))(B)
    assert res.x.shape == (5, 30) and res.converged.shape == (5,)
    assert jnp.all(res.converged)
    np.testing.assert_allclose(res.x, jnp.linalg.solve(A, B.T).T, rtol=1e-8, atol=1e-10)


def test_cg_max_steps_reports_unconverged(getkey):
    A = _spd(getkey, cond=1e4)
    b = jax.random.normal(getkey(), (30,))
    res = lt.cg(lt.dense(A), b, rtol=1e-12, max_steps=3)
    assert not res.converged and int(res.num_steps) == 3
