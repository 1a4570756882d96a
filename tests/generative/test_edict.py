"""EDICT: exact round trips (odd and even step counts, with and without cond), the leapfrog
parity regression, agreement with a plain-loop reference and with DDIM, transforms, orbax and
input errors."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import orbax.checkpoint as ocp
import pytest

from linjax import generative as gen
from linjax import testing as lxt

SCHEDULE = gen.linear_schedule()


def _invert(eps_fn, x0, n, cond=None, mix=0.93, schedule=SCHEDULE):
    return gen.edict_invert(eps_fn, x0, schedule, num_steps=n, mix=mix, cond=cond)


def _sample(eps_fn, state, n, cond=None, mix=0.93, schedule=SCHEDULE):
    return gen.edict_sample(eps_fn, state, schedule, num_steps=n, mix=mix, cond=cond)


# A plain Python-loop EDICT written straight from the equations of reference/generative.md
# §2.2 (salesforce/EDICT ordering), independent of the library's scan and select tricks.


def _grid(schedule, n):
    t, t_prev = gen.ddim_timesteps(schedule.num_train_steps, n)
    ac = np.asarray(schedule.alphas_cumprod)
    ac_t, ac_p = ac[t], ac[np.maximum(t_prev, 0)]
    a = np.sqrt(ac_p / ac_t)
    b = np.sqrt(1 - ac_p) - np.sqrt(ac_p * (1 - ac_t) / ac_t)
    return [(int(ti), float(ai), float(bi)) for ti, ai, bi in zip(t, a, b, strict=True)]


def _loop_sample(eps, x, y, n, p, cond=None):
    for i, (t, a, b) in enumerate(_grid(SCHEDULE, n)):
        if i % 2 == 0:
            x = a * x + b * eps(y, t, cond)
            y = a * y + b * eps(x, t, cond)
        else:  # leapfrog: y first on odd denoising steps
            y = a * y + b * eps(x, t, cond)
            x = a * x + b * eps(y, t, cond)
        x = p * x + (1 - p) * y
        y = p * y + (1 - p) * x
    return x, y


def _loop_invert(eps, x0, n, p, cond=None, parity="denoising index"):
    x = y = x0
    grid = _grid(SCHEDULE, n)
    for k, i in enumerate(reversed(range(n))):
        t, a, b = grid[i]
        # The diffusers community pipeline keys the order on the inversion loop counter k,
        # which equals the right parity (that of i = n - 1 - k) only when n is even.
        first_is_x = (i if parity == "denoising index" else k + 1) % 2 == 0
        y = (y - (1 - p) * x) / p
        x = (x - (1 - p) * y) / p
        if first_is_x:  # x was updated first, so undo y's update first
            y = (y - b * eps(x, t, cond)) / a
            x = (x - b * eps(y, t, cond)) / a
        else:
            x = (x - b * eps(y, t, cond)) / a
            y = (y - b * eps(x, t, cond)) / a
    return x, y


@pytest.mark.parametrize("n", [10, 11, 25])
@pytest.mark.parametrize("with_cond", [False, True])
def test_data_to_noise_to_data_is_exact(getkey, mlp_eps, n, with_cond):
    x0 = jr.normal(getkey(), (4, 16))
    cond = jr.normal(getkey(), (4, 3)) if with_cond else None
    state = jax.jit(lambda x, c: _invert(mlp_eps, x, n, c))(x0, cond)
    assert lxt.rel_err(state.x, state.y) > 1e-2  # the inverted pair really is a pair
    back = jax.jit(lambda st, c: _sample(mlp_eps, st, n, c))(state, cond)
    assert lxt.rel_err(back.x, x0) <= 1e-12
    assert lxt.rel_err(back.y, x0) <= 1e-12


@pytest.mark.parametrize("n", [10, 11])
def test_noise_to_data_to_noise_is_exact(getkey, mlp_eps, n):
    # edict_invert also takes a whole pair, e.g. the output of edict_sample.
    noise = jr.normal(getkey(), (4, 16))
    cond = jr.normal(getkey(), (4, 3))
    out = _sample(mlp_eps, gen.EDICTState(noise, noise), n, cond)
    back = jax.jit(lambda st, c: _invert(mlp_eps, st, n, c))(out, cond)
    assert lxt.rel_err(back.x, noise) <= 1e-12
    assert lxt.rel_err(back.y, noise) <= 1e-12
    # Inverting x alone (x = y = out.x) is not the same pair, hence not exact.
    assert lxt.rel_err(_invert(mlp_eps, out.x, n, cond).x, noise) > 1e-8


def test_ddim_round_trip_error_is_a_million_times_edicts(getkey, mlp_eps):
    x0 = jr.normal(getkey(), (4, 16))
    for n in (10, 25):
        edict = lxt.rel_err(_sample(mlp_eps, _invert(mlp_eps, x0, n), n).x, x0)
        x_T = gen.ddim_invert(mlp_eps, x0, SCHEDULE, num_steps=n)
        ddim = lxt.rel_err(gen.ddim_sample(mlp_eps, x_T, SCHEDULE, num_steps=n), x0)
        assert ddim >= 1e6 * edict and ddim > 1e-2


@pytest.mark.parametrize("n", [6, 7])
def test_scan_equals_the_plain_loop_reference(getkey, mlp_eps, n):
    x0, cond = jr.normal(getkey(), (3, 16)), jr.normal(getkey(), (3, 3))
    state = _invert(mlp_eps, x0, n, cond)
    ref = _loop_invert(mlp_eps, x0, n, 0.93, cond)
    np.testing.assert_allclose(state.x, ref[0], rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(state.y, ref[1], rtol=1e-11, atol=1e-11)
    noise = jr.normal(getkey(), (3, 16))
    out = _sample(mlp_eps, gen.EDICTState(noise, 2 * noise), n, cond)
    ref = _loop_sample(mlp_eps, noise, 2 * noise, n, 0.93, cond)
    np.testing.assert_allclose(out.x, ref[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.y, ref[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [10, 11, 41])
def test_leapfrog_parity_regression(getkey, mlp_eps, n):
    # reference/generative.md finding 4: keying the inversion order on the loop counter is
    # exact for an even number of steps only; ours keys it on the denoising index.
    x0 = jr.normal(getkey(), (4, 16))
    ours = _sample(mlp_eps, _invert(mlp_eps, x0, n), n).x
    assert lxt.rel_err(ours, x0) <= 1e-12
    bad_state = _loop_invert(mlp_eps, x0, n, 0.93, parity="inversion loop counter")
    bad = _sample(mlp_eps, gen.EDICTState(*bad_state), n).x
    if n % 2 == 0:
        assert lxt.rel_err(bad, x0) <= 1e-12
    else:
        assert lxt.rel_err(bad, x0) > 1e-4


def test_mix_one_is_still_exact(getkey, mlp_eps):
    x0 = jr.normal(getkey(), (4, 16))
    for n in (9, 20):
        back = _sample(mlp_eps, _invert(mlp_eps, x0, n, mix=1.0), n, mix=1.0)
        assert lxt.rel_err(back.x, x0) <= 1e-12


def test_state_independent_eps_gives_ddim_and_mixing_contracts_the_gap(getkey):
    offsets = jr.normal(getkey(), (16,))
    eps_fn = lambda x, t, c: jnp.broadcast_to(jnp.sin(t / 100 + offsets), x.shape)
    x_T = jr.normal(getkey(), (2, 16))
    for n in (7, 50):
        ddim = gen.ddim_sample(eps_fn, x_T, SCHEDULE, num_steps=n)
        edict = _sample(eps_fn, gen.EDICTState(x_T, x_T), n)
        np.testing.assert_allclose(edict.x, ddim, rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(edict.y, ddim, rtol=1e-13, atol=1e-13)
    # With eps independent of the state, x - y is multiplied by p^2 a_t at every step, so
    # over the chain by p^(2N) sqrt(alpha-bar_0 / alpha-bar_T).
    y_T = x_T + jr.normal(getkey(), (2, 16))
    n, p = 12, 0.9
    out = _sample(eps_fn, gen.EDICTState(x_T, y_T), n, mix=p)
    t, _ = gen.ddim_timesteps(1000, n)
    ac = SCHEDULE.alphas_cumprod
    factor = p ** (2 * n) * jnp.sqrt(ac[0] / ac[t[0]])
    np.testing.assert_allclose(out.x - out.y, factor * (x_T - y_T), rtol=1e-10)


def test_float32_round_trip(getkey, mlp_eps):
    # Float32 is only approximately exact (measured 1.0e-5 to 1.5e-5 with this model;
    # reference/generative.md finding 3 reports 4.9e-6 for its toy).
    x0 = jr.normal(getkey(), (4, 16), jnp.float32)
    back = _sample(mlp_eps, _invert(mlp_eps, x0, 50), 50)
    assert back.x.dtype == jnp.float32 and back.y.dtype == jnp.float32
    assert lxt.rel_err(back.x, x0) <= 1e-4


def test_vmap_pytrees_and_no_retrace(getkey, mlp_eps):
    x0, cond = jr.normal(getkey(), (5, 16)), jr.normal(getkey(), (5, 3))
    n = 9
    batched = _invert(mlp_eps, x0, n, cond)
    per_sample = jax.jit(jax.vmap(lambda x, c: _invert(mlp_eps, x, n, c)))(x0, cond)
    lxt.assert_trees_close(per_sample, batched, rtol=1e-12, atol=1e-12)
    back = jax.jit(jax.vmap(lambda st, c: _sample(mlp_eps, st, n, c)))(per_sample, cond)
    assert lxt.rel_err(back.x, x0) <= 1e-12
    # A dict sample round-trips too.
    tree_eps = lambda x, t, c: {"a": mlp_eps(x["a"], t, c), "b": jnp.tanh(x["b"])}
    tree = {"a": x0, "b": jr.normal(getkey(), (7,))}
    back = _sample(tree_eps, _invert(tree_eps, tree, n, cond), n, cond)
    assert lxt.rel_err(back.x, tree) <= 1e-12
    lxt.assert_no_retrace(lambda x, c: _invert(mlp_eps, x, n, c), (x0, cond), (2 * x0, -cond))
    lxt.assert_no_retrace(
        lambda st, c, mix: _sample(mlp_eps, st, n, c, mix=mix),
        (batched, cond, 0.93),
        (per_sample, -cond, 0.8),
    )


def test_state_roundtrips_through_orbax(getkey, mlp_eps, tmp_path):
    state = _invert(mlp_eps, jr.normal(getkey(), (2, 16)), 5)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "edict", state)
    ckptr.wait_until_finished()
    restored = ckptr.restore(
        tmp_path / "edict", jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    )
    assert isinstance(restored, gen.EDICTState)
    lxt.assert_trees_close(restored, state, rtol=0)


def test_bad_inputs(mlp_eps):
    x = jnp.ones((2, 16))
    state = gen.EDICTState(x, x)
    for bad in (0.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="mix=.* must be a finite number > 0"):
            _invert(mlp_eps, x, 3, mix=bad)
        with pytest.raises(ValueError, match="mix=.* must be a finite number > 0"):
            _sample(mlp_eps, state, 3, mix=bad)
    with pytest.raises(ValueError, match=r"mix=1.5 must lie in \(0, 1\]"):
        _invert(mlp_eps, x, 3, mix=1.5)
    with pytest.raises(ValueError, match=r"mix=1.01 must lie in \(0, 1\]"):
        _sample(mlp_eps, state, 3, mix=1.01)
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):
        _invert(mlp_eps, x, 0)
    with pytest.raises(ValueError, match="num_steps=1001 must be <= the schedule's"):
        _sample(mlp_eps, state, 1001)
    with pytest.raises(ValueError, match="state.x and state.y have mismatched leaves"):
        _sample(mlp_eps, gen.EDICTState(x, jnp.ones((3, 16))), 3)
    with pytest.raises(TypeError, match="state must be an EDICTState"):
        _sample(mlp_eps, x, 3)
    with pytest.raises(ValueError, match=r"returned shape \(2, 8\)"):
        _invert(lambda x, t, c: x[:, :8], x, 3)
    with pytest.raises(TypeError, match="returned dtype float32"):
        _sample(lambda x, t, c: x.astype(jnp.float32), state, 3)
    stateful = gen.StatefulEpsFn(lambda x: jnp.zeros(()), lambda x, t, c, st: (x, st + 1))
    with pytest.raises(TypeError, match="edict_invert needs a stateless eps_fn"):
        _invert(stateful, x, 3)
    _sample(stateful, state, 3)  # the forward sampler accepts state
