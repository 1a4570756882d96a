import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import lintools as lt
from linjax import testing as lxt


def _clustered(getkey, n=300):
    # Three tight clusters plus outliers: the regime where plain Lanczos loses orthogonality.
    eigs = jnp.concatenate(
        [
            1.0 + 1e-6 * jnp.arange(100),
            2.0 + 1e-6 * jnp.arange(100),
            3.0 + 1e-6 * jnp.arange(n - 205),
            jnp.array([10.0, 20.0, 50.0, 100.0, 200.0]),
        ]
    )
    return lxt.spd_from_spectrum(getkey(), eigs)[0]


def test_basis_orthonormal_after_100_steps(getkey):
    A = _clustered(getkey)
    res = jax.jit(lambda v: lt.lanczos(lt.dense(A), v, 100))(jax.random.normal(getkey(), (300,)))
    Q = res.basis
    assert Q.shape == (100, 300) and res.alphas.shape == (100,) and res.betas.shape == (99,)
    assert jnp.max(jnp.abs(Q @ Q.T - jnp.eye(100))) <= 1e-10


def test_without_reorthogonalisation_orthogonality_is_lost(getkey):
    # Documents why reortho="full" is the default (and that the option does something).
    A = _clustered(getkey)
    res = lt.lanczos(lt.dense(A), jax.random.normal(getkey(), (300,)), 100, reortho="none")
    assert jnp.max(jnp.abs(res.basis @ res.basis.T - jnp.eye(100))) > 1e-3


def test_three_term_relation(getkey):
    A = _clustered(getkey)
    k = 60
    res = lt.lanczos(lt.dense(A), jax.random.normal(getkey(), (300,)), k)
    T = lt.tridiagonal(res.alphas, res.betas)
    Q = res.basis
    e_k = jnp.zeros(k).at[-1].set(1.0)
    lhs = A @ Q.T
    rhs = Q.T @ T + jnp.outer(res.residual, e_k)
    assert jnp.max(jnp.abs(lhs - rhs)) <= 1e-10 * jnp.linalg.norm(A, 2)
    # T is the projection Q A Q^T.
    np.testing.assert_allclose(Q @ A @ Q.T, T, atol=1e-10 * 200)


def test_full_run_recovers_all_eigenvalues(getkey):
    n = 40
    eigs = jnp.linspace(-3.0, 5.0, n)
    A, _ = lxt.spd_from_spectrum(getkey(), eigs)
    res = lt.lanczos(lt.dense(A), jax.random.normal(getkey(), (n,)), n)
    theta = jnp.linalg.eigvalsh(lt.tridiagonal(res.alphas, res.betas))
    np.testing.assert_allclose(theta, eigs, atol=1e-10)


def test_breakdown_on_invariant_subspace_continues_orthonormally():
    # v0 = e_1 + e_2 of a diagonal matrix spans a 2-dim invariant subspace: beta_2 = 0.
    A = jnp.diag(jnp.arange(1.0, 9.0))
    v0 = jnp.zeros(8).at[0].set(1.0).at[1].set(1.0)
    res = lt.lanczos(lt.dense(A), v0, 8)
    assert jnp.all(jnp.isfinite(res.basis)) and jnp.all(jnp.isfinite(res.alphas))
    assert res.betas[1] == 0.0
    np.testing.assert_allclose(res.basis @ res.basis.T, jnp.eye(8), atol=1e-12)
    theta = jnp.linalg.eigvalsh(lt.tridiagonal(res.alphas, res.betas))
    np.testing.assert_allclose(theta, jnp.arange(1.0, 9.0), atol=1e-10)
    np.testing.assert_allclose(res.residual, jnp.zeros(8), atol=1e-12)


def test_zero_start_vector_and_zero_operator_are_finite():
    res = lt.lanczos(lt.dense(jnp.eye(5)), jnp.zeros(5), 3)
    assert jnp.all(jnp.isfinite(res.basis))
    np.testing.assert_allclose(res.basis @ res.basis.T, jnp.eye(3), atol=1e-12)
    res = lt.lanczos(lt.dense(jnp.zeros((5, 5))), jnp.ones(5), 5)
    assert jnp.all(jnp.isfinite(res.basis)) and jnp.all(res.alphas == 0)
    np.testing.assert_allclose(res.basis @ res.basis.T, jnp.eye(5), atol=1e-12)


def test_float32_stays_float32(getkey):
    A = _clustered(getkey).astype(jnp.float32)
    res = lt.lanczos(lt.dense(A), jnp.ones(300, jnp.float32), 30)
    assert res.basis.dtype == jnp.float32 and res.alphas.dtype == jnp.float32
    assert jnp.max(jnp.abs(res.basis @ res.basis.T - jnp.eye(30))) <= 1e-5


def test_lanczos_jaxpr_size_does_not_grow_with_steps(getkey):
    # Compile time independent of num_steps: the loop is one scan, not an unrolled Python loop.
    A = _clustered(getkey)

    def eqns(k):
        return len(jax.make_jaxpr(lambda v: lt.lanczos(lt.dense(A), v, k))(jnp.ones(300)).eqns)

    assert eqns(10) == eqns(200)


@pytest.mark.parametrize("bad", [0, -3])
def test_bad_num_steps(bad):
    with pytest.raises(ValueError, match="num_steps"):
        lt.lanczos(lt.dense(jnp.eye(4)), jnp.ones(4), bad)


def test_bad_inputs():
    with pytest.raises(ValueError, match="num_steps=5"):
        lt.lanczos(lt.dense(jnp.eye(4)), jnp.ones(4), 5)
    with pytest.raises(TypeError, match="num_steps"):
        lt.lanczos(lt.dense(jnp.eye(4)), jnp.ones(4), 2.0)
    with pytest.raises(ValueError, match="reortho"):
        lt.lanczos(lt.dense(jnp.eye(4)), jnp.ones(4), 2, reortho="partial")
    with pytest.raises(TypeError, match="floating"):
        lt.lanczos(lt.dense(jnp.eye(4)), jnp.ones(4, jnp.int32), 2)
    with pytest.raises(ValueError, match="structure"):
        lt.lanczos(lambda v: {"a": v}, jnp.ones(4), 2)
