"""local_attention: every implementation against the dense oracle, window edge cases, errors."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from linjax import kernels_pallas as kp
from linjax.kernels_pallas import _compat, _sequential

# rel-RMS tolerances (reference/kernels.md §7): forward, gradients.
TOL = {jnp.float32: (1e-4, 1e-3), jnp.bfloat16: (5e-3, 1e-2)}
B, T, H, HKV, D, DV = 2, 37, 4, 2, 16, 8  # T is not a block multiple; GQA with 2 groups
BLOCK = 16  # Pallas tiles: 3 query blocks, windows below span block boundaries


def rel_rms(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def make_qkv(key, dtype, *, t=T, h=H, hkv=HKV):
    kq, kk, kv = jr.split(key, 3)
    # Drawn in bfloat16 so that the float32 inputs hold the same values.
    q = jr.normal(kq, (B, t, h, D), jnp.bfloat16)
    k = jr.normal(kk, (B, t, hkv, D), jnp.bfloat16)
    v = jr.normal(kv, (B, t, hkv, DV), jnp.bfloat16)
    return tuple(x.astype(dtype) for x in (q, k, v))


def attend(impl, **kw):
    block = BLOCK if impl == "pallas" else None
    return lambda q, k, v: kp.local_attention(q, k, v, impl=impl, block_size=block, **kw)


# bfloat16 runs causally only: the mask code is shared with the float32 cases.
CASES = [
    (impl, dtype, causal)
    for impl in ("xla", "pallas")
    for dtype, causal in ((jnp.float32, True), (jnp.float32, False), (jnp.bfloat16, True))
]


@pytest.mark.parametrize("impl, dtype, causal", CASES)
def test_matches_reference_forward_and_vjp(impl, dtype, causal, getkey):
    q, k, v = make_qkv(getkey(), dtype)
    ct = jr.normal(getkey(), (B, T, H, DV), dtype)
    kw = dict(window=11, causal=causal)

    @jax.jit
    def run(q, k, v, ct):
        o, vjp = jax.vjp(attend(impl, **kw), q, k, v)
        return o, vjp(ct)

    @jax.jit
    def oracle(q, k, v, ct):
        o, vjp = jax.vjp(lambda *a: kp.local_attention_reference(*a, **kw), q, k, v)
        return o, vjp(ct)

    o, grads = run(q, k, v, ct)
    up = lambda x: x.astype(jnp.float64)
    o_ref, grads_ref = oracle(up(q), up(k), up(v), up(ct))
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    fwd_tol, grad_tol = TOL[dtype]
    assert rel_rms(o, o_ref) <= fwd_tol
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert rel_rms(g, g_ref) <= grad_tol, name


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_window_one_is_identity_and_large_window_is_full_attention(impl, getkey):
    q, k, v = make_qkv(getkey(), jnp.float32, h=HKV)
    v = jnp.concatenate([v, v], axis=-1)  # jax.nn.dot_product_attention needs value_dim == D

    @jax.jit
    def run(q, k, v):
        one = [attend(impl, window=1, causal=c)(q, k, v) for c in (True, False)]
        wide = [attend(impl, window=w, causal=c)(q, k, v) for w in (T, T + 5) for c in (1, 0)]
        return one, wide

    one, wide = run(q, k, v)
    for o in one:  # only the query's own key is visible
        np.testing.assert_allclose(o, v, rtol=1e-6, atol=1e-6)
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls
        full = [jax.nn.dot_product_attention(q, k, v, is_causal=c) for c in (True, False)]
    for o, ref in zip(wide, full * 2, strict=True):
        np.testing.assert_allclose(o, ref, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_window_convention_matches_jax_local_window(causal, getkey):
    """``window`` counts keys including self: jax's ``local_window_size=(w - 1, 0 or w - 1)``."""
    q, k, v = make_qkv(getkey(), jnp.float32, h=HKV)
    v = jnp.concatenate([v, v], axis=-1)
    for window in (1, 2, 7):
        right = 0 if causal else window - 1
        with jax.default_matmul_precision("highest"):
            ref = jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, local_window_size=(window - 1, right)
            )
        o = kp.local_attention_reference(q, k, v, window=window, causal=causal)
        np.testing.assert_allclose(o, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_windows_around_the_block_size(impl, getkey):
    """w in {b - 1, b, b + 1}: the first and last key blocks of a window are partial or not."""
    q, k, v = make_qkv(getkey(), jnp.float32, t=3 * BLOCK + 3)
    cases = [(w, c) for w in (BLOCK - 1, BLOCK, BLOCK + 1) for c in (True, False)]

    @jax.jit
    def run(q, k, v):
        outs = [attend(impl, window=w, causal=c)(q, k, v) for w, c in cases]
        refs = [kp.local_attention_reference(q, k, v, window=w, causal=c) for w, c in cases]
        return outs, refs

    for o, ref in zip(*run(q, k, v), strict=True):
        assert rel_rms(o, ref) <= 1e-5


def test_xla_blocks_and_lengths(getkey):
    """Blocked XLA path over block sizes and lengths, including T = 1 and T < block."""
    for t, block in ((1, 8), (70, 16)):
        q, k, v = make_qkv(getkey(), jnp.float32, t=t)

        @jax.jit
        def run(q, k, v, block=block):
            o = kp.local_attention(q, k, v, window=9, impl="xla", block_size=block)
            return o, kp.local_attention_reference(q, k, v, window=9)

        assert rel_rms(*run(q, k, v)) <= 1e-5, (t, block)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("blocks_per_step", [1, 2])
def test_xla_groups_of_blocks_in_sequence(blocks_per_step, causal, getkey, monkeypatch):
    """Query blocks in sequential groups (one or two 8-token blocks per step; T = 37 leaves a
    padded tail): forward and VJP equal the oracle, and the sequence edges see no padding."""
    monkeypatch.setattr(_sequential, "STEP_ELEMENTS", blocks_per_step * B * H * 8 * 8 * 3)
    q, k, v = make_qkv(getkey(), jnp.float32)
    ct = jr.normal(getkey(), (B, T, H, DV), jnp.float32)
    kw = dict(window=11, causal=causal)

    @jax.jit
    def run(q, k, v, ct):
        o, vjp = jax.vjp(lambda *a: kp.local_attention(*a, impl="xla", block_size=8, **kw), q, k, v)
        o_ref, vjp_ref = jax.vjp(lambda *a: kp.local_attention_reference(*a, **kw), q, k, v)
        return (o, *vjp(ct)), (o_ref, *vjp_ref(ct))

    for name, x, ref in zip(["o", "dq", "dk", "dv"], *run(q, k, v, ct), strict=True):
        assert rel_rms(x, ref) <= 1e-5, name


def test_xla_scratch_memory_does_not_grow_with_length():
    """Sequential groups of query blocks: scratch is one group's scores plus the padded
    key/value copies, far below the whole sequence's [T, H, window] scores."""

    def temp_bytes(t):
        x = jnp.zeros((1, t, 2, 16), jnp.float32)
        fn = jax.jit(lambda x: kp.local_attention(x, x, x, window=256, impl="xla"))
        return fn.lower(x).compile().memory_analysis().temp_size_in_bytes

    scores = 32768 * 2 * 256 * 4  # one [T, H, window] float32 score array at T = 32768
    assert temp_bytes(32768) < scores / 4


def test_auto_and_reference_dispatch(getkey):
    q, k, v = make_qkv(getkey(), jnp.float32)
    auto, xla = jax.jit(
        lambda q, k, v: (
            kp.local_attention(q, k, v, window=5),
            kp.local_attention(q, k, v, window=5, impl=_compat.resolve_impl("auto")),
        )
    )(q, k, v)
    np.testing.assert_array_equal(auto, xla)
    ref = kp.local_attention(q, k, v, window=5, impl="reference", scale=0.3)
    np.testing.assert_array_equal(ref, kp.local_attention_reference(q, k, v, window=5, scale=0.3))


def test_bad_inputs_raise_clear_errors():
    x = jnp.zeros((1, 8, 4, 16))
    kv = jnp.zeros((1, 8, 2, 16))
    with pytest.raises(ValueError, match=r"q must have rank 4 .*\(8, 4, 16\)"):
        kp.local_attention(x[0], kv, kv, window=2)
    with pytest.raises(ValueError, match="4 heads, which must be a multiple of the 3 heads"):
        kp.local_attention(x, jnp.zeros((1, 8, 3, 16)), jnp.zeros((1, 8, 3, 16)), window=2)
    with pytest.raises(ValueError, match="q has seq length 8 but k and v have 6"):
        kp.local_attention(x, kv[:, :6], kv[:, :6], window=2)
    with pytest.raises(ValueError, match="k and v must agree"):
        kp.local_attention(x, kv, kv[:, :6], window=2)
    with pytest.raises(ValueError, match="share head_dim"):
        kp.local_attention(x, kv[..., :8], kv, window=2)
    with pytest.raises(ValueError, match="window=0 must be >= 1"):
        kp.local_attention(x, kv, kv, window=0)
    with pytest.raises(TypeError, match="window=2.5 must be a Python int"):
        kp.local_attention(x, kv, kv, window=2.5)
    with pytest.raises(TypeError, match="share one dtype"):
        kp.local_attention(x, kv.astype(jnp.bfloat16), kv, window=2)
    with pytest.raises(ValueError, match="impl='cuda' must be one of"):
        kp.local_attention(x, kv, kv, window=2, impl="cuda")
    with pytest.raises(ValueError, match="block_size=12 must be a multiple of 8"):
        kp.local_attention(x, kv, kv, window=2, block_size=12)
    with pytest.raises(TypeError, match="real floating-point"):
        kp.local_attention(x.astype(jnp.int32), kv, kv, window=2)
