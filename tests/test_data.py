"""Tests for linjax.data: the digits loader and the 2-D toy samplers."""

import functools as ft
import importlib.util
import sys

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from linjax import data

requires_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None, reason="scikit-learn is not installed"
)


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------


@requires_sklearn
def test_digits_shapes_dtypes_range():
    d = data.load_digits()
    assert d.x_train.shape == (1347, 64) and d.x_test.shape == (450, 64)
    assert d.y_train.shape == (1347,) and d.y_test.shape == (450,)
    assert d.x_train.dtype == jnp.float32 and d.x_test.dtype == jnp.float32
    assert d.y_train.dtype == jnp.int32 and d.y_test.dtype == jnp.int32
    for x in (d.x_train, d.x_test):
        assert isinstance(x, jax.Array)
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        # Pixels are the integers 0..16 divided by 16.
        np.testing.assert_array_equal(np.asarray(x) * 16, np.round(np.asarray(x) * 16))
    assert set(np.unique(d.y_train)) == set(range(10)) == set(np.unique(d.y_test))


@requires_sklearn
def test_digits_split_is_stratified_and_disjoint():
    from sklearn.datasets import load_digits as sk_load

    d = data.load_digits()
    raw = sk_load()
    raw_rows = [row.tobytes() for row in (raw.data / 16).astype(np.float32)]
    train = [row.tobytes() for row in np.asarray(d.x_train)]
    test = [row.tobytes() for row in np.asarray(d.x_test)]
    # The split is a partition of the 1797 images (as a multiset: digits has a few duplicates),
    # so no image is in both sets unless it occurs twice in the data.
    assert sorted(train + test) == sorted(raw_rows)
    duplicated = {r for r in raw_rows if raw_rows.count(r) > 1}
    assert not (set(train) & set(test)) - duplicated
    counts = np.bincount(raw.target, minlength=10)
    test_counts = np.bincount(np.asarray(d.y_test), minlength=10)
    np.testing.assert_array_equal(test_counts, np.round(0.25 * counts).astype(int))
    # Labels travel with their images.
    label_of = dict(zip(raw_rows, raw.target, strict=True))
    assert all(label_of[r] == y for r, y in zip(train, np.asarray(d.y_train), strict=True))
    assert all(label_of[r] == y for r, y in zip(test, np.asarray(d.y_test), strict=True))


@requires_sklearn
def test_digits_deterministic_and_seeded():
    a, b = data.load_digits(), data.load_digits()
    for u, v in zip(a, b, strict=True):
        np.testing.assert_array_equal(u, v)
    c = data.load_digits(seed=1)
    assert not np.array_equal(a.y_train, c.y_train)
    e = data.load_digits(test_fraction=0.5)
    assert e.x_test.shape[0] + e.x_train.shape[0] == 1797
    assert abs(e.x_test.shape[0] - 1797 / 2) <= 10


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_digits_bad_fraction(bad):
    with pytest.raises(ValueError, match=f"test_fraction={bad}"):
        data.load_digits(test_fraction=bad)


@requires_sklearn
def test_digits_images():
    d = data.load_digits()
    images = data.digits_images(d.x_train)
    assert images.shape == (1347, 8, 8)
    np.testing.assert_array_equal(images[3, 2], d.x_train[3, 16:24])
    assert data.digits_images(d.x_train[0]).shape == (8, 8)
    with pytest.raises(ValueError, match="64"):
        data.digits_images(jnp.zeros((3, 63)))


def test_digits_missing_sklearn_message(monkeypatch):
    data._raw_digits.cache_clear()
    data._split_digits.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` fail
    try:
        with pytest.raises(ImportError, match=r'pip install -e "\.\[examples\]"'):
            data.load_digits(seed=123)
    finally:
        data._raw_digits.cache_clear()
        data._split_digits.cache_clear()


# --------------------------------------------------------------------------------------------
# 2-D samplers
# --------------------------------------------------------------------------------------------


def _mixture(key, num, **kw):
    return data.gaussian_mixture(key, num, **kw)


def _moons(key, num, **kw):
    return data.two_moons(key, num, **kw)


def _board(key, num, **kw):
    return data.checkerboard(key, num, **kw)


SAMPLERS = [
    pytest.param(_mixture, True, id="gaussian_mixture"),
    pytest.param(_board, False, id="checkerboard"),
    pytest.param(_moons, True, id="two_moons"),
]


def _points(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("sampler, labelled", SAMPLERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_sampler_shapes_and_dtypes(sampler, labelled, dtype):
    out = sampler(jr.key(0), 37, dtype=dtype)
    x = _points(out)
    assert x.shape == (37, 2) and x.dtype == dtype
    assert bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
    assert isinstance(out, tuple) == labelled
    if labelled:
        assert out[1].shape == (37,) and out[1].dtype == jnp.int32


@pytest.mark.parametrize("sampler, labelled", SAMPLERS)
def test_sampler_default_dtype_is_float32_even_with_x64(sampler, labelled):
    with jax.enable_x64():
        assert _points(sampler(jr.key(0), 5)).dtype == jnp.float32
        assert _points(sampler(jr.key(0), 5, dtype=jnp.float64)).dtype == jnp.float64


@pytest.mark.parametrize("sampler, labelled", SAMPLERS)
def test_sampler_deterministic_and_key_dependent(sampler, labelled):
    a, b = sampler(jr.key(3), 64), sampler(jr.key(3), 64)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)
    c = sampler(jr.key(4), 64)
    assert not np.array_equal(_points(a), _points(c))
    # Legacy uint32 keys work too.
    assert _points(sampler(jr.PRNGKey(0), 8)).shape == (8, 2)


@pytest.mark.parametrize("sampler, labelled", SAMPLERS)
def test_sampler_jit_and_vmap(sampler, labelled):
    eager = sampler(jr.key(1), 50)
    jitted = jax.jit(sampler, static_argnums=1)(jr.key(1), 50)
    for u, v in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6)
    batched = jax.vmap(ft.partial(sampler, num=10))(jr.split(jr.key(2), 3))
    assert _points(batched).shape == (3, 10, 2)


@pytest.mark.parametrize("sampler, labelled", SAMPLERS)
@pytest.mark.parametrize("bad", [0, -3])
def test_sampler_bad_num(sampler, labelled, bad):
    with pytest.raises(ValueError, match=f"num={bad}"):
        sampler(jr.key(0), bad)


@pytest.mark.parametrize("sampler, labelled", SAMPLERS)
def test_sampler_rejects_traced_num_and_int_dtype(sampler, labelled):
    with pytest.raises(TypeError, match="static"):
        sampler(jr.key(0), 2.0)
    with pytest.raises(ValueError, match="floating"):
        sampler(jr.key(0), 4, dtype=jnp.int32)


def test_gaussian_mixture_samples_near_their_centre():
    x, labels = data.gaussian_mixture(jr.key(0), 4000, num_components=6, radius=3.0, std=0.2)
    centres = data.gaussian_mixture_centres(num_components=6, radius=3.0)
    np.testing.assert_allclose(jnp.linalg.norm(centres, axis=-1), 3.0, rtol=1e-6)
    dist = jnp.linalg.norm(x - centres[labels], axis=-1)
    assert float(dist.max()) < 6 * 0.2  # P(chi_2 > 6) ~ 1.5e-8 per sample
    # Nearest centre is the label; components are used roughly uniformly; per-component std.
    nearest = jnp.argmin(jnp.linalg.norm(x[:, None, :] - centres[None], axis=-1), axis=-1)
    np.testing.assert_array_equal(nearest, labels)
    counts = np.bincount(np.asarray(labels), minlength=6)
    assert counts.min() > 4000 / 6 * 0.8
    np.testing.assert_allclose(jnp.std(x - centres[labels], axis=0), 0.2, rtol=0.1)


def test_gaussian_mixture_logpdf_normalised():
    # Riemann sum over a grid covering the support integrates to 1.
    g = jnp.linspace(-7.0, 7.0, 561)
    xx, yy = jnp.meshgrid(g, g)
    grid = jnp.stack([xx, yy], axis=-1)
    logp = data.gaussian_mixture_logpdf(grid)
    assert logp.shape == (561, 561)
    mass = float(jnp.sum(jnp.exp(logp)) * (g[1] - g[0]) ** 2)
    assert abs(mass - 1.0) < 1e-3
    # With one component it is the Gaussian density at its centre.
    single = data.gaussian_mixture_logpdf(jnp.array([4.0, 0.0]), num_components=1, std=0.5)
    np.testing.assert_allclose(single, -np.log(2 * np.pi * 0.25), rtol=1e-6)


@pytest.mark.parametrize("num_squares", [1, 2, 4, 5])
def test_checkerboard_on_dark_squares(num_squares):
    x = data.checkerboard(jr.key(0), 4000, num_squares=num_squares)
    assert bool(jnp.all(jnp.abs(x) <= 2.0))
    # Check the cell parity independently of checkerboard_mask.
    cell = np.floor((np.asarray(x, np.float64) + 2.0) * num_squares / 4.0).astype(int)
    cell = np.clip(cell, 0, num_squares - 1)
    assert np.all((cell[:, 0] + cell[:, 1]) % 2 == 0)
    assert bool(data.checkerboard_mask(x, num_squares=num_squares).all())
    # Every dark cell is hit, roughly uniformly.
    dark = [(i, j) for i in range(num_squares) for j in range(num_squares) if (i + j) % 2 == 0]
    hits = np.array([np.sum(np.all(cell == c, axis=1)) for c in dark])
    assert hits.min() > 4000 / len(dark) * 0.75


def test_checkerboard_mask():
    pts = jnp.array([[-1.5, -1.5], [-0.5, -1.5], [0.5, 0.5], [2.5, 0.0], [1.5, -0.5]])
    np.testing.assert_array_equal(data.checkerboard_mask(pts), [True, False, True, False, True])
    assert data.checkerboard_mask(jnp.zeros((3, 4, 2))).shape == (3, 4)


def test_two_moons_geometry():
    noise = 0.01
    x, labels = data.two_moons(jr.key(0), 2001, noise=noise)
    assert int(labels.sum()) == 1001 and int((labels == 0).sum()) == 1000
    x, labels = np.asarray(x, np.float64), np.asarray(labels)
    upper, lower = x[labels == 0], x[labels == 1]
    tol = 6 * noise
    # Upper moon: unit half circle around the origin; lower: around (1, 0.5), flipped.
    np.testing.assert_allclose(np.linalg.norm(upper, axis=1), 1.0, atol=tol)
    np.testing.assert_allclose(np.linalg.norm(lower - [1.0, 0.5], axis=1), 1.0, atol=tol)
    assert upper[:, 1].min() > -tol and lower[:, 1].max() < 0.5 + tol
    # Angles cover the whole half circle.
    assert upper[:, 0].min() < -0.95 and upper[:, 0].max() > 0.95
    # Labels are shuffled, not blocked.
    assert 0 < labels[:1000].sum() < 1000
