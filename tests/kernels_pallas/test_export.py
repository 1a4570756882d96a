"""Cross-lowering checks without an accelerator: ``jax.export`` of the Pallas kernels for TPU
(Mosaic) and CUDA (Triton), forward and gradient, at T = 8192, head dims 64 and 128, bf16.

Lowering runs the Pallas -> Mosaic / Triton translation on this machine, which rejects what
interpret mode accepts: ops with no Mosaic lowering (``cumsum``, ``rev``), blocks breaking
the TPU (8, 128) rule, non-power-of-two Triton shapes (reference/kernels.md §5.4). The
kernels choose interpreter / Triton / Mosaic when lowered (``lax.platform_dependent`` in
``_compat.pallas_call``), so the jitted function traced here on CPU carries the real kernels.
What can be asserted without compiling for the device: the export succeeds; the module holds
the platform's kernel custom calls (their count and kernel names: forward, ``dq`` and
``dk, dv`` for attention; the GLA backward is the chunkwise XLA implementation by design, so
its gradient adds no kernel); the Triton launch grid of the 2-D kernel matches its tile
schedule; no ``[T, T]`` tensor appears anywhere; the StableHLO bytecode is produced.
Not checked here: device compilation itself (Mosaic's layout passes, Triton's PTX, VMEM or
shared-memory limits).
"""

import re
from collections import Counter

import jax
import jax.numpy as jnp
import pytest
from jax import export

from linjax import kernels_pallas as kp
from linjax.kernels_pallas._local_attention_2d_schedule import TileSchedule, max_visible_d2

T, B, HEADS = 8192, 1, 2
GRID, NUM_GLOBAL, RADIUS = (80, 100), 192, 8  # 192 + 80 * 100 = 8192
TRITON = "__gpu$xla.gpu.triton"
CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": TRITON}


def _local(q, k, v):
    return kp.local_attention(q, k, v, window=256, impl="pallas")


def _local_2d(q, k, v):
    return kp.local_attention_2d(
        q, k, v, grid_shape=GRID, radius=RADIUS, num_global=NUM_GLOBAL, impl="pallas"
    )


def _gla(q, k, v):
    log_gates = jax.nn.log_sigmoid(k.astype(jnp.float32)) / 16
    return kp.gated_linear_attention(q, k, v, log_gates.astype(k.dtype), impl="pallas")[0]


# op -> (function, kernel names in the forward, kernel names added by the gradient)
OPS = {
    "local_attention": (
        _local,
        ["local_attention_fwd"],
        ["local_attention_dq", "local_attention_dkv"],
    ),
    "local_attention_2d": (
        _local_2d,
        ["local_attention_2d_fwd"],
        ["local_attention_2d_dq", "local_attention_2d_dkv"],
    ),
    "gated_linear_attention": (_gla, ["gated_linear_attention_fwd"], []),
}


def _export(fn, platform, head_dim):
    x = jax.ShapeDtypeStruct((B, T, HEADS, head_dim), jnp.bfloat16)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON)] if platform == "cuda" else []
    return export.export(jax.jit(fn), platforms=[platform], disabled_checks=checks)(x, x, x)


def _custom_calls(module: str) -> Counter:
    return Counter(re.findall(r"custom_call @([\w$.]+)\(", module))


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("op", list(OPS))
def test_export_forward_and_gradient(op, platform):
    fn, fwd_kernels, bwd_kernels = OPS[op]

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)

    value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
    for head_dim in (64, 128):
        fwd = _export(fn, platform, head_dim)
        both = _export(value_and_grad, platform, head_dim)
        for exported, kernels in ((fwd, fwd_kernels), (both, fwd_kernels + bwd_kernels)):
            assert exported.platforms == (platform,)
            module = exported.mlir_module()
            assert _custom_calls(module) == Counter({CUSTOM_CALL[platform]: len(kernels)}), op
            for name in kernels:
                assert name in module, (op, platform, name)
            assert f"{T}x{T}" not in module  # nothing quadratic in the sequence length
            assert len(exported.mlir_module_serialized) > 0  # portable StableHLO bytecode
        assert fwd.out_avals[0].shape == (B, T, HEADS, head_dim)
        assert fwd.out_avals[0].dtype == jnp.bfloat16
        assert [a.dtype for a in both.out_avals] == [jnp.float32] + [jnp.bfloat16] * 3


def test_triton_grid_of_the_2d_kernel_follows_its_tile_schedule():
    """Launch grid (batch * heads, prefix blocks + image tiles) of the 8 x 16 tiles."""
    module = _export(_local_2d, "cuda", 64).mlir_module()
    sched = TileSchedule(*GRID, NUM_GLOBAL, max_visible_d2(RADIUS), 8, 16)
    assert sched.num_blocks == 2 + 10 * 7
    grids = set(re.findall(r"grid_x = (\d+) : i32, grid_y = (\d+) : i32", module))
    assert grids == {(str(B * HEADS), str(sched.num_blocks))}


def test_cuda_export_needs_the_triton_custom_call_check_disabled():
    """Triton kernels are custom calls without a compatibility guarantee: export refuses them
    unless the check is disabled explicitly (as above), which a user must opt into too."""
    x = jax.ShapeDtypeStruct((B, 256, HEADS, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match=re.escape(TRITON)):
        export.export(jax.jit(_local), platforms=["cuda"])(x, x, x)


def test_the_check_has_teeth():
    """A kernel that interpret mode runs but Mosaic cannot lower (in-kernel ``cumsum``) fails
    the TPU export, and a non-power-of-two block fails the Triton one."""
    from jax.experimental import pallas as pl

    from linjax.kernels_pallas import _compat

    def cumsum_kernel(x_ref, o_ref):
        o_ref[...] = jnp.cumsum(x_ref[...], axis=0)

    def call(x, rows):
        spec = pl.BlockSpec((rows, 128), lambda i: (i, 0))
        out = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return _compat.pallas_call(
            cumsum_kernel,
            grid=(x.shape[0] // rows,),
            in_specs=[spec],
            out_specs=spec,
            out_shape=out,
        )(x)

    x = jnp.arange(48 * 128, dtype=jnp.float32).reshape(48, 128)
    interpreted = jax.jit(lambda x: call(x, 16))(x)  # runs on CPU
    assert jnp.array_equal(interpreted[:16], jnp.cumsum(x[:16], axis=0))
    spec = jax.ShapeDtypeStruct(x.shape, x.dtype)
    with pytest.raises(Exception, match="cumsum"):
        export.export(jax.jit(lambda x: call(x, 16)), platforms=["tpu"])(spec)
    checks = [export.DisabledSafetyCheck.custom_call(TRITON)]
    with pytest.raises(Exception, match="power of 2|power-of-2|power of two"):
        export.export(jax.jit(lambda x: call(x, 24)), platforms=["cuda"], disabled_checks=checks)(
            spec
        )
