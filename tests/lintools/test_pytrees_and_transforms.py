"""Pytree inputs equal their flat equivalent; jit, vmap, no retracing, dtype preservation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from linjax import lintools as lt
from linjax import testing as lxt

LIKE = {"w": jnp.zeros((6, 5)), "b": jnp.zeros(4), "s": jnp.zeros(())}
N = 35


@pytest.fixture(scope="module")
def A():
    return lxt.spd_from_spectrum(jax.random.key(3), jnp.geomspace(0.5, 50.0, N))[0]


def _tree(v):
    return ravel_pytree(LIKE)[1](v)


def _flat(t):
    return ravel_pytree(t)[0]


def test_pytree_matches_flat(A, getkey):
    mv_flat, mv_tree = lt.dense(A), lt.dense(A, LIKE)
    b = jax.random.normal(getkey(), (N,))
    key = getkey()

    x_flat = lt.cg(mv_flat, b, rtol=1e-12).x
    x_tree = lt.cg(mv_tree, _tree(b), rtol=1e-12).x
    np.testing.assert_allclose(_flat(x_tree), x_flat, rtol=1e-10)

    r_flat = lt.lanczos(mv_flat, b, 20)
    r_tree = lt.lanczos(mv_tree, _tree(b), 20)
    np.testing.assert_allclose(r_tree.alphas, r_flat.alphas, rtol=1e-10)
    np.testing.assert_allclose(r_tree.betas, r_flat.betas, rtol=1e-10)
    basis_tree = jax.vmap(_flat)(r_tree.basis)
    np.testing.assert_allclose(basis_tree, r_flat.basis, atol=1e-10)

    tr_flat = lt.hutchinson_trace(mv_flat, jnp.zeros(N), key=key, num_probes=5)
    tr_tree = lt.hutchinson_trace(mv_tree, LIKE, key=key, num_probes=5)
    assert jnp.isfinite(tr_flat) and jnp.isfinite(tr_tree)
    vals_flat, _ = lt.eigsh(mv_flat, jnp.zeros(N), 3, key=key, num_steps=N)
    vals_tree, _ = lt.eigsh(mv_tree, LIKE, 3, key=key, num_steps=N)
    np.testing.assert_allclose(vals_tree, vals_flat, rtol=1e-10)


def test_vmap_over_probes_and_rhs(A, getkey):
    mv = lt.dense(A)
    V = jax.random.normal(getkey(), (4, N))
    batched = jax.jit(jax.vmap(lambda v: lt.lanczos(mv, v, 10)))(V)
    single = lt.lanczos(mv, V[2], 10)
    np.testing.assert_allclose(batched.alphas[2], single.alphas, rtol=1e-12)
    np.testing.assert_allclose(batched.basis[2], single.basis, atol=1e-12)
    quads = jax.vmap(lambda v: lt.gauss_quadrature(mv, v, 5))(V)
    assert quads.nodes.shape == (4, 5)
    keys = jax.random.split(getkey(), 3)
    traces = jax.vmap(lambda k: lt.hutchinson_trace(mv, jnp.zeros(N), key=k, num_probes=4))(keys)
    assert traces.shape == (3,)
    np.testing.assert_allclose(
        traces[1], lt.hutchinson_trace(mv, jnp.zeros(N), key=keys[1], num_probes=4), rtol=1e-12
    )


def test_vmap_over_operator_params(getkey):
    # A batch of operators: matvec data travels in *params, so vmap maps over it.
    eigs = jnp.stack([jnp.linspace(1.0, 5.0 * (i + 1), 12) for i in range(3)])
    mats = jax.vmap(lambda e: lxt.spd_from_spectrum(jax.random.key(0), e)[0])(eigs)
    mv = lambda v, M: M @ v
    vals, _ = jax.vmap(lambda M: lt.eigsh(mv, jnp.zeros(12), 1, M, key=jax.random.key(1)))(mats)
    np.testing.assert_allclose(vals[:, 0], [5.0, 10.0, 15.0], rtol=1e-10)


def test_no_retrace_on_new_values(A, getkey):
    mv = lambda v, M: M @ v
    b1, b2 = jax.random.normal(getkey(), (2, N))

    def solve_and_spectrum(M, b, key):
        x = lt.cg(mv, b, M, rtol=1e-8).x
        vals, _ = lt.eigsh(mv, b, 2, M, key=key, num_steps=10)
        quad = lt.slq(mv, b, M, key=key, num_probes=2, num_steps=5)
        return x, vals, quad, lt.hutchinson_diagonal(mv, b, M, key=key, num_probes=3)

    lxt.assert_no_retrace(
        solve_and_spectrum, (A, b1, getkey()), (2.0 * A, b2, getkey()), (A + 1.0, b1, getkey())
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_outputs_follow_input_dtype(A, getkey, dtype):
    # The operator holds float64 data; vectors in a lower precision stay in that precision.
    like = {"a": jnp.zeros(N - 5, dtype), "b": jnp.zeros(5, dtype)}
    mv = lt.dense(A, like)
    b = jax.tree.map(jnp.ones_like, like)
    key = getkey()
    outs = [
        lt.cg(mv, b, rtol=1e-2).x,
        lt.lanczos(mv, b, 4).basis,
        lt.eigsh(mv, like, 2, key=key, num_steps=6)[1],
        lt.hutchinson_diagonal(mv, like, key=key, num_probes=2),
    ]
    for out in outs:
        for leaf in jax.tree.leaves(out):
            assert leaf.dtype == dtype
    assert lt.eigsh(mv, like, 2, key=key, num_steps=6)[0].dtype == dtype
    assert lt.slq(mv, like, key=key, num_probes=2, num_steps=3).nodes.dtype == dtype
    assert lt.hutchinson_trace(mv, like, key=key, num_probes=2).dtype == dtype


def test_mismatched_structures_raise(A):
    mv = lt.dense(A, LIKE)
    with pytest.raises(ValueError, match="x0 and b"):
        lt.cg(mv, LIKE, x0={"w": jnp.zeros((6, 5)), "b": jnp.zeros(4)})
    with pytest.raises(TypeError, match="matvec.*failed for v with structure"):
        lt.cg(lt.dense(A), LIKE)
    with pytest.raises(ValueError, match="structure"):
        lt.cg(lambda v: v["w"], LIKE)
    with pytest.raises(TypeError, match="floating"):
        lt.cg(lt.dense(jnp.eye(3)), jnp.arange(3))
    with pytest.raises(ValueError, match="rtol"):
        lt.cg(lt.dense(jnp.eye(3)), jnp.ones(3), rtol=-1.0)
    with pytest.raises(ValueError, match="max_steps=0"):
        lt.cg(lt.dense(jnp.eye(3)), jnp.ones(3), max_steps=0)
