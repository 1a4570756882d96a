import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from linjax import lintools as lt
from linjax import testing as lxt
from linjax.lintools._lanczos import _lanczos  # also returns the number of reorthogonalised steps

SQRT_EPS = float(jnp.sqrt(jnp.finfo(jnp.float64).eps))  # 1.5e-8: semiorthogonality level


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
    with pytest.raises(
        ValueError, match="reortho='selective' must be one of .*'full', 'partial', 'none'"
    ):
        lt.lanczos(lt.dense(jnp.eye(4)), jnp.ones(4), 2, reortho="selective")
    with pytest.raises(TypeError, match="floating"):
        lt.lanczos(lt.dense(jnp.eye(4)), jnp.ones(4, jnp.int32), 2)
    with pytest.raises(ValueError, match="structure"):
        lt.lanczos(lambda v: {"a": v}, jnp.ones(4), 2)


# --- partial reorthogonalisation ---------------------------------------------------------

N_PRO, STEPS_PRO = 400, 250


def _spectrum(name):
    if name == "clustered":  # tight clusters and fast-converging outliers: frequent loss
        return jnp.concatenate(
            [
                1.0 + 1e-6 * jnp.arange(150),
                2.0 + 1e-6 * jnp.arange(150),
                3.0 + 1e-6 * jnp.arange(N_PRO - 305),
                jnp.array([10.0, 20.0, 50.0, 100.0, 200.0]),
            ]
        )
    if name == "geometric":
        return jnp.geomspace(1e-3, 1e3, N_PRO)
    if name == "separated":
        return jnp.arange(1.0, N_PRO + 1.0) ** 2
    return jnp.linspace(1.0, 2.0, N_PRO)  # "benign": no outliers, slow convergence


@pytest.fixture(scope="module", params=["clustered", "geometric", "separated"])
def hard_problem(request):
    eigs = _spectrum(request.param)
    A = lxt.spd_from_spectrum(jax.random.key(11), eigs)[0]
    v0 = jax.random.normal(jax.random.key(12), (N_PRO,))
    run = jax.jit(lambda v, ro: _lanczos(lt.dense(A), v, STEPS_PRO, reortho=ro), static_argnums=1)
    return A, eigs, {ro: run(v0, ro) for ro in ("none", "partial", "full")}


def test_partial_keeps_semiorthogonality_where_none_loses_it(hard_problem):
    _, _, runs = hard_problem
    eye = jnp.eye(STEPS_PRO)
    loss = {ro: float(jnp.max(jnp.abs(r.basis @ r.basis.T - eye))) for ro, (r, _) in runs.items()}
    assert loss["none"] > 1e-2  # the plain recurrence loses orthogonality completely...
    assert loss["partial"] <= 1e-7  # ...partial keeps it at sqrt(eps) = 1.5e-8 level or better
    assert loss["full"] <= 1e-12
    num_reortho = int(runs["partial"][1])
    assert 0 < num_reortho < STEPS_PRO and int(runs["full"][1]) == STEPS_PRO


def test_partial_ritz_values_match_full_and_eigh(hard_problem):
    # No ghosts, and the extreme Ritz values are as accurate as with full reorthogonalisation.
    A, eigs, runs = hard_problem
    exact = np.sort(np.asarray(eigs))
    theta = {
        ro: np.linalg.eigvalsh(np.asarray(lt.tridiagonal(r.alphas, r.betas)))
        for ro, (r, _) in runs.items()
    }
    scale = exact[-1]
    for ro in ("partial", "full"):
        np.testing.assert_allclose(theta[ro][-5:], exact[-5:], rtol=1e-12, atol=1e-13 * scale)
    np.testing.assert_allclose(theta["partial"], theta["full"], atol=1e-10 * scale)
    # Plain Lanczos: ghost copies of the top eigenvalue (or other spurious Ritz values).
    assert np.max(np.abs(theta["none"][-5:] - exact[-5:])) > 1e-6 * scale


def test_partial_three_term_relation_and_simon_projection(hard_problem):
    A, _, runs = hard_problem
    res, num_reortho = runs["partial"]
    Q, T = np.asarray(res.basis), np.asarray(lt.tridiagonal(res.alphas, res.betas))
    A = np.asarray(A)
    norm_a = np.linalg.norm(A, 2)
    err = A @ Q.T - Q.T @ T
    err[:, -1] -= np.asarray(res.residual)
    col_err = np.max(np.abs(err), axis=0) / norm_a
    # Round-off on every step that did not reorthogonalise; on those that did, the dropped
    # Gram-Schmidt coefficients (<= sqrt(eps) beta_j) show up, still below sqrt(eps) ||A||.
    assert np.sum(col_err > 1e-13) <= int(num_reortho)
    assert np.max(col_err) <= SQRT_EPS
    # Simon (1984): T is the projection of A onto span(Q) to working precision.
    N, R = np.linalg.qr(Q.T)
    N = N * np.sign(np.diag(R))
    assert np.max(np.abs(N.T @ A @ N - T)) <= 1e-13 * norm_a


def test_partial_skips_reorthogonalisation_on_a_benign_spectrum():
    A = lxt.spd_from_spectrum(jax.random.key(13), _spectrum("benign"))[0]
    v0 = jax.random.normal(jax.random.key(14), (N_PRO,))
    res, num_reortho = jax.jit(lambda v: _lanczos(lt.dense(A), v, STEPS_PRO, reortho="partial"))(v0)
    assert int(num_reortho) <= STEPS_PRO // 10  # ~90% of the steps skip the O(j n) work
    assert jnp.max(jnp.abs(res.basis @ res.basis.T - jnp.eye(STEPS_PRO))) <= 1e-7


def test_partial_breakdown_on_few_distinct_eigenvalues(getkey):
    # Three distinct eigenvalues: the Krylov space is exhausted every 3 steps. beta_3 is
    # rounding noise (~1e-14, above the exact-breakdown test eps ||A||); the estimate
    # omega_{4,3} ~ eps1 ||A|| / beta_3 then forces a reorthogonalisation, so the next
    # vector is a fresh direction orthogonal to the basis, as after an exact breakdown.
    eigs = jnp.repeat(jnp.array([1.0, 2.0, 5.0]), 20)
    A = lxt.spd_from_spectrum(getkey(), eigs)[0]
    res = lt.lanczos(lt.dense(A), jax.random.normal(getkey(), (60,)), 12, reortho="partial")
    assert jnp.all(jnp.isfinite(res.basis)) and jnp.all(jnp.isfinite(res.alphas))
    assert jnp.all(res.betas[2::3] <= 1e-10)
    np.testing.assert_allclose(res.basis @ res.basis.T, jnp.eye(12), atol=1e-12)
    theta = jnp.linalg.eigvalsh(lt.tridiagonal(res.alphas, res.betas))
    assert jnp.max(jnp.min(jnp.abs(theta[:, None] - jnp.array([1.0, 2.0, 5.0])), axis=1)) <= 1e-10
    # And the diagonal example of the full-reortho test.
    v0 = jnp.zeros(8).at[0].set(1.0).at[1].set(1.0)
    res = lt.lanczos(lt.dense(jnp.diag(jnp.arange(1.0, 9.0))), v0, 8, reortho="partial")
    assert res.betas[1] == 0.0
    np.testing.assert_allclose(res.basis @ res.basis.T, jnp.eye(8), atol=1e-12)
    theta = jnp.linalg.eigvalsh(lt.tridiagonal(res.alphas, res.betas))
    np.testing.assert_allclose(theta, jnp.arange(1.0, 9.0), atol=1e-10)


def test_partial_vmap_and_pytree_match_single_flat(getkey):
    A = lxt.spd_from_spectrum(getkey(), _spectrum("separated")[:100])[0]
    V = jax.random.normal(getkey(), (3, 100))
    run = lambda v: lt.lanczos(lt.dense(A), v, 80, reortho="partial")
    single = run(V[1])
    batched = jax.jit(jax.vmap(run))(V)  # batched cond predicates: select, same numbers
    np.testing.assert_allclose(batched.alphas[1], single.alphas, rtol=1e-10)
    np.testing.assert_allclose(batched.basis[1], single.basis, atol=1e-9)
    assert jnp.max(jnp.abs(batched.basis[2] @ batched.basis[2].T - jnp.eye(80))) <= 1e-7
    like = {"w": jnp.zeros((10, 6)), "b": jnp.zeros(40)}
    unravel = ravel_pytree(like)[1]
    tree = jax.jit(lambda v: lt.lanczos(lt.dense(A, like), v, 80, reortho="partial"))(unravel(V[1]))
    np.testing.assert_allclose(tree.alphas, single.alphas, rtol=1e-10)
    np.testing.assert_allclose(
        jax.vmap(lambda t: ravel_pytree(t)[0])(tree.basis), single.basis, atol=1e-9
    )


def test_partial_jaxpr_size_does_not_grow_with_steps(getkey):
    A = _clustered(getkey)

    def eqns(k):
        f = lambda v: lt.lanczos(lt.dense(A), v, k, reortho="partial")
        return len(jax.make_jaxpr(f)(jnp.ones(300)).eqns)

    assert eqns(10) == eqns(200)


def test_partial_float32(getkey):
    A = _clustered(getkey).astype(jnp.float32)
    res = lt.lanczos(lt.dense(A), jnp.ones(300, jnp.float32), 60, reortho="partial")
    assert res.basis.dtype == jnp.float32
    # semiorthogonal at float32's sqrt(eps) = 3.5e-4
    assert jnp.max(jnp.abs(res.basis @ res.basis.T - jnp.eye(60))) <= 1e-3
