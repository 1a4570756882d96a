"""DDIM sampling and inversion: closed-form Gaussian ODE, first-order convergence, transforms
and input errors."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from linjax import generative as gen
from linjax import testing as lxt

D = 8


def _sigma_tilde_sq(ac):
    return (1 - ac) / ac


def _gaussian_flow(schedule, mu, s2, x, ac_from, ac_to):
    """Exact probability-flow ODE map between two noise levels for N(mu, diag(s2)) data.

    In xbar = x / alpha and sigma~ = sigma / alpha the ODE is d xbar / d sigma~ = eps*, whose
    solution for Gaussian data is xbar - mu proportional to sqrt(s2 + sigma~^2).
    """
    ratio = jnp.sqrt((s2 + _sigma_tilde_sq(ac_to)) / (s2 + _sigma_tilde_sq(ac_from)))
    return jnp.sqrt(ac_to) * (mu + (x / jnp.sqrt(ac_from) - mu) * ratio)


def _endpoints(schedule, num_steps):
    t, _ = gen.ddim_timesteps(schedule.num_train_steps, num_steps)
    return schedule.alphas_cumprod[t[0]], schedule.alphas_cumprod[0]


@pytest.mark.parametrize("make", [gen.linear_schedule, gen.scaled_linear_schedule])
def test_sampling_with_exact_gaussian_eps_converges_to_the_ode_solution(getkey, gaussian_eps, make):
    s = make(1000)
    mu, s2 = jr.normal(getkey(), (D,)), jnp.linspace(0.05, 2.0, D)
    eps_fn = gaussian_eps(s, mu, s2)
    x_T = jr.normal(getkey(), (4, D))
    errs = {}
    for n in (10, 40, 250, 1000):
        ac_T, ac_0 = _endpoints(s, n)
        expected = _gaussian_flow(s, mu, s2, x_T, ac_T, ac_0)
        errs[n] = float(lxt.rel_err(gen.ddim_sample(eps_fn, x_T, s, num_steps=n), expected))
    # First order: 4x the steps, about 4x smaller error (measured 3.7-4.0).
    assert 3.0 < errs[10] / errs[40] < 5.0
    assert 3.0 < errs[250] / errs[1000] < 5.0
    assert errs[1000] < 3e-3


def test_inversion_with_exact_gaussian_eps_converges_to_the_ode_solution(getkey, gaussian_eps):
    s = gen.linear_schedule()
    mu, s2 = jr.normal(getkey(), (D,)), jnp.linspace(0.05, 2.0, D)
    eps_fn = gaussian_eps(s, mu, s2)
    x0 = mu + jnp.sqrt(s2) * jr.normal(getkey(), (4, D))
    errs = {}
    for n in (25, 100, 1000):
        ac_T, ac_0 = _endpoints(s, n)
        expected = _gaussian_flow(s, mu, s2, x0, ac_0, ac_T)
        errs[n] = float(lxt.rel_err(gen.ddim_invert(eps_fn, x0, s, num_steps=n), expected))
    assert 3.0 < errs[25] / errs[100] < 5.0
    assert errs[1000] < 1e-2


def test_constant_eps_is_integrated_exactly(getkey):
    # eps(x, t) = c: the DDIM update is the exact flow xbar' = xbar + (sigma~' - sigma~) c.
    s = gen.scaled_linear_schedule()
    c = jr.normal(getkey(), (D,))
    x_T = jr.normal(getkey(), (D,))
    for n in (1, 7, 50):
        ac_T, ac_0 = _endpoints(s, n)
        st = lambda a: jnp.sqrt(_sigma_tilde_sq(a))
        expected = jnp.sqrt(ac_0) * (x_T / jnp.sqrt(ac_T) + (st(ac_0) - st(ac_T)) * c)
        out = gen.ddim_sample(lambda x, t, cond: c, x_T, s, num_steps=n)
        np.testing.assert_allclose(out, expected, rtol=1e-10, atol=1e-12)
        back = gen.ddim_invert(lambda x, t, cond: c, expected, s, num_steps=n)
        np.testing.assert_allclose(back, x_T, rtol=1e-9, atol=1e-9)


def test_round_trip_error_falls_like_one_over_n(getkey, mlp_eps):
    s = gen.linear_schedule()
    x0 = jr.normal(getkey(), (4, 16))

    def round_trip(n):
        x_T = jax.jit(lambda x: gen.ddim_invert(mlp_eps, x, s, num_steps=n))(x0)
        return float(
            lxt.rel_err(jax.jit(lambda x: gen.ddim_sample(mlp_eps, x, s, num_steps=n))(x_T), x0)
        )

    e125, e500 = round_trip(125), round_trip(500)
    # reference/generative.md finding 2: the error falls with N (first order), it does not grow.
    assert 1e-2 < e500 < e125
    assert 3.0 < e125 / e500 < 5.0  # measured 3.6


def test_timestep_labels_and_cond_reach_the_model(getkey):
    s = gen.linear_schedule()
    seen = []

    def eps_fn(x, t, cond):
        jax.debug.callback(lambda t_, c_: seen.append((int(t_), float(c_["w"]))), t, cond)
        return 0 * x

    gen.ddim_sample(eps_fn, jnp.ones(2), s, num_steps=4, cond={"w": jnp.asarray(0.5)})
    jax.effects_barrier()
    assert seen == [(751, 0.5), (501, 0.5), (251, 0.5), (1, 0.5)]
    seen.clear()
    gen.ddim_invert(eps_fn, jnp.ones(2), s, num_steps=4, cond={"w": jnp.asarray(2.0)})
    jax.effects_barrier()
    assert seen == [(1, 2.0), (251, 2.0), (501, 2.0), (751, 2.0)]


def test_jit_vmap_pytrees_and_no_retrace(getkey, mlp_eps):
    s = gen.linear_schedule()
    x_T, cond = jr.normal(getkey(), (5, 16)), jr.normal(getkey(), (5, 3))
    batched = gen.ddim_sample(mlp_eps, x_T, s, num_steps=12, cond=cond)
    sample = jax.jit(jax.vmap(lambda x, c: gen.ddim_sample(mlp_eps, x, s, num_steps=12, cond=c)))
    np.testing.assert_allclose(sample(x_T, cond), batched, rtol=1e-12, atol=1e-12)
    invert = jax.jit(jax.vmap(lambda x, c: gen.ddim_invert(mlp_eps, x, s, num_steps=12, cond=c)))
    np.testing.assert_allclose(
        invert(x_T, cond),
        gen.ddim_invert(mlp_eps, x_T, s, num_steps=12, cond=cond),
        rtol=1e-12,
        atol=1e-12,
    )
    # A dict sample: the model sees the same tree.
    tree_eps = lambda x, t, c: {"a": mlp_eps(x["a"], t, c), "b": -x["b"]}
    out = gen.ddim_sample(tree_eps, {"a": x_T, "b": jnp.ones(2)}, s, num_steps=12, cond=cond)
    np.testing.assert_allclose(out["a"], batched, rtol=1e-13)
    # New values (sample, condition and schedule) reuse the compiled sampler.
    s2 = gen.cosine_schedule()
    fn = lambda x, c, sch: gen.ddim_sample(mlp_eps, x, sch, num_steps=12, cond=c)
    lxt.assert_no_retrace(fn, (x_T, cond, s), (2 * x_T, -cond, s2))


def test_dtype_follows_the_sample(mlp_eps):
    s = gen.linear_schedule()  # float64 under x64
    x = jnp.ones((2, 16), jnp.float32)
    assert gen.ddim_sample(mlp_eps, x, s, num_steps=5).dtype == jnp.float32
    assert gen.ddim_invert(mlp_eps, x, s, num_steps=5).dtype == jnp.float32


def test_bad_inputs(mlp_eps):
    s = gen.linear_schedule(100)
    x = jnp.ones((2, 16))
    for fn in (gen.ddim_sample, gen.ddim_invert):
        with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):
            fn(mlp_eps, x, s, num_steps=0)
        with pytest.raises(ValueError, match="num_steps=101 must be <= the schedule's"):
            fn(mlp_eps, x, s, num_steps=101)
        with pytest.raises(TypeError, match="num_steps=2.0"):
            fn(mlp_eps, x, s, num_steps=2.0)
        with pytest.raises(ValueError, match=r"returned shape \(2, 15\), but x has shape"):
            fn(lambda x, t, c: x[:, 1:], x, s, num_steps=3)
        with pytest.raises(TypeError, match="returned dtype float32, but x has dtype float64"):
            fn(lambda x, t, c: x.astype(jnp.float32), x, s, num_steps=3)
        with pytest.raises(ValueError, match="returned structure"):
            fn(lambda x, t, c: (x, x), x, s, num_steps=3)
        with pytest.raises(TypeError, match="eps_fn must be callable"):
            fn("model", x, s, num_steps=3)
        with pytest.raises(TypeError, match=r"eps_fn\(x, t, cond\) failed"):
            fn(lambda x, t, c: x @ jnp.ones((3, 3)), x, s, num_steps=3)
        with pytest.raises(TypeError, match="must have real floating-point leaves"):
            fn(mlp_eps, jnp.ones((2, 16), jnp.int32), s, num_steps=3)
        with pytest.raises(TypeError, match="must be a Schedule"):
            fn(mlp_eps, x, jnp.linspace(0.9, 0.1, 10), num_steps=3)
        with pytest.raises(ValueError, match=r"entries must lie in \(0, 1\)"):
            fn(mlp_eps, x, gen.Schedule(jnp.linspace(1.0, 0.1, 10)), num_steps=3)
        with pytest.raises(ValueError, match=r"shape \[num_train_steps >= 2\]"):
            fn(mlp_eps, x, gen.Schedule(jnp.full((2, 5), 0.5)), num_steps=3)
    stateful = gen.StatefulEpsFn(lambda x: jnp.zeros(()), lambda x, t, c, st: (x, st + 1))
    with pytest.raises(TypeError, match="ddim_invert needs a stateless eps_fn"):
        gen.ddim_invert(stateful, x, s, num_steps=3)
