"""Curvature products against dense float64 oracles built with jax.hessian / jax.jacobian."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from linjax import _tree
from linjax import curvature as cv
from linjax import testing as lxt

N, D_IN, HIDDEN, C = 12, 5, 7, 3


def _mlp_params(key, sizes=(D_IN, HIDDEN, C)):
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, k1, k2 = jax.random.split(key, 3)
        params[f"layer{i}"] = {
            "w": jax.random.normal(k1, (a, b)) / np.sqrt(a),
            "b": 0.1 * jax.random.normal(k2, (b,)),
        }
    return params


def _mlp_apply(act):
    def apply(params, x):
        layers = [params[k] for k in sorted(params)]
        for layer in layers[:-1]:
            x = act(x @ layer["w"] + layer["b"])
        return x @ layers[-1]["w"] + layers[-1]["b"]

    return apply


def _logcosh(z, y):  # a loss the module does not recognise: exercises the autodiff fallback
    return jnp.sum(jnp.log(jnp.cosh(z - y))) / z.shape[0]


@pytest.fixture(scope="module")
def problem():
    key = jax.random.key(7)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = _mlp_params(k1)
    x = jax.random.normal(k2, (N, D_IN))
    labels = jax.random.randint(k3, (N,), 0, C)
    real = jax.random.normal(k4, (N, C))
    return params, x, labels, real


def _targets(loss, labels, real):
    if loss is cv.softmax_cross_entropy:
        return labels
    if loss is cv.sigmoid_binary_cross_entropy:
        return (real > 0).astype(real.dtype)
    return real


def _mat(build, params):
    """Dense matrix of the operator ``build(params)``, built inside one jit (eager is slow)."""
    return jax.jit(lambda p: lxt.materialize(build(p), p))(params)


@partial(jax.jit, static_argnums=(0, 1))
def _dense_ggn(apply, loss, params, x, y):
    flat, unravel = ravel_pytree(params)
    out = apply(params, x)
    J = jax.jacobian(lambda f: apply(unravel(f), x))(flat).reshape(out.size, flat.size)
    H_L = jax.hessian(lambda z: loss(z.reshape(out.shape), y))(out.ravel())
    return J.T @ H_L @ J


@partial(jax.jit, static_argnums=(0, 1))
def _dense_hessian(apply, loss, params, x, y):
    flat, unravel = ravel_pytree(params)
    return jax.hessian(lambda f: loss(apply(unravel(f), x), y))(flat)


def test_hvp_matches_dense_hessian(problem):
    params, x, labels, _ = problem
    apply = _mlp_apply(jnp.tanh)

    def loss_fn(p, batch):
        return cv.softmax_cross_entropy(apply(p, batch[0]), batch[1])

    H = _mat(lambda p: cv.hvp(loss_fn, p, (x, labels)), params)
    H_ref = _dense_hessian(apply, cv.softmax_cross_entropy, params, x, labels)
    np.testing.assert_allclose(H, H_ref, rtol=1e-10, atol=1e-10 * np.abs(H_ref).max())


def test_hvp_quadratic_is_exact(getkey):
    A = lxt.spd_from_spectrum(getkey(), jnp.linspace(-1.0, 3.0, 20))[0]
    v = jax.random.normal(getkey(), (20,))
    mv = cv.hvp(lambda t: 0.5 * t @ A @ t, jnp.zeros(20))
    np.testing.assert_allclose(mv(v), A @ v, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "loss",
    [cv.softmax_cross_entropy, cv.squared_error, cv.sigmoid_binary_cross_entropy, _logcosh],
    ids=["softmax_ce", "squared_error", "sigmoid_bce", "generic"],
)
def test_ggn_matches_dense_jt_h_j_and_is_psd(problem, loss):
    params, x, labels, real = problem
    apply = _mlp_apply(jnp.tanh)
    y = _targets(loss, labels, real)
    G = _mat(lambda p: cv.ggn(apply, loss, p, (x, y)), params)
    G_ref = _dense_ggn(apply, loss, params, x, y)
    np.testing.assert_allclose(G, G_ref, rtol=1e-10, atol=1e-12 * np.abs(G_ref).max())
    eigs = np.linalg.eigvalsh(0.5 * (G + G.T))
    assert eigs[0] >= -1e-12 * eigs[-1]


@pytest.mark.parametrize(
    "loss", [cv.softmax_cross_entropy, cv.squared_error, cv.sigmoid_binary_cross_entropy]
)
def test_closed_form_output_hessian_equals_autodiff_fallback(problem, loss):
    params, x, labels, real = problem
    apply = _mlp_apply(jnp.tanh)
    y = _targets(loss, labels, real)
    closed = _mat(lambda p: cv.ggn(apply, loss, p, (x, y)), params)
    generic = _mat(lambda p: cv.ggn(apply, lambda z, t: loss(z, t), p, (x, y)), params)
    np.testing.assert_allclose(closed, generic, rtol=1e-12, atol=1e-14)


def test_ggn_equals_hessian_for_linear_model_with_squared_error(problem):
    _, x, _, real = problem
    params = {"w": jnp.ones((D_IN, C)) * 0.3, "b": jnp.arange(C, dtype=x.dtype)}
    apply = lambda p, x: x @ p["w"] + p["b"]
    G = _mat(lambda p: cv.ggn(apply, cv.squared_error, p, (x, real)), params)
    H = _dense_hessian(apply, cv.squared_error, params, x, real)
    np.testing.assert_allclose(G, H, rtol=1e-12, atol=1e-14)


def test_softmax_cross_entropy_soft_labels_match_integer_labels(problem):
    params, x, labels, _ = problem
    logits = _mlp_apply(jnp.tanh)(params, x)
    onehot = jax.nn.one_hot(labels, C)
    np.testing.assert_allclose(
        cv.softmax_cross_entropy(logits, onehot), cv.softmax_cross_entropy(logits, labels)
    )
    np.testing.assert_allclose(
        cv.softmax_cross_entropy(logits, labels),
        optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(),
        rtol=1e-12,
    )


@pytest.mark.parametrize(
    "loss", [cv.softmax_cross_entropy, cv.squared_error, cv.sigmoid_binary_cross_entropy]
)
def test_exact_true_fisher_equals_ggn_and_dense_expectation(problem, loss):
    params, x, labels, real = problem
    apply = _mlp_apply(jnp.tanh)
    y = _targets(loss, labels, real)
    F = _mat(lambda p: cv.fisher(apply, p, (x, y), kind="true", loss=loss), params)
    G = _mat(lambda p: cv.ggn(apply, loss, p, (x, y)), params)
    np.testing.assert_allclose(F, G, rtol=1e-12, atol=1e-14)
    if loss is cv.softmax_cross_entropy:
        # The definition, summed exactly over every class: (1/n) sum_i sum_c p_ic g_ic g_ic^T.
        flat, unravel = ravel_pytree(params)

        def grad_all_classes(f):
            z = apply(unravel(f), x)

            def per_example(zi, c):
                return cv.softmax_cross_entropy(zi[None], c[None])

            nll = jax.vmap(lambda c: jax.vmap(per_example)(z, jnp.full((N,), c)))(jnp.arange(C))
            return nll  # [C, N]

        @jax.jit
        def definition(flat):
            g = jax.jacobian(grad_all_classes)(flat)  # [C, N, d]
            p = jax.nn.softmax(apply(unravel(flat), x), axis=-1).T  # [C, N]
            return jnp.einsum("cn,cnd,cne->de", p, g, g) / N

        F_def = definition(flat)
        np.testing.assert_allclose(F, F_def, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "loss", [cv.softmax_cross_entropy, cv.squared_error, cv.sigmoid_binary_cross_entropy]
)
def test_monte_carlo_fisher_converges_to_exact_in_output_space(getkey, loss):
    # With the identity "network" (params are the outputs) J = I and F is the block-diagonal
    # output-space matrix itself: the samplers' second moments must match the closed forms.
    z = jax.random.normal(getkey(), (4, 3))
    y = _targets(loss, jnp.array([0, 1, 2, 0]), jax.random.normal(getkey(), (4, 3)))
    apply = lambda p, x: p
    exact = _mat(lambda p: cv.fisher(apply, p, (None, y), kind="true", loss=loss), z)
    mc = _mat(
        lambda p: cv.fisher(
            apply, p, (None, y), kind="true", loss=loss, key=getkey(), num_samples=20_000
        ),
        z,
    )
    # 20k samples: relative error ~ 1/sqrt(20k) ~ 0.7%.
    np.testing.assert_allclose(mc, exact, atol=0.05 * np.abs(exact).max())


def test_sequence_outputs_sum_within_an_example(getkey):
    # logits [n, T, C]: each example's loss sums its T positions, the batch loss is the mean
    # over n, and the Fisher/GGN are (1/n) sums over examples of per-example quantities.
    n, T = 3, 4
    z = jax.random.normal(getkey(), (n, T, C))
    y = jax.random.randint(getkey(), (n, T), 0, C)
    apply = lambda p, x: p
    loss = cv.softmax_cross_entropy
    per_position = optax.softmax_cross_entropy_with_integer_labels(z, y)
    np.testing.assert_allclose(loss(z, y), per_position.sum() / n, rtol=1e-12)
    G = _mat(lambda p: cv.ggn(apply, loss, p, (None, y)), z)
    P = jax.nn.softmax(z).reshape(n * T, C)
    blocks = jax.vmap(lambda p: jnp.diag(p) - jnp.outer(p, p))(P) / n
    np.testing.assert_allclose(G, jax.scipy.linalg.block_diag(*blocks), atol=1e-14)
    F_true = _mat(lambda p: cv.fisher(apply, p, (None, y), kind="true"), z)
    np.testing.assert_allclose(F_true, G, atol=1e-14)
    F_emp = _mat(lambda p: cv.fisher(apply, p, (None, y)), z)
    g = cv.per_example_grads(lambda p, b: loss(p[b[0]], b[1]), z, (jnp.arange(n), y))
    g = g.reshape(n, -1)  # [n, n*T*C]: example i's gradient lives in its own block
    np.testing.assert_allclose(F_emp, g.T @ g / n, atol=1e-14)
    mc = _mat(
        lambda p: cv.fisher(apply, p, (None, y), kind="true", key=getkey(), num_samples=20_000),
        z,
    )
    np.testing.assert_allclose(mc, G, atol=0.05 * np.abs(G).max())


def test_monte_carlo_fisher_is_unbiased_and_error_shrinks(problem, getkey):
    loss = cv.softmax_cross_entropy
    params, x, labels, real = problem
    apply = _mlp_apply(jnp.tanh)
    y = _targets(loss, labels, real)
    u = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size).reshape(a.shape)), params)
    v = jax.tree.map(lambda a: jnp.sin(1.0 + jnp.arange(a.size).reshape(a.shape)), params)

    def estimate(key, num_samples):
        mv = cv.fisher(
            apply, params, (x, y), kind="true", key=key, loss=loss, num_samples=num_samples
        )
        return _tree.tree_dot(u, mv(v))

    @jax.jit
    def run(keys):
        exact = _tree.tree_dot(u, cv.fisher(apply, params, (x, y), kind="true", loss=loss)(v))
        return (
            exact,
            jax.vmap(lambda k: estimate(k, 1))(keys),
            jax.vmap(lambda k: estimate(k, 16))(keys),
        )

    exact, s1, s16 = run(jax.random.split(getkey(), 400))
    for s in (s1, s16):
        sem = np.std(s) / np.sqrt(s.size)
        assert abs(np.mean(s) - exact) <= 4 * sem
    # Standard deviation scales as 1/sqrt(S): a factor 4 from S = 1 to S = 16.
    assert 3.0 <= np.std(s1) / np.std(s16) <= 5.3


def test_empirical_fisher_matches_dense_outer_products(problem):
    params, x, labels, _ = problem
    apply = _mlp_apply(jnp.tanh)
    batch = (x, labels)
    F = _mat(lambda p: cv.fisher(apply, p, batch, kind="empirical"), params)

    def loss_fn(p, b):
        return cv.softmax_cross_entropy(apply(p, b[0]), b[1])

    flat, unravel = ravel_pytree(params)

    @jax.jit
    def oracles(flat):
        grads = cv.per_example_grads(loss_fn, unravel(flat), batch)
        G = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)  # [N, d]
        # Independent oracle: the Jacobian of the vector of per-example losses.
        losses = lambda f: (
            -jnp.take_along_axis(jax.nn.log_softmax(apply(unravel(f), x)), labels[:, None], axis=1)[
                :, 0
            ]
        )
        Jl = jax.jacobian(losses)(flat)
        return G.T @ G / N, Jl.T @ Jl / N

    F_grads, F_jac = oracles(flat)
    np.testing.assert_allclose(F, F_grads, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(F, F_jac, rtol=1e-10, atol=1e-14)


def test_empirical_fisher_generic_loss(problem):
    params, x, _, real = problem
    apply = _mlp_apply(jnp.tanh)
    F = _mat(lambda p: cv.fisher(apply, p, (x, real), loss=_logcosh), params)
    grads = jax.jit(
        lambda p: cv.per_example_grads(lambda p, b: _logcosh(apply(p, b[0]), b[1]), p, (x, real))
    )(params)
    G = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)
    np.testing.assert_allclose(F, G.T @ G / N, rtol=1e-10, atol=1e-14)


def test_per_example_grads(problem):
    params, x, labels, _ = problem
    apply = _mlp_apply(jnp.tanh)

    def loss_fn(p, b):
        return cv.softmax_cross_entropy(apply(p, b[0]), b[1])

    @jax.jit
    def run(p):
        full = jax.grad(loss_fn)(p, (x, labels))
        third = jax.grad(loss_fn)(p, (x[3:4], labels[3:4]))
        return cv.per_example_grads(loss_fn, p, (x, labels)), full, third

    grads, full, third = run(params)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert grads["layer0"]["w"].shape == (N, D_IN, HIDDEN)
    mean = jax.tree.map(lambda g: g.mean(0), grads)
    lxt.assert_trees_close(mean, full, rtol=1e-12, atol=1e-14)
    lxt.assert_trees_close(jax.tree.map(lambda g: g[3], grads), third, rtol=1e-12, atol=1e-14)


def test_relu_net_layer_diagonal_ggn_blocks_equal_hessian_blocks(problem):
    # A piecewise-linear net is linear in each layer's (w, b) for fixed activation patterns,
    # so the residual term of the Hessian vanishes on the layer-diagonal blocks only.
    _, x, labels, _ = problem
    params = _mlp_params(jax.random.key(3), sizes=(D_IN, 6, 5, C))
    apply = _mlp_apply(jax.nn.relu)
    G = _mat(lambda p: cv.ggn(apply, cv.softmax_cross_entropy, p, (x, labels)), params)
    H = _dense_hessian(apply, cv.softmax_cross_entropy, params, x, labels)
    sizes = [params[k]["b"].size + params[k]["w"].size for k in sorted(params)]
    edges = np.cumsum([0, *sizes])  # ravel order: layer0 (b, w), layer1 (b, w), ...
    scale = np.abs(H).max()
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        np.testing.assert_allclose(G[lo:hi, lo:hi], H[lo:hi, lo:hi], atol=1e-12 * scale)
    off = np.abs(G[: edges[1], edges[1] :] - H[: edges[1], edges[1] :]).max()
    assert off > 1e-3 * scale  # the off-diagonal blocks really differ


def test_products_symmetric_jit_vmap_and_dtypes_float32(problem, getkey):
    # float32 on purpose: symmetry must hold to float32 round-off, dtypes must be kept.
    dtype = jnp.float32
    params, x, labels, _ = problem
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    x = x.astype(dtype)
    apply = _mlp_apply(jnp.tanh)

    def loss_fn(p, b):
        return cv.softmax_cross_entropy(apply(p, b[0]), b[1])

    builders = {
        "hvp": lambda p: cv.hvp(loss_fn, p, (x, labels)),
        "ggn": lambda p: cv.ggn(apply, cv.softmax_cross_entropy, p, (x, labels)),
        "ef": lambda p: cv.fisher(apply, p, (x, labels)),
    }
    u = _tree.tree_random_like(getkey(), params)
    V = jax.tree.map(lambda a: jnp.stack([a, 2 * a + 1]), _tree.tree_random_like(getkey(), params))
    v = jax.tree.map(lambda a: a[0], V)
    rtol = 1e-5
    for name, build in builders.items():

        def run(p, u, V, build=build):
            mv = build(p)
            return mv(jax.tree.map(lambda a: a[0], V)), mv(u), jax.vmap(mv)(V)

        out, Au, batched = jax.jit(run)(params, u, V)
        assert jax.tree.structure(out) == jax.tree.structure(params), name
        assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(out)), name
        uAv, vAu = _tree.tree_dot(u, out), _tree.tree_dot(v, Au)
        # Round-off in u^T A v is relative to ||u|| ||A v||, not to the (cancelling) sum.
        scale = _tree.tree_norm(u) * _tree.tree_norm(out)
        np.testing.assert_allclose(uAv, vAu, rtol=rtol, atol=rtol * scale, err_msg=name)
        first = jax.tree.map(lambda a: a[0], batched)
        lxt.assert_trees_close(first, out, rtol=10 * rtol, atol=10 * rtol)
        if name == "ggn":  # un-jitted evaluation agrees with jit
            lxt.assert_trees_close(build(params)(v), out, rtol=1e-4, atol=1e-5)


def test_float32_vectors_on_float64_params_follow_vector_dtype(problem):
    params, x, labels, _ = problem
    mv = cv.ggn(_mlp_apply(jnp.tanh), cv.softmax_cross_entropy, params, (x, labels))
    out = mv(jax.tree.map(lambda a: jnp.ones_like(a, jnp.float32), params))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(out))


def test_bad_input_raises_clear_errors(problem):
    params, x, labels, _ = problem
    apply = _mlp_apply(jnp.tanh)
    batch = (x, labels)
    mv = cv.ggn(apply, cv.softmax_cross_entropy, params, batch)
    with pytest.raises(ValueError, match="different pytree structures"):
        mv({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="mismatched leaves"):
        mv(jax.tree.map(lambda a: jnp.zeros(a.shape + (1,)), params))
    with pytest.raises(ValueError, match="kind='bogus'"):
        cv.fisher(apply, params, batch, kind="bogus")
    with pytest.raises(ValueError, match="key is only used"):
        cv.fisher(apply, params, batch, kind="empirical", key=jax.random.key(0))
    with pytest.raises(ValueError, match="needs a likelihood"):
        cv.fisher(apply, params, batch, kind="true", loss=_logcosh)
    with pytest.raises(ValueError, match="num_samples=4"):
        cv.fisher(apply, params, batch, num_samples=4)
    with pytest.raises(ValueError, match="num_samples=0 must be >= 1"):
        cv.fisher(apply, params, batch, kind="true", key=jax.random.key(0), num_samples=0)
    with pytest.raises(TypeError, match="pair"):
        cv.ggn(apply, cv.softmax_cross_entropy, params, x)
    with pytest.raises(ValueError, match="labels must have shape"):
        cv.ggn(apply, cv.softmax_cross_entropy, params, (x, labels[:-1]))
    with pytest.raises(TypeError, match="must return a scalar"):
        cv.ggn(apply, lambda z, y: z, params, batch)
    with pytest.raises(TypeError, match="apply_fn must be a function"):
        cv.ggn(None, cv.softmax_cross_entropy, params, batch)
    with pytest.raises(TypeError, match="floating-point"):
        cv.hvp(lambda p: jnp.sum(p), jnp.arange(3))
    with pytest.raises(ValueError, match="leading batch axis"):
        cv.per_example_grads(lambda p, b: jnp.sum(p), jnp.ones(2), (jnp.ones(3), jnp.ones(4)))
