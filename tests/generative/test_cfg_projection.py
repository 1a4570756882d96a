"""Anderson acceleration and CFG manifold projection: exact termination on affine problems,
Picard reductions, per-sample mixing, idempotence of the projection, the sampler against
hand-written CFG and CFG-MP loops, model-evaluation counts, transforms and input errors."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from linjax import data
from linjax import generative as gen
from linjax import testing as lxt


def _affine(key, d, radius=0.9):
    """G(z) = A z + c with spectral radius `radius`, and its fixed point."""
    k1, k2 = jr.split(key)
    m = jr.normal(k1, (d, d))
    a = radius * m / np.max(np.abs(np.linalg.eigvals(np.asarray(m))))
    c = jr.normal(k2, (d,))
    return (lambda z: a @ z + c), jnp.linalg.solve(jnp.eye(d) - a, c)


def test_anderson_solves_an_affine_fixed_point_in_d_plus_2_iterations(getkey):
    d = 6
    G, z_star = _affine(getkey(), d)
    solve = lambda window, k: gen.anderson_fixed_point(
        G, jnp.zeros(d), num_iterations=k, window=window
    )
    full = jax.jit(lambda: solve(d, d + 2))()
    assert float(lxt.rel_err(full.x, z_star)) <= 1e-12
    # Measured (reference/generative.md M2: 8e-16 vs Picard 0.40 and AA(m=1) 0.17): Picard
    # is still at 0.14 after d + 2 = 8 evaluations, AA(m=1) at 0.06.
    picard = float(lxt.rel_err(solve(0, d + 2).x, z_star))
    window_one = float(lxt.rel_err(solve(1, d + 2).x, z_star))
    assert picard > 0.1 and 1e-3 < window_one < picard
    # The residual reported is that of the last evaluated iterate.
    assert float(full.residual_norm) < 1e-6


def test_window_zero_and_the_first_iteration_are_damped_picard(getkey):
    G, _ = _affine(getkey(), 4)
    z0 = jr.normal(getkey(), (4,))
    z = z0
    for _ in range(5):
        z = z + 0.7 * (G(z) - z)
    out = gen.anderson_fixed_point(G, z0, num_iterations=5, window=0, mixing=0.7)
    np.testing.assert_allclose(out.x, z, rtol=1e-14)
    for window in (1, 3):
        one = gen.anderson_fixed_point(G, z0, num_iterations=1, window=window)
        np.testing.assert_allclose(one.x, G(z0), rtol=1e-14)
        np.testing.assert_allclose(one.residual_norm, jnp.linalg.norm(G(z0) - z0), rtol=1e-14)


def test_anderson_window_one_matches_the_reference_formula(getkey):
    # Two pairs: gamma = <f1 - f0, f1> / |f1 - f0|^2, z2 = z1 + f1 - gamma (z1 - z0 + f1 - f0).
    G = lambda z: jnp.tanh(z) * 0.8 + jnp.array([0.3, -0.2, 0.5])
    z0 = jr.normal(getkey(), (3,))
    z1 = G(z0)
    f0, f1 = z1 - z0, G(z1) - z1
    gamma = jnp.vdot(f1 - f0, f1) / jnp.vdot(f1 - f0, f1 - f0)
    z2 = z1 + f1 - gamma * (z1 - z0 + f1 - f0)
    out = gen.anderson_fixed_point(G, z0, num_iterations=2, window=1)
    np.testing.assert_allclose(out.x, z2, rtol=1e-9)


def test_batch_dims_mix_each_sample_separately(getkey):
    G = lambda z: {"a": 0.5 * jnp.sin(z["a"]) + 0.1, "b": 0.3 * z["b"] ** 2 - 0.2}
    z0 = {"a": jr.normal(getkey(), (5, 3, 2)), "b": jr.normal(getkey(), (5, 4))}
    batched = gen.anderson_fixed_point(G, z0, num_iterations=4, window=2, batch_dims=1)
    per_sample = jax.vmap(lambda z: gen.anderson_fixed_point(G, z, num_iterations=4, window=2))(z0)
    lxt.assert_trees_close(batched, per_sample, rtol=1e-12, atol=1e-14)
    assert batched.residual_norm.shape == (5,)
    # Mixing the whole batch as one vector is a different iteration.
    joint = gen.anderson_fixed_point(G, z0, num_iterations=4, window=2)
    assert float(lxt.rel_err(joint.x, batched.x)) > 1e-8


def test_a_fixed_point_is_returned_unchanged():
    G, z_star = _affine(jr.key(3), 5)
    out = gen.anderson_fixed_point(G, z_star, num_iterations=4, window=3)
    np.testing.assert_allclose(out.x, z_star, rtol=1e-13)
    # G = id: every residual is exactly zero, so the weights must not be NaN.
    z = jnp.arange(4.0)
    same = gen.anderson_fixed_point(lambda z: z, z, num_iterations=3, window=2)
    np.testing.assert_array_equal(same.x, z)
    assert float(same.residual_norm) == 0.0


# Linear conditional/unconditional velocities: the projection operator G is affine in z.


def _linear_velocities(key, d=4):
    k1, k2, k3 = jr.split(key, 3)
    a_c = -jnp.eye(d) + 0.3 * jr.normal(k1, (d, d))
    a_u = -jnp.eye(d) + 0.3 * jr.normal(k2, (d, d))
    c = jr.normal(k3, (d,))

    def velocity_fn(t, x, cond):
        if cond is None:
            return x @ a_u.T * (1 + t)
        return x @ a_c.T * (1 + t) + cond * c

    return velocity_fn, d


def test_projection_is_idempotent_at_its_fixed_point(getkey):
    v, d = _linear_velocities(getkey())
    x = jr.normal(getkey(), (d,))
    t, h, cond = 0.2, 0.05, 1.0
    project = lambda z, **kw: gen.manifold_projection(
        v, z, t, cond, step_size=h, batch_dims=0, **kw
    )
    converged = dict(num_iterations=d + 2, window=d)
    p1 = project(x, **converged).x
    p2 = project(p1, **converged).x
    np.testing.assert_allclose(p2, p1, rtol=1e-12)
    # The defaults (2 iterations, window 1) leave the fixed point where it is, too.
    np.testing.assert_allclose(project(p1).x, p1, rtol=1e-12)
    # At the fixed point the prediction gap v_c(t, z - h v_u(z)) - v_u(t, z) vanishes.
    gap = v(t, p1 - h * v(t, p1, None), cond) - v(t, p1, None)
    assert float(jnp.linalg.norm(gap)) < 1e-10
    assert float(lxt.rel_err(p1, x)) > 1e-2  # x itself was not on the manifold


def _gmm_velocity(t, x, cond, radius=2.0, std=0.5):
    """Exact flow velocity of an 8-component mixture; cond masks the components (None: all)."""
    centres = data.gaussian_mixture_centres(num_components=8, radius=radius, dtype=x.dtype)
    S = (1 - t) ** 2 + t**2 * std**2
    d = x[..., None, :] - t * centres
    logits = -jnp.sum(d**2, axis=-1) / (2 * S)
    if cond is not None:
        logits = jnp.where(cond > 0, logits, -jnp.inf)
    w = jax.nn.softmax(logits, axis=-1)
    return jnp.sum(w[..., None] * (centres + (t * std**2 - (1 - t)) / S * d), axis=-2)


COND = jnp.array([1.0, 1.0, 0, 0, 0, 0, 0, 0])  # "class" = components {0, 1}


def test_projection_reduces_the_prediction_gap_on_a_gaussian_mixture(getkey):
    # reference/generative.md M4. The gap |v_c(t, z - h v_u(z)) - v_u(t, z)| = |G(z) - z| / h.
    # Picard moves z by O(h^2) per iteration and barely reduces it (measured ratio 0.90);
    # Anderson with window 1 (the default, 2 iterations) cuts it about five-fold.
    z = jr.normal(getkey(), (64, 2))
    t, h = 0.3, 0.05
    gap = lambda z: jnp.linalg.norm(
        _gmm_velocity(t, z - h * _gmm_velocity(t, z, None), COND) - _gmm_velocity(t, z, None),
        axis=-1,
    )
    project = lambda **kw: gen.manifold_projection(_gmm_velocity, z, t, COND, step_size=h, **kw)
    out = project()
    ratio = gap(out.x) / gap(z)
    assert float(jnp.median(ratio)) < 0.3 and float(jnp.max(ratio)) < 0.6
    assert float(jnp.mean(gap(out.x))) < 0.25 * float(jnp.mean(gap(z)))
    picard = gap(project(window=0).x) / gap(z)
    assert float(jnp.min(picard)) > 0.8 and float(jnp.max(picard)) < 1.0
    # The reported residual is |G - id| at the last evaluated iterate (here z1 = G(z)).
    np.testing.assert_allclose(out.residual_norm, h * gap(project(num_iterations=1).x), rtol=1e-10)


def _cfg_euler(v, x, cond, scale, n, project=None):
    """Hand-written guided Euler loop; `project(z, t)` runs before the step where given."""
    for i in range(n):
        t = i / n
        if project is not None:
            x = project(x, t)
        vc, vu = v(t, x, cond), v(t, x, None)
        x = x + (vu + scale * (vc - vu)) / n
    return x


def test_without_projection_it_is_plain_cfg_euler(getkey):
    x0 = jr.normal(getkey(), (16, 2))
    n, w = 6, 3.0
    expected = _cfg_euler(_gmm_velocity, x0, COND, w, n)
    off = gen.cfg_projection_sample(
        _gmm_velocity, x0, COND, scale=w, num_steps=n, projection_steps=0
    )
    np.testing.assert_allclose(off, expected, rtol=1e-13, atol=1e-13)
    # A state-independent velocity, equal with and without cond, makes G the identity, so the
    # projection changes nothing. (Equal but state-dependent velocities do not: then
    # G(z) - z = h [v(z - h v(z)) - v(z)] = O(h^2), not 0, pace reference/generative.md M1.)
    same = lambda t, x, c: jnp.broadcast_to(jnp.stack([jnp.sin(3 * t), t**2]), x.shape)
    on = gen.cfg_projection_sample(same, x0, COND, scale=w, num_steps=n, t_max=1.0)
    np.testing.assert_allclose(on, _cfg_euler(same, x0, COND, w, n), rtol=1e-13, atol=1e-13)
    shared = lambda t, x, c: _gmm_velocity(t, x, None)
    moved = gen.cfg_projection_sample(shared, x0, COND, scale=w, num_steps=n)
    assert float(lxt.rel_err(moved, _cfg_euler(shared, x0, COND, w, n))) > 1e-3
    # scale = 1 without projection is the conditional flow (gen.sample_ode, Euler).
    cond_only = gen.cfg_projection_sample(
        _gmm_velocity, x0, COND, scale=1.0, num_steps=n, projection_steps=0
    )
    ode = gen.sample_ode(lambda t, x: _gmm_velocity(t, x, COND), x0, num_steps=n)
    np.testing.assert_allclose(cond_only, ode, rtol=1e-13, atol=1e-13)


def test_a_large_ridge_damps_anderson_to_picard(getkey):
    x0 = jr.normal(getkey(), (16, 2))
    kw = dict(scale=4.0, num_steps=6, projection_steps=3)
    picard = gen.cfg_projection_sample(_gmm_velocity, x0, COND, anderson_window=0, **kw)
    damped = gen.cfg_projection_sample(_gmm_velocity, x0, COND, ridge=1e12, **kw)
    exact = gen.cfg_projection_sample(_gmm_velocity, x0, COND, **kw)
    assert float(lxt.rel_err(damped, picard)) < 1e-9
    assert float(lxt.rel_err(exact, picard)) > 1e-6


@pytest.mark.parametrize("window", [0, 1])
def test_matches_a_hand_written_cfg_mp_loop(getkey, window):
    # N = 10, t_max = 0.35: steps t = 0, 0.1, 0.2, 0.3 are projected with K = 2 iterations of
    # G(z) = z~ + h v_c(z~), z~ = z - h v_u(z), h = 1 / (2N); Picard or AA(m=1) per sample.
    x0 = jr.normal(getkey(), (8, 2))
    n, w, k, h = 10, 2.5, 2, 1 / 20

    def project(z, t):
        if t >= 0.35:
            return z
        G = lambda z: (zt := z - h * _gmm_velocity(t, z, None)) + h * _gmm_velocity(t, zt, COND)
        z1 = G(z)
        if window == 0:
            return G(z1)
        f0, f1 = z1 - z, G(z1) - z1
        gamma = jnp.sum((f1 - f0) * f1, -1) / jnp.sum((f1 - f0) ** 2, -1)
        return z1 + f1 - gamma[:, None] * (z1 - z + f1 - f0)

    expected = _cfg_euler(_gmm_velocity, x0, COND, w, n, project)
    out = gen.cfg_projection_sample(
        _gmm_velocity,
        x0,
        COND,
        scale=w,
        num_steps=n,
        projection_steps=k,
        anderson_window=window,
        t_max=0.35,
    )
    np.testing.assert_allclose(out, expected, rtol=1e-8, atol=1e-8)
    plain = _cfg_euler(_gmm_velocity, x0, COND, w, n)
    assert float(lxt.rel_err(out, plain)) > 1e-3


def _count_evaluations(**kwargs):
    count = [0]

    def counted(t, x, cond):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return _gmm_velocity(t, x, cond)

    out = gen.cfg_projection_sample(counted, jnp.zeros((2, 2)), COND, scale=2.0, **kwargs)
    jax.block_until_ready(out)
    jax.effects_barrier()
    return count[0]


def test_model_evaluations_are_counted_as_documented():
    # 2 per CFG step plus 2 per fixed-point iteration on the projected steps (t_i < t_max).
    assert _count_evaluations(num_steps=10) == 20 + 6 * 2 * 2
    assert _count_evaluations(num_steps=10, projection_steps=0) == 20
    assert _count_evaluations(num_steps=4, projection_steps=3, t_max=0.01) == 8 + 1 * 3 * 2


def test_jit_vmap_and_no_retrace(getkey):
    x0 = jr.normal(getkey(), (5, 2))
    conds = jnp.stack([COND, jnp.roll(COND, 2), COND, jnp.roll(COND, 4), COND])
    run = lambda x, c, w, batch_dims: gen.cfg_projection_sample(
        _gmm_velocity, x, c, scale=w, num_steps=4, batch_dims=batch_dims
    )
    per_sample = jax.jit(jax.vmap(lambda x, c: run(x, c, 3.0, 0)))(x0, conds)
    batched, _ = lxt.assert_no_retrace(
        lambda x, c, w: run(x, c, w, 1), (x0, conds, 3.0), (-x0, conds, 1.5)
    )
    np.testing.assert_allclose(per_sample, batched, rtol=1e-12, atol=1e-12)
    # float32 samples stay float32 (times and Anderson weights follow them).
    x32 = gen.cfg_projection_sample(
        lambda t, x, c: (jnp.zeros_like(x) if c is None else c) - (1 + t) * x,
        x0.astype(jnp.float32),
        x0[::-1].astype(jnp.float32),
        scale=2.0,
        num_steps=2,
    )
    assert x32.dtype == jnp.float32


def test_bad_inputs():
    x = jnp.zeros((3, 2))
    sample = lambda **kw: gen.cfg_projection_sample(
        _gmm_velocity, x, COND, **{"scale": 2.0, "num_steps": 4, **kw}
    )
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"t_max=.* must lie in \(0, 1\]"):
            sample(t_max=bad)
    with pytest.raises(TypeError, match="t_max=.* must be a Python number"):
        sample(t_max=jnp.asarray(0.5))
    with pytest.raises(ValueError, match="num_steps=0 must be >= 1"):
        sample(num_steps=0)
    with pytest.raises(ValueError, match="projection_steps=-1 must be >= 0"):
        sample(projection_steps=-1)
    with pytest.raises(ValueError, match="anderson_window=-2 must be >= 0"):
        sample(anderson_window=-2)
    with pytest.raises(ValueError, match=r"returned shape \(3, 1\)"):
        gen.cfg_projection_sample(lambda t, x, c: x[:, :1], x, COND, scale=2.0, num_steps=4)
    with pytest.raises(TypeError, match="velocity_fn\\(t, x, cond\\) failed"):
        gen.cfg_projection_sample(_gmm_velocity, x, jnp.ones(3), scale=2.0, num_steps=4)
    with pytest.raises(ValueError, match="no axes beyond its batch_dims=1"):
        gen.cfg_projection_sample(_gmm_velocity, x[0], COND, scale=2.0, num_steps=4)
    with pytest.raises(ValueError, match="num_iterations=0 must be >= 1"):
        gen.anderson_fixed_point(lambda z: z, x, num_iterations=0)
    with pytest.raises(ValueError, match="mixing=0.0 must be a finite number > 0"):
        gen.anderson_fixed_point(lambda z: z, x, num_iterations=2, mixing=0.0)
    with pytest.raises(ValueError, match=r"fn\(z\) returned shape"):
        gen.anderson_fixed_point(lambda z: z[0], x, num_iterations=2)
