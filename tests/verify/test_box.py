"""Box: construction from an eps-ball, helpers and validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import verify as vf


def test_from_eps_scalar_and_per_coordinate():
    x = jnp.array([[0.0, 1.0], [2.0, -1.0]])
    box = vf.Box.from_eps(x, 0.5)
    np.testing.assert_allclose(box.lower, x - 0.5)
    np.testing.assert_allclose(box.upper, x + 0.5)
    box = vf.Box.from_eps(x, jnp.array([0.1, 0.2]))
    np.testing.assert_allclose(box.radius, jnp.broadcast_to(jnp.array([0.1, 0.2]), x.shape))
    np.testing.assert_allclose(box.center, x)
    assert box.lower.dtype == x.dtype


def test_from_eps_validates():
    with pytest.raises(ValueError, match="eps must be >= 0"):
        vf.Box.from_eps(jnp.zeros(3), -0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        vf.Box.from_eps(jnp.zeros(3), jnp.nan)
    with pytest.raises(ValueError, match="broadcast"):
        vf.Box.from_eps(jnp.zeros(3), jnp.ones(4))
    with pytest.raises(ValueError, match="broadcast"):
        vf.Box.from_eps(jnp.zeros(3), jnp.ones((2, 3)))
    with pytest.raises(TypeError, match="floating"):
        vf.Box.from_eps(jnp.zeros(3, jnp.int32), 1)


def test_box_is_a_pytree_under_jit_and_vmap():
    xs = jnp.arange(6.0).reshape(3, 2)
    boxes = jax.vmap(lambda x: vf.Box.from_eps(x, 0.25))(xs)
    assert isinstance(boxes, vf.Box) and boxes.lower.shape == (3, 2)
    widths = jax.jit(lambda b: b.upper - b.lower)(boxes)
    np.testing.assert_allclose(widths, 0.5)
    # Under tracing eps cannot be checked, but the box is still built.
    out = jax.jit(lambda x, e: vf.Box.from_eps(x, e))(xs[0], 0.1)
    np.testing.assert_allclose(out.upper - out.lower, 0.2)


def test_nan_box_is_rejected():
    with pytest.raises(ValueError, match=r"lower <= upper.*index \(1,\)"):
        vf.ibp(jnp.tanh, vf.Box(jnp.zeros(2), jnp.array([1.0, jnp.nan])))
