"""Flow matching and ODE sampling against the closed-form Gaussian flow: the loss formula, its
irreducible value and zero gradient at the exact velocity, Euler/Heun convergence orders,
transforms and input errors."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from linjax import generative as gen
from linjax import testing as lxt

# Data N(MU, diag(LAM)), base N(0, S0^2 I), linear interpolant (reference/generative.md §2.3).
MU = jnp.array([1.5, -0.5, 0.3])
LAM = jnp.array([0.3, 2.0, 1.0])
S0 = 1.0


def _S(t):
    return (1 - t) ** 2 * S0**2 + t**2 * LAM


def exact_velocity(t, x):
    """b_t(x) = mu + (t lam - (1 - t) s0^2) / S_t (x - t mu), per coordinate."""
    return MU + (t * LAM - (1 - t) * S0**2) / _S(t) * (x - t * MU)


def exact_map_01(x0):
    """X_{0,1}(x) = mu + sqrt(lam / s0^2) x."""
    return MU + jnp.sqrt(LAM / S0**2) * x0


def _pairs(getkey, n):
    x0 = S0 * jr.normal(getkey(), (n, 3))
    x1 = MU + jnp.sqrt(LAM) * jr.normal(getkey(), (n, 3))
    return x0, x1


def _irreducible():
    """E_t E |Idot - b_t(I_t)|^2 = sum_i int_0^1 [lam + s0^2 - (t lam - (1-t) s0^2)^2 / S_t] dt."""
    nodes, weights = np.polynomial.legendre.leggauss(200)
    t = (nodes + 1) / 2
    lam = np.asarray(LAM)[None]
    s = (1 - t[:, None]) ** 2 * S0**2 + t[:, None] ** 2 * lam
    integrand = lam + S0**2 - (t[:, None] * lam - (1 - t[:, None]) * S0**2) ** 2 / s
    return float(np.sum(weights[:, None] * integrand) / 2)


def _per_sample_losses(velocity_fn, params, x0, x1, key):
    # The documented draw: t = jax.random.uniform(key, (batch,)).
    t = jr.uniform(key, (x0.shape[0],), x0.dtype)[:, None]
    xt = (1 - t) * x0 + t * x1
    v = jax.vmap(lambda ti, xi: velocity_fn(params, ti, xi))(t[:, 0], xt)
    return jnp.sum((v - (x1 - x0)) ** 2, axis=1)


def test_loss_formula_and_irreducible_value_at_the_exact_velocity(getkey):
    x0, x1 = _pairs(getkey, 100_000)
    key = getkey()
    velocity_fn = lambda p, t, x: exact_velocity(t, x)
    loss = jax.jit(gen.flow_matching_loss, static_argnums=0)(velocity_fn, None, x0, x1, key)
    per_sample = _per_sample_losses(velocity_fn, None, x0, x1, key)
    np.testing.assert_allclose(loss, jnp.mean(per_sample), rtol=1e-12)
    # Monte Carlo: within 4 standard errors of the closed-form floor (about 1.8 here).
    stderr = float(jnp.std(per_sample)) / np.sqrt(per_sample.size)
    assert abs(float(loss) - _irreducible()) <= 4 * stderr
    # A wrong velocity pays the excess E|v - b|^2 on top: here 0.25 * E|x_t|^2 > 0.5.
    wrong = lambda p, t, x: exact_velocity(t, x) + 0.5 * x
    assert float(gen.flow_matching_loss(wrong, None, x0, x1, key)) > _irreducible() + 0.5


def test_gradient_vanishes_at_the_exact_velocity(getkey):
    # v_theta = b + theta * psi: the expected gradient at theta = 0 is 2 E<psi, b - Idot> = 0.
    psi = lambda t, x: jnp.stack([jnp.sin(x[0]), t * x[1], x[2] ** 2])
    velocity_fn = lambda theta, t, x: exact_velocity(t, x) + theta * psi(t, x)
    x0, x1 = _pairs(getkey, 100_000)
    key = getkey()
    grad = jax.grad(gen.flow_matching_loss, argnums=1)
    g0 = float(grad(velocity_fn, 0.0, x0, x1, key))
    # Per-sample gradients 2 <psi, b - Idot> at the documented times, for the standard error.
    t = jr.uniform(key, (x0.shape[0],), x0.dtype)
    xt = (1 - t[:, None]) * x0 + t[:, None] * x1
    residual = jax.vmap(exact_velocity)(t, xt) - (x1 - x0)
    per_sample = 2 * jnp.sum(jax.vmap(psi)(t, xt) * residual, axis=1)
    np.testing.assert_allclose(g0, jnp.mean(per_sample), rtol=1e-10)
    stderr = float(jnp.std(per_sample)) / np.sqrt(x0.shape[0])
    assert abs(g0) <= 4 * stderr
    # Away from the minimiser the gradient is 2 theta E|psi|^2 (about 0.6 at theta = 0.1).
    assert float(grad(velocity_fn, 0.1, x0, x1, key)) > 20 * stderr


@pytest.mark.parametrize("method, order", [("euler", 1), ("heun", 2)])
def test_sample_ode_converges_at_its_order(getkey, method, order):
    x0 = S0 * jr.normal(getkey(), (64, 3))
    expected = exact_map_01(x0)
    run = jax.jit(
        lambda x, n: gen.sample_ode(exact_velocity, x, num_steps=n, method=method), static_argnums=1
    )
    errors = [float(lxt.rel_err(run(x0, n), expected)) for n in (20, 40, 80)]
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    np.testing.assert_allclose(rates, order, atol=0.15)
    assert errors[-1] < (2e-2 if order == 1 else 1e-4)


def test_sample_ode_matches_a_plain_loop_and_keeps_dtypes(getkey):
    velocity_fn = lambda t, x: {"a": jnp.sin(t + x["a"]), "b": (-t * x["b"]).astype(jnp.float32)}
    x0 = {"a": jr.normal(getkey(), (2, 3)), "b": jr.normal(getkey(), (4,), jnp.float32)}
    n = 7
    for method in ("euler", "heun"):
        out = gen.sample_ode(velocity_fn, x0, num_steps=n, method=method)
        x = x0
        for k in range(n):
            t = k / n
            v = velocity_fn(t, x)
            if method == "euler":
                x = jax.tree.map(lambda a, b: a + b / n, x, v)
            else:
                pred = jax.tree.map(lambda a, b: a + b / n, x, v)
                v2 = velocity_fn((k + 1) / n, pred)
                x = jax.tree.map(lambda a, b, c: a + (b + c) / (2 * n), x, v, v2)
        assert out["a"].dtype == jnp.float64 and out["b"].dtype == jnp.float32
        lxt.assert_trees_close(out, x, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(out["a"], x["a"], rtol=1e-13)


def test_sample_ode_vmap_and_no_retrace(getkey):
    x0 = jr.normal(getkey(), (5, 3))
    run = lambda x: gen.sample_ode(exact_velocity, x, num_steps=6, method="heun")
    lxt.assert_trees_close(jax.jit(jax.vmap(run))(x0), run(x0), rtol=1e-13)
    lxt.assert_no_retrace(run, (x0,), (2 * x0,))


def test_bad_inputs():
    x = jnp.ones((4, 3))
    v = lambda t, x: x
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):
        gen.sample_ode(v, x, num_steps=0)
    with pytest.raises(ValueError, match="method='rk4' must be one of"):
        gen.sample_ode(v, x, num_steps=3, method="rk4")
    with pytest.raises(ValueError, match=r"returned shape \(4, 2\)"):
        gen.sample_ode(lambda t, x: x[:, :2], x, num_steps=3)
    with pytest.raises(TypeError, match="velocity_fn must be callable"):
        gen.sample_ode(None, x, num_steps=3)
    velocity_fn = lambda p, t, x: x
    key = jr.key(0)
    with pytest.raises(ValueError, match="x0 and x1 have mismatched leaves"):
        gen.flow_matching_loss(velocity_fn, None, x, jnp.ones((4, 2)), key)
    with pytest.raises(ValueError, match="must be batches"):
        gen.flow_matching_loss(velocity_fn, None, jnp.ones(()), jnp.ones(()), key)
    with pytest.raises(TypeError, match="real floating-point leaves"):
        gen.flow_matching_loss(velocity_fn, None, x.astype(jnp.int32), x.astype(jnp.int32), key)
