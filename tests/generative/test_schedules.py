"""Schedules against hand-computed values, the DDIM timestep grid and the eps/x0 conversions."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from linjax import generative as gen


def test_linear_schedule_hand_computed():
    s = gen.linear_schedule(1000, 1e-4, 2e-2)
    ac = np.asarray(s.alphas_cumprod)
    assert s.num_train_steps == 1000 and ac.shape == (1000,) and ac.dtype == np.float64
    beta1 = 1e-4 + (2e-2 - 1e-4) / 999
    assert ac[0] == pytest.approx(1 - 1e-4, rel=1e-15)
    assert ac[1] == pytest.approx((1 - 1e-4) * (1 - beta1), rel=1e-15)
    prod = 1.0
    for i in range(1000):  # plain Python product of (1 - beta_i)
        prod *= 1 - (1e-4 + i * (2e-2 - 1e-4) / 999)
    assert ac[-1] == pytest.approx(prod, rel=1e-12)
    assert 4.0e-5 < ac[-1] < 4.1e-5  # the familiar DDPM value
    assert np.all(np.diff(ac) < 0)


def test_scaled_linear_schedule_is_stable_diffusions():
    s = gen.scaled_linear_schedule()
    ac = np.asarray(s.alphas_cumprod)
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2
    np.testing.assert_allclose(ac, np.cumprod(1 - betas), rtol=1e-14)
    assert ac[0] == pytest.approx(1 - 0.00085, rel=1e-15)
    assert ac[-1] == pytest.approx(0.00466, rel=1e-2)  # SD-1.x alpha-bar at t = 999


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_schedule_matches_its_formula_with_clipping(T):
    s = gen.cosine_schedule(T)
    ac = np.asarray(s.alphas_cumprod)

    def f(u):
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    expected = np.array([f((t + 1) / T) / f(0) for t in range(T)])
    # Unclipped entries follow f((t + 1) / T) / f(0); the last beta is 1 - 0 and is clipped.
    np.testing.assert_allclose(ac[:-1], expected[:-1], rtol=1e-12)
    assert ac[-1] == pytest.approx(ac[-2] * (1 - 0.999), rel=1e-12)
    assert expected[-1] < 1e-30 and ac[-1] > 0
    betas = 1 - ac[1:] / ac[:-1]
    assert np.all(betas <= 0.999 + 1e-12)


def test_ddim_timesteps_is_the_stable_diffusion_grid():
    t, t_prev = gen.ddim_timesteps(1000, 50)
    assert t.dtype == np.int32 and t.shape == (50,)
    np.testing.assert_array_equal(t, np.arange(981, 0, -20))
    np.testing.assert_array_equal(t_prev, np.arange(961, -20, -20))
    t, t_prev = gen.ddim_timesteps(1000, 3)  # floor(1000 / 3) = 333
    np.testing.assert_array_equal(t, [667, 334, 1])
    np.testing.assert_array_equal(t_prev, [334, 1, -332])
    t, t_prev = gen.ddim_timesteps(1000, 1)
    np.testing.assert_array_equal(t, [1])
    np.testing.assert_array_equal(t_prev, [-999])
    # num_steps == num_train_steps: every step, and the offset is dropped to stay in range.
    t, t_prev = gen.ddim_timesteps(10, 10)
    np.testing.assert_array_equal(t, np.arange(9, -1, -1))
    np.testing.assert_array_equal(t_prev, np.arange(8, -2, -1))
    t, _ = gen.ddim_timesteps(10, 9)
    np.testing.assert_array_equal(t, np.arange(9, 0, -1))


def test_eps_x0_conversions_invert_the_forward_noising(getkey):
    import jax.random as jr

    x0, eps = jr.normal(getkey(), (3, 4)), jr.normal(getkey(), (3, 4))
    ac = 0.3
    xt = math.sqrt(ac) * x0 + math.sqrt(1 - ac) * eps
    np.testing.assert_allclose(gen.eps_to_x0(xt, eps, ac), x0, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(gen.x0_to_eps(xt, x0, ac), eps, rtol=1e-13, atol=1e-13)
    tree = gen.eps_to_x0({"a": xt}, {"a": eps}, jnp.asarray(ac))
    np.testing.assert_allclose(tree["a"], x0, rtol=1e-13, atol=1e-13)


def test_bad_inputs():
    for fn in (gen.linear_schedule, gen.scaled_linear_schedule, gen.cosine_schedule):
        with pytest.raises(ValueError, match="num_train_steps=1 must be >= 2"):
            fn(1)
        with pytest.raises(TypeError, match="num_train_steps=2.5"):
            fn(2.5)
    for bad in (0.0, -1e-3, 1.0, 2.0, float("nan")):
        with pytest.raises(ValueError, match="beta_start="):
            gen.linear_schedule(100, beta_start=bad)
        with pytest.raises(ValueError, match="beta_end="):
            gen.scaled_linear_schedule(100, beta_end=bad)
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):
        gen.ddim_timesteps(1000, 0)
    with pytest.raises(ValueError, match="num_steps=1001 must be <= the schedule's"):
        gen.ddim_timesteps(1000, 1001)
    with pytest.raises(TypeError, match="num_steps=10.0"):
        gen.ddim_timesteps(1000, 10.0)
