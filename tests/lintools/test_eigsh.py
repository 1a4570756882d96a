import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from linjax import lintools as lt
from linjax import testing as lxt

N = 400


@pytest.fixture(scope="module")
def problem():
    # 390 eigenvalues in [1, 2] plus 5 outliers at each end of the spectrum.
    rng = np.random.default_rng(0)
    eigs = np.concatenate(
        [[0.01, 0.02, 0.05, 0.1, 0.2], rng.uniform(1.0, 2.0, N - 10), [5.0, 10.0, 20.0, 40.0, 80.0]]
    )
    A, _ = lxt.spd_from_spectrum(jax.random.key(42), jnp.asarray(eigs))
    w, V = np.linalg.eigh(np.asarray(A))
    return A, w, V


def _angle(u, v):
    c = jnp.abs(u @ v) / (jnp.linalg.norm(u) * jnp.linalg.norm(v))
    return jnp.arccos(jnp.clip(c, 0.0, 1.0))


@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigsh_matches_numpy(problem, getkey, which):
    A, w, V = problem
    vals, vecs = jax.jit(
        lambda key: lt.eigsh(lt.dense(A), jnp.zeros(N), 5, key=key, num_steps=120, which=which)
    )(getkey())
    idx = np.arange(N - 1, N - 6, -1) if which == "largest" else np.arange(5)
    np.testing.assert_allclose(vals, w[idx], rtol=1e-8)
    assert vecs.shape == (5, N)
    for i in range(5):
        assert _angle(vecs[i], V[:, idx[i]]) <= 1e-6
        # Ritz pairs are eigenpairs: small residual.
        assert jnp.linalg.norm(A @ vecs[i] - vals[i] * vecs[i]) <= 1e-6 * 80


@pytest.mark.parametrize("reortho", ["partial", "full"])
@pytest.mark.parametrize("which", ["largest", "smallest"])
def test_eigsh_reortho_matches_numpy_to_1e10(problem, getkey, which, reortho):
    # Partial (the default) and full reorthogonalisation give the same accuracy; 200 steps
    # are enough for 1e-10 on all eight extreme eigenvalues (two of them in the bulk edge).
    A, w, V = problem
    vals, vecs = jax.jit(
        lambda key: lt.eigsh(
            lt.dense(A), jnp.zeros(N), 8, key=key, num_steps=200, which=which, reortho=reortho
        )
    )(getkey())
    idx = np.arange(N - 1, N - 9, -1) if which == "largest" else np.arange(8)
    np.testing.assert_allclose(vals, w[idx], rtol=1e-10)
    np.testing.assert_allclose(jnp.linalg.norm(vecs, axis=1), 1.0, rtol=1e-12)
    for i in range(5):
        assert _angle(vecs[i], V[:, idx[i]]) <= 1e-7


def test_eigsh_pytree_eigenvectors(problem, getkey):
    A, w, _ = problem
    like = {"w": jnp.zeros((20, 10)), "b": jnp.zeros((200,))}
    mv = lt.dense(A, like)
    key = getkey()
    vals_t, vecs_t = lt.eigsh(mv, like, 3, key=key, num_steps=80)
    np.testing.assert_allclose(vals_t, w[::-1][:3], rtol=1e-8)
    assert vecs_t["w"].shape == (3, 20, 10) and vecs_t["b"].shape == (3, 200)
    for i in range(3):
        u = ravel_pytree(jax.tree.map(lambda x, i=i: x[i], vecs_t))[0]
        np.testing.assert_allclose(jnp.linalg.norm(u), 1.0, rtol=1e-10)
        assert jnp.linalg.norm(A @ u - vals_t[i] * u) <= 1e-6 * 80


def test_eigsh_default_num_steps_and_small_dim(getkey):
    A, _ = lxt.spd_from_spectrum(getkey(), jnp.arange(1.0, 11.0))
    vals, _ = lt.eigsh(lt.dense(A), jnp.zeros(10), 10, key=getkey())
    np.testing.assert_allclose(vals, jnp.arange(10.0, 0.0, -1.0), rtol=1e-10)


def test_eigsh_bad_input(getkey):
    mv = lt.dense(jnp.eye(6))
    with pytest.raises(ValueError, match="k=7"):
        lt.eigsh(mv, jnp.zeros(6), 7, key=getkey())
    with pytest.raises(ValueError, match="k=0"):
        lt.eigsh(mv, jnp.zeros(6), 0, key=getkey())
    with pytest.raises(ValueError, match="which"):
        lt.eigsh(mv, jnp.zeros(6), 2, key=getkey(), which="middle")
    with pytest.raises(ValueError, match="num_steps=1"):
        lt.eigsh(mv, jnp.zeros(6), 2, key=getkey(), num_steps=1)
    with pytest.raises(TypeError, match="floating"):
        lt.eigsh(mv, jnp.zeros(6, jnp.int32), 2, key=getkey())
    with pytest.raises(ValueError, match="reortho='none' must be one of .*'partial', 'full'"):
        lt.eigsh(mv, jnp.zeros(6), 2, key=getkey(), reortho="none")
