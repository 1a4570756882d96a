"""The M-FAC window sharded along d over 4 host devices gives the unsharded results and
checkpoints through orbax (run by .ci/run with
XLA_FLAGS=--xla_force_host_platform_device_count=4 pytest -m multidevice)."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from linjax import _tree
from linjax import curvature as cv

pytestmark = pytest.mark.multidevice


def _like():
    return {"w": jnp.zeros((16, 8)), "b": jnp.zeros(8)}  # d = 136, divisible by 4


def _state(key, m=6, pushes=9):
    state = cv.mfac_init(_like(), m, 1e-3)
    for k in jax.random.split(key, pushes):
        state = cv.mfac_update(state, _tree.tree_random_like(k, _like()))
    return state


def _shard_window(state, mesh):
    """The [m, d] window split along d; the m x m algebra and the template replicated."""
    rep = NamedSharding(mesh, P())
    state = jax.tree.map(lambda a: jax.device_put(a, rep), state)
    return state._replace(grads=jax.device_put(state.grads, NamedSharding(mesh, P(None, "x"))))


def _assert_close(actual, expected):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        if jnp.issubdtype(a.dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-10, atol=1e-12)
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_sharded_window_matches_unsharded(mesh, getkey):
    state = _state(getkey())
    g = _tree.tree_random_like(getkey(), _like())
    V = jax.tree.map(lambda a: jnp.stack([a, 2 * a + 1]), g)
    opt = cv.mfac(6, 1e-3)

    def run(state, g, V):
        return (
            cv.mfac_ihvp(state, g),
            cv.mfac_ihvp(state, V, refine=1),
            cv.mfac_update(state, g),
            opt.update(g, state),
            cv.mfac_inverse_diagonal(state),
            cv.obs_prune(g, state, 0.5),
        )

    plain = jax.jit(run)(state, g, V)
    sharded_state = _shard_window(state, mesh)
    sharded = jax.jit(run)(sharded_state, g, V)
    _assert_close(sharded, plain)
    # The updated window stays distributed along d.
    new_state = sharded[2]
    assert not new_state.grads.sharding.is_fully_replicated
    assert new_state.grads.sharding.spec == P(None, "x")


def test_sharded_state_checkpoints_through_orbax(mesh, getkey, tmp_path):
    state = _shard_window(_state(getkey()), mesh)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "mfac", state)
    ckptr.wait_until_finished()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    restored = ckptr.restore(tmp_path / "mfac", abstract)
    assert isinstance(restored, cv.MFACState)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
