import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import lintools as lt
from linjax import testing as lxt


def test_exact_on_diagonal_matrices(getkey):
    d = jax.random.normal(getkey(), (50,))
    mv = lt.dense(jnp.diag(d))
    tr = lt.hutchinson_trace(mv, jnp.zeros(50), key=getkey(), num_probes=3)
    diag = lt.hutchinson_diagonal(mv, jnp.zeros(50), key=getkey(), num_probes=3)
    np.testing.assert_allclose(tr, jnp.sum(d), rtol=1e-12)
    np.testing.assert_allclose(diag, d, rtol=1e-12)


def test_exact_on_diagonal_pytree_operator(getkey):
    like = {"a": jnp.zeros((3, 4)), "b": jnp.zeros(5)}
    scale = {"a": jnp.arange(12.0).reshape(3, 4), "b": -jnp.arange(5.0)}
    mv = lambda v, s: jax.tree.map(jnp.multiply, s, v)
    diag = lt.hutchinson_diagonal(mv, like, scale, key=getkey(), num_probes=5, batch_size=2)
    lxt.assert_trees_close(diag, scale, rtol=1e-12, atol=1e-12)
    tr = lt.hutchinson_trace(mv, like, scale, key=getkey(), num_probes=5, batch_size=2)
    np.testing.assert_allclose(tr, 66.0 - 10.0, rtol=1e-12)


def test_general_matrix_within_variance_bound(getkey):
    n = 60
    A, _ = lxt.spd_from_spectrum(getkey(), jnp.linspace(0.0, 2.0, n))
    num = 500
    est = lt.hutchinson_trace(
        lt.dense(A), jnp.zeros(n), key=getkey(), num_probes=num, batch_size=16
    )
    sigma = jnp.sqrt(2 * (jnp.sum(A**2) - jnp.sum(jnp.diag(A) ** 2)) / num)
    assert jnp.abs(est - jnp.trace(A)) <= 4 * sigma
    diag = lt.hutchinson_diagonal(lt.dense(A), jnp.zeros(n), key=getkey(), num_probes=num)
    off = jnp.sum(A**2, axis=1) - jnp.diag(A) ** 2
    assert jnp.all(jnp.abs(diag - jnp.diag(A)) <= 5 * jnp.sqrt(off / num))


def test_batching_does_not_change_the_estimate(getkey):
    A, _ = lxt.spd_from_spectrum(getkey(), jnp.linspace(0.0, 2.0, 20))
    key = getkey()
    ests = [
        lt.hutchinson_trace(lt.dense(A), jnp.zeros(20), key=key, num_probes=13, batch_size=b)
        for b in (1, 4, 13, 100)
    ]
    np.testing.assert_allclose(ests, ests[0], rtol=1e-12)


def test_bad_input(getkey):
    with pytest.raises(ValueError, match="num_probes=0"):
        lt.hutchinson_trace(lt.dense(jnp.eye(2)), jnp.zeros(2), key=getkey(), num_probes=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        lt.hutchinson_diagonal(
            lt.dense(jnp.eye(2)), jnp.zeros(2), key=getkey(), num_probes=2, batch_size=0
        )
    with pytest.raises(ValueError, match="structure"):
        lt.hutchinson_trace(lambda v: (v, v), jnp.zeros(2), key=getkey(), num_probes=2)
