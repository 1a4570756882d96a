"""The attention ops on inputs sharded over 4 host devices (batch or heads) give the unsharded
results, forward and gradient, and keep the sharding (run by .ci/run with
XLA_FLAGS=--xla_force_host_platform_device_count=4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from linjax import kernels_pallas as kp
from linjax.kernels_pallas import _sequential

pytestmark = pytest.mark.multidevice

B, T, H, D = 4, 72, 4, 16  # T = 72: several sequential groups below, the last one padded


OPS = {
    "local_attention": lambda q, k, v, g: kp.local_attention(q, k, v, window=20, block_size=8),
    "local_attention_2d": lambda q, k, v, g: kp.local_attention_2d(
        q, k, v, grid_shape=(8, 9), radius=3, tile_shape=(4, 4)
    ),
    "gated_linear_attention": lambda q, k, v, g: kp.gated_linear_attention(
        q, k, v, g, chunk_size=16
    )[0],
}


@pytest.mark.parametrize("axis", ["batch", "heads"])
@pytest.mark.parametrize("op", sorted(OPS))
def test_sharded_inputs_match_unsharded(op, axis, mesh, getkey, monkeypatch):
    monkeypatch.setattr(_sequential, "STEP_ELEMENTS", 4096)  # several groups per call
    keys = jax.random.split(getkey(), 5)
    q, k, v = (jax.random.normal(kx, (B, T, H, D), jnp.float32) for kx in keys[:3])
    g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (B, T, H, D), jnp.float32))
    ct = jax.random.normal(keys[4], (B, T, H, D), jnp.float32)
    fn = OPS[op]

    def run(q, k, v, g):
        o, vjp = jax.vjp(fn, q, k, v, g)
        return o, vjp(ct)

    spec = P("x") if axis == "batch" else P(None, None, "x")
    sharded = [jax.device_put(x, NamedSharding(mesh, spec)) for x in (q, k, v, g)]
    o, grads = jax.jit(run)(*sharded)
    o_ref, grads_ref = jax.jit(run)(q, k, v, g)
    assert o.sharding.is_equivalent_to(NamedSharding(mesh, spec), o.ndim)
    np.testing.assert_allclose(o, o_ref, rtol=1e-5, atol=1e-5)
    for x, ref in zip(grads, grads_ref, strict=True):
        np.testing.assert_allclose(x, ref, rtol=1e-5, atol=1e-5)
