"""branch_and_bound and pgd_attack: complete where CROWN/alpha-CROWN are not, sound, honest."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import verify as vf


def _mlp(key, sizes=(2, 10, 10, 1)):
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True):
        k1, k2 = jax.random.split(k)
        w = jax.random.normal(k1, (b, a)) / np.sqrt(a)
        layers.append((w, 0.5 * jax.random.normal(k2, (b,))))

    def fn(x):
        for w, b in layers[:-1]:
            x = jax.nn.relu(w @ x + b)
        w, b = layers[-1]
        return w @ x + b

    return fn, layers


BOX = vf.Box(-jnp.ones(2, jnp.float64), jnp.ones(2, jnp.float64))
SPEC = jnp.ones((1, 1))


@pytest.fixture(scope="module")
def net():
    """2-10-10-1 ReLU net; its minimum on [-1, 1]^2 from a dense grid plus a Lipschitz margin."""
    fn, layers = _mlp(jax.random.key(0))
    n = 601
    g = jnp.linspace(-1.0, 1.0, n)
    xs = jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2)
    ys = np.asarray(jax.vmap(fn)(xs)[:, 0])
    lip = np.prod([np.linalg.norm(np.asarray(w), 2) for w, _ in layers])
    # Every point is within h / sqrt(2) (Euclidean) of a grid point.
    true_min_lower = ys.min() - lip * (2 / (n - 1)) / np.sqrt(2)
    return fn, float(ys.min()), float(true_min_lower), xs[np.argmin(ys)]


THRESHOLD = -0.85  # true min ~ -0.7906; CROWN -1.19, alpha-CROWN -0.96


def test_setup_is_beyond_crown_and_alpha_crown(net):
    fn, _, true_min_lower, _ = net
    assert true_min_lower > THRESHOLD + 0.04
    assert float(vf.crown(fn, BOX).lower[0]) < THRESHOLD - 0.1
    assert float(vf.alpha_crown(fn, BOX, steps=20).lower[0]) < THRESHOLD - 0.05


@pytest.mark.parametrize(
    "method,split", [("alpha-crown", "input"), ("alpha-crown", "relu"), ("crown", "input")]
)
def test_proves_true_property(net, method, split):
    fn, grid_min, _, _ = net
    res = vf.branch_and_bound(
        fn, BOX, SPEC, threshold=THRESHOLD, method=method, split=split, max_domains=500, steps=10
    )
    assert res.status == "verified"
    assert res.counterexample is None
    assert 1 < res.num_domains <= 500
    # The margin bound is positive and below the true margin (sound).
    assert 0 < res.lower_bound <= grid_min - THRESHOLD


@pytest.mark.slow
def test_relu_split_on_shifted_max_and_leaky_relu():
    """Kinks away from 0 (max(z, 0.3)) and leaky ReLU: split at the pivot, still sound."""
    k = jax.random.split(jax.random.key(11), 5)
    w1, b1 = jax.random.normal(k[0], (8, 2)), 0.5 * jax.random.normal(k[1], (8,))
    w2, b2 = jax.random.normal(k[2], (8, 8)) / np.sqrt(8), 0.5 * jax.random.normal(k[3], (8,))
    w3 = jax.random.normal(k[4], (1, 8)) / np.sqrt(8)

    def fn(x):
        h = jnp.maximum(w1 @ x + b1, 0.3)
        return w3 @ jax.nn.leaky_relu(w2 @ h + b2, 0.1)

    g = jnp.linspace(-1.0, 1.0, 401)
    grid_min = float(jax.vmap(fn)(jnp.stack(jnp.meshgrid(g, g), -1).reshape(-1, 2)).min())
    alpha = float(vf.alpha_crown(fn, BOX, steps=20).lower[0])
    threshold = alpha + 0.7 * (grid_min - alpha)  # grid_min - alpha ~ 0.19
    res = vf.branch_and_bound(
        fn, BOX, SPEC, threshold=threshold, split="relu", steps=10, max_domains=400
    )
    assert res.status == "verified"
    assert 0 < res.lower_bound <= grid_min - threshold


def test_ibp_input_split_also_completes(net):
    fn, grid_min, _, _ = net
    res = vf.branch_and_bound(fn, BOX, SPEC, threshold=THRESHOLD, method="ibp", split="input")
    assert res.status == "verified"
    assert 0 < res.lower_bound <= grid_min - THRESHOLD
    crown_res = vf.branch_and_bound(fn, BOX, SPEC, threshold=THRESHOLD, method="crown")
    assert crown_res.num_domains < res.num_domains  # tighter bounds, fewer domains


@pytest.mark.parametrize("split", ["input", "relu"])
def test_falsifies_false_property(net, split):
    fn, grid_min, _, _ = net
    threshold = grid_min + 0.04  # violated near the minimiser only
    res = vf.branch_and_bound(fn, BOX, SPEC, threshold=threshold, method="crown", split=split)
    assert res.status == "falsified"
    x = np.asarray(res.counterexample)
    assert np.all(x >= -1) and np.all(x <= 1)
    assert float(fn(res.counterexample)[0]) <= threshold
    assert res.lower_bound <= float(fn(res.counterexample)[0]) - threshold


def test_unknown_when_budget_runs_out_and_bound_is_sound(net):
    fn, grid_min, _, _ = net
    res = vf.branch_and_bound(
        fn, BOX, SPEC, threshold=THRESHOLD, method="ibp", max_domains=5, batch_size=4
    )
    assert res.status == "unknown" and res.counterexample is None
    assert res.num_domains <= 5
    assert res.lower_bound <= grid_min - THRESHOLD
    one = vf.branch_and_bound(fn, BOX, SPEC, threshold=THRESHOLD, method="ibp", max_domains=1)
    assert one.num_domains == 1 and one.status == "unknown"
    assert one.lower_bound == pytest.approx(float(vf.ibp(fn, BOX).lower[0]) - THRESHOLD)


def test_grouped_rows_are_alternatives():
    # f(x) = (x, -x) on [-1, 1]: "x > -0.5 or -x > -0.5" always holds (|x| <= 1 is not
    # needed: one of them exceeds -0.5 everywhere), while "x > -0.5 and -x > -0.5" fails at 0.9.
    fn = lambda x: jnp.concatenate([x, -x])  # noqa: E731
    box = vf.Box(-jnp.ones(1), jnp.ones(1))
    spec = jnp.eye(2)
    both = vf.branch_and_bound(fn, box, spec, threshold=-0.5, method="crown")
    assert both.status == "falsified"
    assert float(jnp.min(fn(both.counterexample))) <= -0.5
    either = vf.branch_and_bound(
        fn, box, spec, threshold=-0.5, method="crown", groups=jnp.array([0, 0])
    )
    assert either.status == "verified" and either.lower_bound > 0


@pytest.mark.slow
def test_beta_crown_bound_is_sound_on_a_split_subdomain():
    """alpha-beta-CROWN on clamped pre-activations vs the sampled minimum of that sub-domain."""
    from linjax.verify import _graph
    from linjax.verify._bab_bound import beta_crown, find_sites
    from linjax.verify._crown import concretize, linear_parts, propagate

    fn, layers = _mlp(jax.random.key(5), (2, 6, 6, 1))
    box = vf.Box(-jnp.ones(2), jnp.ones(2))
    like = jax.ShapeDtypeStruct((2,), jnp.float64)
    graph = _graph.trace(fn, like)
    sites = find_sites(graph, propagate(graph, box, intermediate="ibp"))
    assert len(sites) == 2
    (w1, b1), (w2, b2), _ = layers
    xs = jax.random.uniform(jax.random.key(6), (200_000, 2), minval=-1, maxval=1, dtype=jnp.float64)
    z1 = xs @ w1.T + b1
    z2 = jax.nn.relu(z1) @ w2.T + b2
    ys = np.asarray(jax.vmap(fn)(xs)[:, 0])
    inf = jnp.full(6, jnp.inf)
    splits = {  # z1_0 >= 0, z1_1 <= 0, z2_2 >= 0
        sites[0].var: (-inf.at[0].set(0.0), inf.at[1].set(0.0)),
        sites[1].var: (-inf.at[2].set(0.0), inf),
    }
    inside = np.asarray((z1[:, 0] >= 0) & (z1[:, 1] <= 0) & (z2[:, 2] >= 0))
    assert inside.sum() > 1000
    with jax.default_matmul_precision("highest"):
        low = float(beta_crown(graph, box, SPEC, splits, steps=30, lr=0.1, intermediate="crown")[0])
        _, (lA, lb, _, _), _ = linear_parts(fn, box, SPEC, "crown", splits=splits)
        clamp_only = float(concretize(lA, lb, box)[0])
    assert low <= ys[inside].min() + 1e-9
    assert low >= clamp_only - 1e-9  # beta = 0 is the starting point


def test_compiled_cache_never_serves_a_stale_network():
    # Compilations are shared between calls computing the same thing; a numpy weight
    # changed in place is a different network and must be re-bounded.
    w = np.array([[1.0, -1.0], [0.5, 2.0]])
    fn = lambda x: jnp.sum(jax.nn.relu(w @ x), keepdims=True)  # noqa: E731
    box = vf.Box(-jnp.ones(2), jnp.ones(2))
    assert vf.branch_and_bound(fn, box, SPEC, threshold=-0.5, method="crown").status == ("verified")
    w[:] = -w  # still >= 0: verified again
    assert vf.branch_and_bound(fn, box, SPEC, threshold=-0.5, method="crown").status == ("verified")
    fn2 = lambda x: jnp.sum(jax.nn.relu(w @ x), keepdims=True) - 1.0  # noqa: E731
    res = vf.branch_and_bound(fn2, box, SPEC, threshold=-0.5, method="crown")
    assert res.status == "falsified" and float(fn2(res.counterexample)[0]) <= -0.5
    w[:] = 0.0  # now fn2 = -1 everywhere
    res = vf.branch_and_bound(fn2, box, SPEC, threshold=-1.5, method="crown")
    assert res.status == "verified" and res.lower_bound == pytest.approx(0.5)
    w[:] = 5.0
    res = vf.branch_and_bound(fn2, box, SPEC, threshold=-0.5, method="crown")
    assert res.status == "falsified"  # relu(5 x1 + 5 x2) = 0 on half the box


def test_pgd_attack_finds_the_minimum_reproducibly():
    fn = lambda x: jnp.atleast_1d(jnp.sum((x - 0.3) ** 2))  # noqa: E731
    box = vf.Box(-jnp.ones(3), jnp.ones(3))
    a = vf.pgd_attack(fn, box, jnp.ones((1, 1)), 0.01, key=jax.random.key(1), steps=100)
    b = vf.pgd_attack(fn, box, jnp.ones((1, 1)), 0.01, key=jax.random.key(1), steps=100)
    np.testing.assert_array_equal(np.asarray(a.x), np.asarray(b.x))
    assert float(a.margin) < 0
    assert float(a.margin) == pytest.approx(float(fn(a.x)[0]) - 0.01)
    np.testing.assert_allclose(np.asarray(a.x), 0.3, atol=0.05)


def test_bad_input():
    fn = lambda x: 2 * x  # noqa: E731
    box = vf.Box(jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ValueError, match="spec.shape"):
        vf.branch_and_bound(fn, box, jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="method"):
        vf.branch_and_bound(fn, box, jnp.ones((1, 2)), method="beta-crown")
    with pytest.raises(ValueError, match="max_domains"):
        vf.branch_and_bound(fn, box, jnp.ones((1, 2)), max_domains=0)
    with pytest.raises(ValueError, match="split"):
        vf.branch_and_bound(fn, box, jnp.ones((1, 2)), split="neuron")
    with pytest.raises(ValueError, match="threshold"):
        vf.branch_and_bound(fn, box, jnp.ones((1, 2)), threshold=jnp.zeros(3))
    with pytest.raises(ValueError, match="groups"):
        vf.branch_and_bound(fn, box, jnp.ones((1, 2)), groups=jnp.array([0.5]))
    with pytest.raises(ValueError, match="batch_size"):
        vf.branch_and_bound(fn, box, jnp.ones((1, 2)), batch_size=3)
    with pytest.raises(ValueError, match="lower <= upper"):
        vf.branch_and_bound(fn, vf.Box(jnp.ones(2), jnp.zeros(2)), jnp.ones((1, 2)))
    with pytest.raises(ValueError, match="restarts"):
        vf.pgd_attack(fn, box, jnp.ones((1, 2)), key=jax.random.key(0), restarts=0)
