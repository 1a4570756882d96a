"""Tests for the helpers of the curvature tour section (linjax/curvature/tour.py)."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from linjax import curvature as cv
from linjax.curvature import tour


def _tree(key):
    k1, k2 = jr.split(key)
    return {"a": jr.normal(k1, (4, 5)), "b": jr.normal(k2, (7,))}


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 1.0])
def test_prune_lowest_is_global_magnitude_pruning(getkey, sparsity):
    params = _tree(getkey())
    pruned = tour.prune_lowest(params, jax.tree.map(jnp.abs, params), sparsity)
    w = np.asarray(ravel_pytree(params)[0])
    p = np.asarray(ravel_pytree(pruned)[0])
    k = round(sparsity * w.size)
    assert np.count_nonzero(p == 0) == k
    # The k smallest magnitudes across both leaves are gone, the rest is untouched.
    lowest = np.argsort(np.abs(w), kind="stable")[:k]
    np.testing.assert_array_equal(p[lowest], 0)
    keep = np.setdiff1d(np.arange(w.size), lowest)
    np.testing.assert_array_equal(p[keep], w[keep])
    assert jax.tree.structure(pruned) == jax.tree.structure(params)
    assert tour.sparsity_of(pruned) == pytest.approx(k / w.size)


def test_prune_lowest_by_saliency_selects_what_obs_prune_zeroes(getkey):
    params = _tree(getkey())
    grads = jax.tree.map(lambda a: jr.normal(getkey(), (6, *a.shape)), params)
    state = cv.mfac_from_grads(grads, 1e-2)
    saliency = cv.obs_saliency(state, params)
    mask_only = ravel_pytree(tour.prune_lowest(params, saliency, 0.4))[0]
    obs = ravel_pytree(cv.obs_prune(params, state, 0.4))[0]
    np.testing.assert_array_equal(np.asarray(mask_only) == 0, np.asarray(obs) == 0)


def test_prune_lowest_rejects_bad_sparsity(getkey):
    params = _tree(getkey())
    with pytest.raises(ValueError, match="sparsity"):
        tour.prune_lowest(params, params, 1.5)


def test_select_best_skips_diverged_runs():
    assert tour.select_best({"a": 0.3, "b": float("nan"), "c": 0.1, "d": float("inf")}) == "c"
    with pytest.raises(RuntimeError, match="diverged"):
        tour.select_best({"a": float("nan")})


def test_mlp_init_and_apply_shapes():
    params = tour.mlp_init(jr.key(0), (64, 8, 10))
    assert sorted(params) == ["b1", "b2", "w1", "w2"]
    assert params["w1"].dtype == jnp.float64  # x64 is on in the test session
    assert tour.mlp_apply(params, jnp.ones((3, 64))).shape == (3, 10)


def test_gd_with_sharpness_on_a_quadratic():
    # L(w) = 1/2 sum_i a_i w_i^2: Hessian diag(a), so lambda_max = 3 and trace = 6 exactly
    # (Hutchinson is exact on a diagonal matrix), and GD contracts w_i by (1 - lr a_i).
    a = jnp.array([1.0, 2.0, 3.0])

    def loss(w, a, unused):
        del unused
        return 0.5 * jnp.sum(a * w**2)

    run = tour.make_gd_with_sharpness(loss, every=3, num_chunks=2)
    w0 = jnp.array([1.0, -1.0, 2.0])
    w, (losses, lam, trace) = run(0.1, w0, a, jnp.zeros(()), jr.key(0))
    assert losses.shape == (2, 3)
    np.testing.assert_allclose(lam, 3.0, rtol=1e-10)
    np.testing.assert_allclose(trace, 6.0, rtol=1e-10)
    np.testing.assert_allclose(w, w0 * (1 - 0.1 * a) ** 6, rtol=1e-12)


@pytest.mark.parametrize(
    "method, lr, damping", [("Adam", 1e-2, 0.0), ("M-FAC", 1e-2, 1e-1), ("Gauss-Newton", 0.3, 1e-1)]
)
def test_trainers_reduce_the_loss(getkey, method, lr, damping):
    # Random data and batches of 16: milder settings than the tour's digits presets.
    x = jr.normal(getkey(), (40, 64))
    y = jr.randint(getkey(), (40,), 0, 10)
    params0 = tour.mlp_init(getkey(), (64, 8, 10))
    idx = jr.randint(getkey(), (15, 16), 0, 40)
    _, losses, accs = tour.make_trainer(method)(lr, damping, params0, idx, x, y, x, y)
    assert losses.shape == accs.shape == (15,)
    assert np.all(np.isfinite(losses))
    initial = cv.softmax_cross_entropy(tour.mlp_apply(params0, x), y)
    assert losses[-1] < initial
