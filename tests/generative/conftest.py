"""Toy noise predictors shared by the generative tests (no pretrained weights needed)."""

import jax.numpy as jnp
import jax.random as jr
import pytest

D, H, C = 16, 32, 3  # sample, hidden and condition sizes


@pytest.fixture(scope="module")
def mlp_eps():
    """A random nonlinear ``eps_fn(x, t, cond)``: a tanh MLP of x, t and (optionally) cond.

    ``tanh(x W1 + sin(t / 100) + cond Wc) W2 + 0.3 x`` (reference/generative.md §4), row-wise,
    so it takes ``[D]`` or ``[batch, D]`` samples and ``[C]`` / ``[batch, C]`` conditions.
    """
    k1, k2, k3 = jr.split(jr.key(1234), 3)
    w1 = jr.normal(k1, (D, H), jnp.float64) / jnp.sqrt(D)
    w2 = jr.normal(k2, (H, D), jnp.float64) / jnp.sqrt(H)
    wc = jr.normal(k3, (C, H), jnp.float64)

    def eps_fn(x, t, cond):
        h = x @ w1.astype(x.dtype) + jnp.sin(jnp.asarray(t, x.dtype) / 100)
        if cond is not None:
            h = h + cond @ wc.astype(x.dtype)
        return jnp.tanh(h) @ w2.astype(x.dtype) + 0.3 * x

    return eps_fn


@pytest.fixture(scope="module")
def gaussian_eps():
    """Exact noise prediction for Gaussian data ``x0 ~ N(mu, diag(s2))`` under a schedule.

    Returns ``make(schedule, mu, s2) -> eps_fn`` with
    ``eps*(x, t) = sigma_t (x - alpha_t mu) / (alpha_t^2 s2 + sigma_t^2)``.
    """

    def make(schedule, mu, s2):
        def eps_fn(x, t, cond):
            ac = schedule.alphas_cumprod[t]
            return jnp.sqrt(1 - ac) * (x - jnp.sqrt(ac) * mu) / (ac * s2 + 1 - ac)

        return eps_fn

    return make
