"""local_lipschitz: sampled gradient norms <= the bound <= the naive product of layer norms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import verify as vf

DUAL = {"inf": 1, 2: 2, 1: np.inf}  # input norm -> dual norm order for np.linalg.norm


def mlp(key, act, sizes=(3, 8, 8, 2)):
    keys = jax.random.split(key, 2 * (len(sizes) - 1))
    ws = [
        1.5 * jax.random.normal(keys[2 * i], (b, a)) / np.sqrt(a)
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]
    bs = [0.3 * jax.random.normal(keys[2 * i + 1], (w.shape[0],)) for i, w in enumerate(ws)]

    def fn(x):
        for w, b in zip(ws[:-1], bs[:-1], strict=True):
            x = act(w @ x + b)
        return ws[-1] @ x + bs[-1]

    return fn, ws


def sampled_grad_norms(fn, box, key, norm, num=2_000):
    lo, hi = box.lower, box.upper
    xs = jax.random.uniform(key, (num,) + lo.shape, lo.dtype, minval=lo, maxval=hi)
    bits = (np.arange(2**lo.size)[:, None] >> np.arange(lo.size)[None]) & 1
    verts = jnp.where(bits.astype(bool), hi, lo)
    jacs = jax.vmap(jax.jacrev(fn))(jnp.concatenate([xs, verts]))
    return np.max(np.linalg.norm(np.asarray(jacs), ord=DUAL[norm], axis=-1), axis=0)


@pytest.mark.parametrize("act", ["relu", "tanh"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_le_local_le_naive(act, seed):
    fn, ws = mlp(jax.random.key(seed), {"relu": jax.nn.relu, "tanh": jnp.tanh}[act])
    x0 = jax.random.normal(jax.random.key(100 + seed), (3,))
    for norm, eps in (("inf", 0.2), (1, 0.2), (2, 0.05)):
        box = vf.Box.from_eps(x0, eps)
        lip = np.asarray(vf.local_lipschitz(fn, box, norm=norm))
        sampled = sampled_grad_norms(fn, box, jax.random.key(7), norm)
        naive = np.asarray(vf.naive_lipschitz(ws, norm=norm))
        assert lip.shape == (2,)
        assert np.all(sampled <= lip * (1 + 1e-9) + 1e-12), (norm, sampled, lip)
        assert np.all(lip <= naive * (1 + 1e-9)), (norm, lip, naive)
        # Far below the product of norms on a small box.
        assert np.all(lip < 0.8 * naive), (norm, lip, naive)


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_crown_method_bounds_the_norm(act):
    # Deeper net: the norm bounded by CROWN through the Jacobian graph.
    fn, ws = mlp(jax.random.key(5), {"relu": jax.nn.relu, "tanh": jnp.tanh}[act], (3, 8, 8, 8, 2))
    box = vf.Box.from_eps(jax.random.normal(jax.random.key(6), (3,)), 0.2)
    for norm in ("inf", 1, 2):
        lip = np.asarray(vf.local_lipschitz(fn, box, norm=norm, method="crown"))
        sampled = sampled_grad_norms(fn, box, jax.random.key(8), norm)
        naive = np.asarray(vf.naive_lipschitz(ws, norm=norm))
        assert np.all(sampled <= lip * (1 + 1e-9) + 1e-12), (norm, sampled, lip)
        assert np.all(lip <= naive), (norm, lip, naive)


def test_affine_is_exact_dual_norm():
    w = jnp.array([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    box = vf.Box.from_eps(jnp.zeros(3), 1.0)
    fn = lambda x: w @ x + 1.0  # noqa: E731
    np.testing.assert_allclose(vf.local_lipschitz(fn, box), [3.5, 4.0])
    np.testing.assert_allclose(vf.local_lipschitz(fn, box, norm=math.inf), [3.5, 4.0])
    np.testing.assert_allclose(vf.local_lipschitz(fn, box, norm=1), [2.0, 3.0])
    np.testing.assert_allclose(vf.local_lipschitz(fn, box, norm=2), np.linalg.norm(w, axis=1))


def test_naive_lipschitz_closed_form():
    w1 = jnp.array([[1.0, -2.0], [0.5, 1.0]])
    w2 = jnp.array([[3.0, -4.0]])
    np.testing.assert_allclose(vf.naive_lipschitz([w1, w2]), [7.0 * 3.0])
    np.testing.assert_allclose(vf.naive_lipschitz([w1, w2], norm=1), [4.0 * 3.0])
    np.testing.assert_allclose(
        vf.naive_lipschitz([w1, w2], norm=2), [5.0 * np.linalg.norm(w1, 2)], rtol=1e-12
    )
    np.testing.assert_allclose(
        vf.naive_lipschitz([w1, w2], activation_lipschitz=0.25), [7.0 * 3.0 / 4]
    )


def test_scalar_output_and_cnn_shapes(getkey):
    kernel = jax.random.normal(getkey(), (2, 1, 3, 3)) / 3

    def fn(x):  # [1, 4, 4] -> [2, 2, 2] feature map
        return jnp.tanh(jax.lax.conv_general_dilated(x[None], kernel, (1, 1), "VALID")[0])

    box = vf.Box.from_eps(jax.random.uniform(getkey(), (1, 4, 4)), 0.05)
    lip = vf.local_lipschitz(fn, box)
    assert lip.shape == (2, 2, 2)
    # Each output sees a 3x3 patch through one tanh (derivative <= 1).
    assert np.all(
        np.asarray(lip) <= np.sum(np.abs(np.asarray(kernel)), axis=(1, 2, 3))[:, None, None] + 1e-12
    )
    scalar = vf.local_lipschitz(lambda x: jnp.sum(fn(x)), box, norm=2)
    assert scalar.shape == ()


def test_jit_vmap(getkey):
    fn, _ = mlp(getkey(), jnp.tanh)
    centers = jax.random.normal(getkey(), (3, 3))
    boxes = vf.Box(centers - 0.1, centers + 0.1)
    out = jax.jit(jax.vmap(lambda b: vf.local_lipschitz(fn, b)))(boxes)
    for i in range(3):
        one = vf.local_lipschitz(fn, vf.Box(boxes.lower[i], boxes.upper[i]))
        np.testing.assert_allclose(out[i], one, rtol=1e-10)


def test_bad_inputs():
    box = vf.Box.from_eps(jnp.zeros(2), 0.1)
    for bad in (3, 0.5, "l2", None, True):
        with pytest.raises(ValueError, match="norm"):
            vf.local_lipschitz(lambda x: x, box, norm=bad)
    with pytest.raises(ValueError, match="chain"):
        vf.naive_lipschitz([jnp.ones((3, 2)), jnp.ones((1, 4))])
    with pytest.raises(ValueError, match="2-D"):
        vf.naive_lipschitz([jnp.ones(3)])
    with pytest.raises(ValueError, match="lower <= upper"):
        vf.local_lipschitz(lambda x: x, vf.Box(jnp.ones(2), jnp.zeros(2)))
