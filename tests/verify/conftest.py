"""Shared helpers for the verify tests: sampling a box and checking soundness."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

SLACK = 1e-9


def box_points(key, box, num=10_000, max_vertices=1024):
    """``num`` uniform points of the box, plus its vertices (all, or a random subset)."""
    lo, hi = np.asarray(box.lower), np.asarray(box.upper)
    pts = jax.random.uniform(key, (num,) + lo.shape, lo.dtype, minval=lo, maxval=hi)
    d = lo.size
    if 2**d <= max_vertices:
        bits = np.array(list(itertools.product([0, 1], repeat=d)), dtype=bool)
    else:
        bits = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 1), 0.5, (max_vertices, d)))
    verts = np.where(bits, hi.reshape(-1), lo.reshape(-1)).reshape((-1,) + lo.shape)
    return jnp.concatenate([pts, jnp.asarray(verts, lo.dtype)])


def assert_inside(values, lower, upper, what=""):
    values, lower, upper = (np.asarray(v) for v in (values, lower, upper))
    below = lower - values
    above = values - upper
    worst = max(below.max(), above.max())
    assert worst <= SLACK * (1 + np.abs(values).max()), f"{what}: bound violated by {worst:.3e}"


@pytest.fixture
def check_sound():
    """``check(fn, box, out, key, spec=None)``: sampled outputs lie inside ``out``."""

    def check(fn, box, out, key, spec=None, num=10_000):
        xs = box_points(key, box, num)
        ys = jax.vmap(fn)(xs).reshape(xs.shape[0], -1)
        if spec is not None:
            ys = ys @ jnp.asarray(spec).reshape(spec.shape[0], -1).T
        lower = np.asarray(out.lower).reshape(-1)
        upper = np.asarray(out.upper).reshape(-1)
        assert np.all(lower <= upper + SLACK), "lower > upper"
        assert_inside(ys, lower[None], upper[None], "sampled outputs")
        return xs, ys

    return check
