"""alpha-CROWN: sound, never looser than CROWN, tighter on average, LP-optimal on one layer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linprog

from linjax import verify as vf

TOL = 1e-12


def _relu_mlp(key, sizes=(3, 8, 6, 2), act=jax.nn.relu):
    keys = jax.random.split(key, len(sizes) - 1)
    layers = []
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True):
        k1, k2 = jax.random.split(k)
        layers.append(
            (2.0 * jax.random.normal(k1, (b, a)) / np.sqrt(a), 0.3 * jax.random.normal(k2, (b,)))
        )

    def fn(x):
        for w, b in layers[:-1]:
            x = act(w @ x + b)
        w, b = layers[-1]
        return w @ x + b

    return fn, layers


def _cnn(key):
    k1, k2, k3, k4 = jax.random.split(key, 4)
    kernel = jax.random.normal(k1, (2, 1, 3, 3)) / 3
    bias = 0.1 * jax.random.normal(k2, (2, 1, 1))
    w = jax.random.normal(k3, (3, 2 * 3 * 3)) / np.sqrt(18)
    b = 0.3 * jax.random.normal(k4, (3,))

    def fn(x):  # x: [1, 5, 5] (CHW)
        h = jax.lax.conv_general_dilated(x[None], kernel, (1, 1), "VALID")[0] + bias
        return w @ jax.nn.relu(h).reshape(-1) + b

    return fn


def _nets():
    key = jax.random.key(0)
    mlp, _ = _relu_mlp(key)
    leaky, _ = _relu_mlp(
        jax.random.fold_in(key, 1), sizes=(3, 6, 2), act=lambda z: jax.nn.leaky_relu(z, 0.1)
    )
    x0 = jnp.array([0.3, -0.2, 0.5])
    x_img = jax.random.uniform(jax.random.fold_in(key, 2), (1, 5, 5))
    return {
        "relu-mlp": (mlp, vf.Box.from_eps(x0, 0.5)),
        "leaky-mlp": (leaky, vf.Box.from_eps(x0, 0.5)),
        "cnn": (_cnn(jax.random.fold_in(key, 3)), vf.Box.from_eps(x_img, 0.1)),
    }


NETS = _nets()


@pytest.mark.parametrize("name", sorted(NETS))
def test_sound_and_never_looser_than_crown(name, check_sound):
    fn, box = NETS[name]
    out_dim = jax.eval_shape(fn, box.lower).shape[0]
    # Identity rows and random rows in one spec.
    spec = jnp.concatenate([jnp.eye(out_dim), jax.random.normal(jax.random.key(7), (2, out_dim))])
    out = vf.alpha_crown(fn, box, spec=spec, steps=20)
    ref = vf.crown(fn, box, spec=spec)
    # box_points adds all vertices for the 3-D boxes, 1024 random ones for the CNN.
    check_sound(fn, box, out, jax.random.key(1), spec=spec, num=5000)
    assert np.all(np.asarray(out.lower) >= np.asarray(ref.lower) - TOL)
    assert np.all(np.asarray(out.upper) <= np.asarray(ref.upper) + TOL)


def test_tighter_than_crown_on_average():
    gains = []
    for seed in range(2):
        fn, _ = _relu_mlp(jax.random.key(10 + seed), sizes=(4, 8, 8, 3))
        box = vf.Box.from_eps(jnp.zeros(4), 0.5)
        a, c = vf.alpha_crown(fn, box, steps=30), vf.crown(fn, box)
        wa = np.asarray(a.upper - a.lower)
        wc = np.asarray(c.upper - c.lower)
        assert np.all(wa <= wc + 2 * TOL)
        gains.append(np.mean((wc - wa) / wc))
    print("mean relative width reduction vs CROWN:", gains)
    assert np.mean(gains) > 0.01, gains


def test_auto_lirpa_toy_example():
    # auto_LiRPA examples/simple/toy.py: CROWN [-3, 3], alpha-CROWN [-3, 2].
    w1, w2 = jnp.array([[1.0, -1.0], [2.0, -1.0]]), jnp.array([[1.0, -1.0]])
    box = vf.Box(jnp.array([-1.0, -2.0]), jnp.array([2.0, 1.0]))
    out = vf.alpha_crown(lambda x: w2 @ jax.nn.relu(w1 @ x), box, steps=50)
    np.testing.assert_allclose([out.lower[0], out.upper[0]], [-3.0, 2.0], atol=1e-9)


def test_exact_on_affine():
    a = jax.random.normal(jax.random.key(3), (3, 4))
    b = jnp.array([1.0, -2.0, 0.5])
    box = vf.Box(jnp.array([-1.0, 0.0, 0.5, -2.0]), jnp.array([1.0, 0.5, 2.0, -1.0]))
    out = vf.alpha_crown(lambda x: a @ x + b, box, steps=3)
    verts = np.array(list(itertools.product(*zip(box.lower, box.upper, strict=True))))
    vals = verts @ np.asarray(a).T + np.asarray(b)
    np.testing.assert_allclose(out.lower, vals.min(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.upper, vals.max(0), rtol=1e-12, atol=1e-12)


def _triangle_lp(w1, b1, w2, b2, lower, upper, sign):
    """min over the triangle (Planet) relaxation of sign * (w2 @ relu(w1 x + b1) + b2)."""
    w1, b1, w2, b2 = (np.asarray(v, np.float64) for v in (w1, b1, w2, b2))
    lower, upper = np.asarray(lower), np.asarray(upper)
    c, r = (lower + upper) / 2, (upper - lower) / 2
    zl, zu = w1 @ c + b1 - np.abs(w1) @ r, w1 @ c + b1 + np.abs(w1) @ r
    d, h = w1.shape[1], w1.shape[0]
    # variables [x (d), y (h)]; y_j = relu(z_j) relaxed, z = w1 x + b1.
    obj = np.concatenate([np.zeros(d), sign * w2[0]])
    a_ub, b_ub, a_eq, b_eq = [], [], [], []
    bounds = [(lo, hi) for lo, hi in zip(lower, upper, strict=True)]
    for j in range(h):
        e = np.zeros(h)
        e[j] = 1.0
        if zl[j] >= 0:  # y = z
            a_eq.append(np.concatenate([-w1[j], e]))
            b_eq.append(b1[j])
            bounds.append((None, None))
        elif zu[j] <= 0:  # y = 0
            bounds.append((0.0, 0.0))
        else:  # y >= z, y >= 0, y <= u (z - l) / (u - l)
            a_ub.append(np.concatenate([w1[j], -e]))
            b_ub.append(-b1[j])
            k = zu[j] / (zu[j] - zl[j])
            a_ub.append(np.concatenate([-k * w1[j], e]))
            b_ub.append(k * (b1[j] - zl[j]))
            bounds.append((0.0, None))
    res = linprog(
        obj,
        A_ub=np.array(a_ub) if a_ub else None,
        b_ub=np.array(b_ub) if b_ub else None,
        A_eq=np.array(a_eq) if a_eq else None,
        b_eq=np.array(b_eq) if b_eq else None,
        bounds=bounds,
        method="highs",
    )
    assert res.status == 0
    return sign * (res.fun + sign * b2[0])


@pytest.mark.parametrize("seed", [0, 1])
def test_one_hidden_layer_matches_triangle_lp(seed):
    # One hidden layer: the pre-activation bounds are exact, and by LP duality the best
    # slopes give exactly the LP over the triangle relaxation.
    fn, ((w1, b1), (w2, b2)) = _relu_mlp(jax.random.key(20 + seed), sizes=(2, 8, 1))
    box = vf.Box(jnp.array([-1.0, -0.5]), jnp.array([0.5, 1.0]))
    out = vf.alpha_crown(fn, box, steps=200, lr=0.05)
    lp_low = _triangle_lp(w1, b1, w2, b2, box.lower, box.upper, 1.0)
    lp_high = _triangle_lp(w1, b1, w2, b2, box.lower, box.upper, -1.0)
    scale = 1 + abs(lp_low) + abs(lp_high)
    # Every alpha bound is a bound on the LP, and the optimiser reaches it.
    assert out.lower[0] <= lp_low + 1e-9 * scale
    assert out.upper[0] >= lp_high - 1e-9 * scale
    np.testing.assert_allclose([out.lower[0], out.upper[0]], [lp_low, lp_high], atol=1e-3 * scale)
    crown = vf.crown(fn, box)
    assert out.upper[0] - out.lower[0] <= crown.upper[0] - crown.lower[0] + TOL


def test_jit_and_vmap():
    fn, _ = _relu_mlp(jax.random.key(5), sizes=(3, 5, 4, 2))
    box = vf.Box.from_eps(jnp.array([0.3, -0.2, 0.5]), 0.5)
    spec = jnp.array([[1.0, -1.0]])

    def run(lower, upper):
        return vf.alpha_crown(fn, vf.Box(lower, upper), spec=spec, steps=10)

    # Every call below is jitted (one compile for the single boxes, one for the batch);
    # the eager path is the one of the other tests.
    jitted = jax.jit(run)
    centers = jnp.stack([box.center, box.center + 0.2, box.center - 0.3])
    lows, highs = centers - 0.3, centers + 0.3
    batched = jax.jit(jax.vmap(run))(lows, highs)
    for i in range(3):
        single = jitted(lows[i], highs[i])
        np.testing.assert_allclose(batched.lower[i], single.lower, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(batched.upper[i], single.upper, rtol=1e-10, atol=1e-12)
    assert np.all(np.asarray(batched.lower) <= np.asarray(batched.upper))


def test_bad_input():
    fn, box = NETS["relu-mlp"]
    for steps in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="steps"):
            vf.alpha_crown(fn, box, steps=steps)
    for lr in (0.0, -0.1, float("nan"), "a"):
        with pytest.raises(ValueError, match="lr"):
            vf.alpha_crown(fn, box, lr=lr)
    with pytest.raises(ValueError, match="lower <= upper"):
        vf.alpha_crown(fn, vf.Box(box.upper, box.lower))
