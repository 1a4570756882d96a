import jax
import jax.numpy as jnp
import numpy as np
import pytest

from linjax import lintools as lt
from linjax import testing as lxt


def test_combinators_match_dense_algebra(getkey):
    A = jax.random.normal(getkey(), (7, 7))
    B = jax.random.normal(getkey(), (7, 7))
    v = jax.random.normal(getkey(), (7,))
    a, b = lt.dense(A), lt.dense(B)
    np.testing.assert_allclose(lt.add(a, b)(v), (A + B) @ v, rtol=1e-12)
    np.testing.assert_allclose(lt.scale(a, 2.5)(v), 2.5 * A @ v, rtol=1e-12)
    np.testing.assert_allclose(lt.compose(a, b)(v), A @ (B @ v), rtol=1e-12)
    np.testing.assert_allclose(lt.damped(a, 0.3)(v), (A + 0.3 * jnp.eye(7)) @ v, rtol=1e-12)
    dense = lxt.materialize(lt.compose(lt.damped(a, 1.0), lt.add(a, b)), jnp.zeros(7))
    np.testing.assert_allclose(dense, (A + jnp.eye(7)) @ (A + B), rtol=1e-12)


def test_combinators_forward_params_and_differentiate(getkey):
    mv = lambda v, M: M @ v
    M = jax.random.normal(getkey(), (4, 4))
    v = jax.random.normal(getkey(), (4,))
    op = lt.damped(lt.compose(mv, mv), 0.5)
    np.testing.assert_allclose(op(v, M), M @ (M @ v) + 0.5 * v, rtol=1e-12)
    g = jax.grad(lambda M: jnp.sum(op(v, M)))(M)
    g_ref = jax.grad(lambda M: jnp.sum(M @ (M @ v) + 0.5 * v))(M)
    np.testing.assert_allclose(g, g_ref, rtol=1e-12)


def test_dense_on_pytrees_and_materialize_roundtrip(getkey):
    like = {"x": jnp.zeros((2, 3)), "y": jnp.zeros(4)}
    A = jax.random.normal(getkey(), (10, 10))
    np.testing.assert_allclose(lxt.materialize(lt.dense(A, like), like), A, rtol=1e-12)


def test_bad_operators():
    with pytest.raises(ValueError, match="square"):
        lt.dense(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="scalars"):
        lt.dense(jnp.eye(3), {"a": jnp.zeros(4)})
    with pytest.raises(TypeError, match="matvec"):
        lt.damped(jnp.eye(3), 1.0)
    with pytest.raises(ValueError, match="at least one"):
        lt.add()
