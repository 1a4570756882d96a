"""Embedded real data for examples, notebooks and the tour.

Two kinds of data, both available offline:

* :func:`load_digits` — scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes),
  split into fixed train and test sets. scikit-learn is an optional dependency
  (``pip install -e ".[examples]"``).
* 2-D toy distributions — :func:`gaussian_mixture`, :func:`checkerboard` and :func:`two_moons`.
  They are pure JAX, so they can be called under ``jax.jit`` / ``jax.vmap`` (with ``num`` static)
  to draw fresh batches inside a training step.
"""

from __future__ import annotations

import functools as ft
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax.typing import DTypeLike

__all__ = [
    "Digits",
    "checkerboard",
    "checkerboard_mask",
    "digits_images",
    "gaussian_mixture",
    "gaussian_mixture_centres",
    "gaussian_mixture_logpdf",
    "load_digits",
    "two_moons",
]

_INSTALL_HINT = 'pip install -e ".[examples]"'
# The checkerboard lives on [-_BOARD, _BOARD]^2.
_BOARD = 2.0


# --------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------


class Digits(NamedTuple):
    """scikit-learn's 8x8 digits, split into train and test sets.

    Pixels are flattened row-major (``x.reshape(-1, 8, 8)`` gives images, see
    :func:`digits_images`) and scaled from the integers 0..16 to ``[0, 1]``.

    Attributes:
        x_train: training images, ``[n_train, 64]`` float32 in ``[0, 1]``.
        y_train: training labels, ``[n_train]`` int32 in ``0..9``.
        x_test: test images, ``[n_test, 64]`` float32 in ``[0, 1]``.
        y_test: test labels, ``[n_test]`` int32 in ``0..9``.
    """

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array


def load_digits(*, test_fraction: float = 0.25, seed: int = 0) -> Digits:
    """Load scikit-learn's bundled 8x8 digits with a fixed stratified train/test split.

    The split is stratified by class: for each digit, a ``numpy`` generator seeded with ``seed``
    permutes that digit's examples and puts ``round(test_fraction * count)`` of them in the test
    set; both sets are then shuffled with the same generator. The result depends only on
    ``(test_fraction, seed)``, so every call returns identical arrays (the numpy arrays are cached).

    Args:
        test_fraction: fraction of each class held out for testing, in ``(0, 1)``.
        seed: seed of the split's ``numpy.random.default_rng``.

    Returns:
        A :class:`Digits` of JAX arrays: ``x_train [n_train, 64]`` and ``x_test [n_test, 64]``
        float32 in ``[0, 1]``, ``y_train [n_train]`` and ``y_test [n_test]`` int32 in ``0..9``.
        With the defaults, ``n_train = 1347`` and ``n_test = 450``.

    Raises:
        ImportError: if scikit-learn is not installed.
        ValueError: if ``test_fraction`` is not in ``(0, 1)``.

    Examples:
        >>> data = load_digits()
        >>> data.x_train.shape, data.x_test.shape
        ((1347, 64), (450, 64))
    """
    if isinstance(test_fraction, bool) or not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"{test_fraction=} must be in (0, 1)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{seed=} must be an int")
    arrays = _split_digits(float(test_fraction), int(seed))
    # Convert on every call: the cache holds numpy arrays, so no device placement is pinned.
    return Digits(*(jnp.asarray(a) for a in arrays))


def digits_images(x: jax.Array) -> jax.Array:
    """Reshape flattened digits ``[..., 64]`` to images ``[..., 8, 8]`` (row-major).

    Args:
        x: flattened digits, e.g. ``load_digits().x_train`` or a model's reconstructions.

    Returns:
        The same values as ``[..., 8, 8]`` images.
    """
    if x.shape[-1:] != (64,):
        raise ValueError(f"{x.shape=} must end in 64 (flattened 8x8 digits)")
    return x.reshape(*x.shape[:-1], 8, 8)


@ft.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn import datasets
    except ImportError as err:
        raise ImportError(
            f"linjax.data.load_digits needs scikit-learn, an optional dependency: {_INSTALL_HINT}"
        ) from err
    bunch = datasets.load_digits()
    x = (np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0)).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int32)
    return x, y


@ft.lru_cache(maxsize=8)
def _split_digits(test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    x, y = _raw_digits()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(10):
        idx = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train))
    test_idx = rng.permutation(np.concatenate(test))
    out = (x[train_idx], y[train_idx], x[test_idx], y[test_idx])
    for a in out:
        a.setflags(write=False)  # the cache hands out the same arrays every time
    return out


# --------------------------------------------------------------------------------------------
# 2-D toy distributions
# --------------------------------------------------------------------------------------------


def _check_num(num: int, name: str = "num") -> int:
    # Shapes depend on `num`, so it must be a concrete Python int (static under jit).
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)):
        raise TypeError(f"{name}={num!r} must be a static Python int (got {type(num).__name__})")
    if num < 1:
        raise ValueError(f"{name}={num!r} must be >= 1")
    return int(num)


def _check_dtype(dtype: DTypeLike) -> np.dtype:
    dt = np.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"dtype={dt} must be a floating dtype (e.g. jnp.float32)")
    return dt


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    # Draw and do trigonometry in at least float32, then cast: bfloat16 angles are too coarse.
    # (Explicit rule, not jnp.promote_types: that raises under strict dtype promotion.)
    return dtype if dtype.itemsize >= 4 else np.dtype(np.float32)


def _check_nonnegative(name: str, value: float) -> None:
    # Only concrete numbers can be checked; traced values (e.g. under vmap) pass through.
    if isinstance(value, (int, float, np.number)) and not value >= 0:
        raise ValueError(f"{name}={value!r} must be >= 0")


def gaussian_mixture_centres(
    *, num_components: int = 8, radius: float = 4.0, dtype: DTypeLike = jnp.float32
) -> jax.Array:
    r"""Centres of :func:`gaussian_mixture`'s components: evenly spaced on a circle.

    Component $k$ sits at $r(\cos(2\pi k/K), \sin(2\pi k/K))$.

    Args:
        num_components: number of components $K \ge 1$.
        radius: radius $r$ of the circle.
        dtype: floating dtype of the result.

    Returns:
        The centres, ``[num_components, 2]``.
    """
    num_components = _check_num(num_components, "num_components")
    dtype = _check_dtype(dtype)
    _check_nonnegative("radius", radius)
    angles = 2.0 * np.pi * np.arange(num_components) / num_components
    unit = jnp.asarray(np.stack([np.cos(angles), np.sin(angles)], axis=-1), dtype)
    return jnp.asarray(radius, dtype) * unit


def gaussian_mixture(
    key: jax.Array,
    num: int,
    *,
    num_components: int = 8,
    radius: float = 4.0,
    std: float = 0.5,
    dtype: DTypeLike = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    r"""Sample a mixture of isotropic Gaussians whose centres lie on a circle.

    $p(x) = \frac1K \sum_{k=0}^{K-1} \mathcal N\big(x;\ c_k,\ \sigma^2 I\big)$ with centres
    $c_k$ from :func:`gaussian_mixture_centres`. Components are picked uniformly at random.

    Args:
        key: PRNG key.
        num: number of samples, a static int ``>= 1``.
        num_components: number of components $K \ge 1$ (static).
        radius: radius of the circle of centres.
        std: standard deviation $\sigma$ of every component.
        dtype: floating dtype of the samples.

    Returns:
        ``(x, labels)``: samples ``[num, 2]`` of ``dtype`` and their component indices
        ``[num]`` int32 in ``0..num_components-1``.

    Examples:
        >>> x, labels = gaussian_mixture(jax.random.key(0), 512)
        >>> x.shape, x.dtype, labels.dtype
        ((512, 2), dtype('float32'), dtype('int32'))
    """
    num = _check_num(num)
    dtype = _check_dtype(dtype)
    _check_nonnegative("std", std)
    work = _compute_dtype(dtype)
    centres = gaussian_mixture_centres(num_components=num_components, radius=radius, dtype=work)
    k_label, k_noise = jr.split(key)
    labels = jr.randint(k_label, (num,), 0, num_components, dtype=jnp.int32)
    x = centres[labels] + jnp.asarray(std, work) * jr.normal(k_noise, (num, 2), work)
    return x.astype(dtype), labels


def gaussian_mixture_logpdf(
    x: jax.Array,
    *,
    num_components: int = 8,
    radius: float = 4.0,
    std: float = 0.5,
) -> jax.Array:
    r"""Log-density of :func:`gaussian_mixture` at ``x``.

    $\log p(x) = \operatorname{logsumexp}_k \big(-\tfrac{\lVert x - c_k\rVert^2}{2\sigma^2}\big)
    - \log K - \log(2\pi\sigma^2)$.

    Args:
        x: points ``[..., 2]``.
        num_components: number of components, as in :func:`gaussian_mixture`.
        radius: radius of the circle of centres.
        std: standard deviation of every component (must be ``> 0``).

    Returns:
        The log-density, ``x.shape[:-1]``, in ``x``'s dtype.
    """
    if x.shape[-1:] != (2,):
        raise ValueError(f"{x.shape=} must end in 2")
    if isinstance(std, (int, float, np.number)) and not std > 0:
        raise ValueError(f"{std=} must be > 0")
    dtype = x.dtype
    centres = gaussian_mixture_centres(num_components=num_components, radius=radius, dtype=dtype)
    centres = centres.reshape((1,) * (x.ndim - 1) + centres.shape)
    var = jnp.asarray(std, dtype) ** 2
    sq = jnp.sum((x[..., None, :] - centres) ** 2, axis=-1)
    log_norm = jnp.log(jnp.asarray(2.0 * math.pi, dtype) * var)
    log_k = jnp.asarray(math.log(centres.shape[-2]), dtype)
    return jax.nn.logsumexp(-sq / (2 * var), axis=-1) - log_k - log_norm


def checkerboard(
    key: jax.Array,
    num: int,
    *,
    num_squares: int = 4,
    dtype: DTypeLike = jnp.float32,
) -> jax.Array:
    r"""Sample uniformly from the dark squares of a checkerboard on $[-2, 2]^2$.

    The square is cut into ``num_squares x num_squares`` cells of side $4/n$; cell $(i, j)$
    (column $i$ from the left, row $j$ from the bottom) is dark when $i + j$ is even, so the
    bottom-left cell is dark. All dark cells have the same area, so a sample picks one uniformly
    and then a uniform point inside it. :func:`checkerboard_mask` tests membership.

    Args:
        key: PRNG key.
        num: number of samples, a static int ``>= 1``.
        num_squares: cells per side $n \ge 1$ (static).
        dtype: floating dtype of the samples.

    Returns:
        Samples ``[num, 2]`` of ``dtype``.

    Examples:
        >>> x = checkerboard(jax.random.key(0), 1024)
        >>> bool(checkerboard_mask(x).all())
        True
    """
    num = _check_num(num)
    n = _check_num(num_squares, "num_squares")
    dtype = _check_dtype(dtype)
    work = _compute_dtype(dtype)
    dark = np.array([(i, j) for i in range(n) for j in range(n) if (i + j) % 2 == 0])
    k_cell, k_pos = jr.split(key)
    cell = jr.randint(k_cell, (num,), 0, dark.shape[0])
    corner = jnp.asarray(dark, work)[cell]
    u = jr.uniform(k_pos, (num, 2), work)
    x = (corner + u) * jnp.asarray(2 * _BOARD / n, work) - _BOARD
    # Rounding can push a point by one ulp past +2; keep the support closed.
    return jnp.clip(x, -_BOARD, _BOARD).astype(dtype)


def checkerboard_mask(x: jax.Array, *, num_squares: int = 4) -> jax.Array:
    """Whether points lie on the dark squares of :func:`checkerboard`'s board.

    Args:
        x: points ``[..., 2]``.
        num_squares: cells per side, as in :func:`checkerboard`.

    Returns:
        Boolean ``x.shape[:-1]``: ``True`` inside $[-2, 2]^2$ on a dark cell. Points on a
        boundary between two cells count for the cell above/right of it.
    """
    if x.shape[-1:] != (2,):
        raise ValueError(f"{x.shape=} must end in 2")
    n = _check_num(num_squares, "num_squares")
    inside = jnp.all((x >= -_BOARD) & (x <= _BOARD), axis=-1)
    cell = jnp.clip(jnp.floor((x + _BOARD) * (n / (2 * _BOARD))), 0, n - 1).astype(jnp.int32)
    return inside & ((cell[..., 0] + cell[..., 1]) % 2 == 0)


def two_moons(
    key: jax.Array,
    num: int,
    *,
    noise: float = 0.05,
    dtype: DTypeLike = jnp.float32,
) -> tuple[jax.Array, jax.Array]:
    r"""Sample scikit-learn's two interleaving half circles ("moons").

    Same geometry as ``sklearn.datasets.make_moons``, with angles drawn at random instead of on a
    grid: label 0 is the upper moon $(\cos t, \sin t)$ and label 1 the lower moon
    $(1 - \cos t, \tfrac12 - \sin t)$, $t \sim U[0, \pi]$, plus Gaussian noise of standard
    deviation ``noise``. The two classes have exactly ``num // 2`` and ``num - num // 2``
    points (label 1 gets the extra one), in random order.

    Args:
        key: PRNG key.
        num: number of samples, a static int ``>= 1``.
        noise: standard deviation of the isotropic Gaussian noise.
        dtype: floating dtype of the samples.

    Returns:
        ``(x, labels)``: samples ``[num, 2]`` of ``dtype`` and labels ``[num]`` int32 in
        ``{0, 1}``.

    Examples:
        >>> x, labels = two_moons(jax.random.key(0), 200)
        >>> int(labels.sum())
        100
    """
    num = _check_num(num)
    dtype = _check_dtype(dtype)
    _check_nonnegative("noise", noise)
    work = _compute_dtype(dtype)
    k_label, k_angle, k_noise = jr.split(key, 3)
    labels = jr.permutation(k_label, (jnp.arange(num) >= num // 2).astype(jnp.int32))
    t = jnp.asarray(math.pi, work) * jr.uniform(k_angle, (num,), work)
    upper = jnp.stack([jnp.cos(t), jnp.sin(t)], axis=-1)
    lower = jnp.stack([1 - jnp.cos(t), 0.5 - jnp.sin(t)], axis=-1)
    x = jnp.where((labels == 1)[:, None], lower, upper)
    x = x + jnp.asarray(noise, work) * jr.normal(k_noise, (num, 2), work)
    return x.astype(dtype), labels
