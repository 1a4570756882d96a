"""kp.layers: shapes, hand-computed float64 oracles, decode == prefill, linearize, grads, errors."""

import functools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from flax import nnx

from linjax import kernels_pallas as kp
from linjax.kernels_pallas import layers

B, T, C = 2, 23, 16  # T is not a multiple of the GLA chunk or of the windows used


# Eager op-by-op dispatch compiles every primitive separately; jitting whole calls is far cheaper.
@nnx.jit
def fwd(m, x):
    return m(x)


@functools.partial(nnx.jit, static_argnames="max_len")
def prefill(m, x, cache=None, *, max_len=None):
    if max_len is not None:
        return m.prefill(x, max_len)
    return m.prefill(x) if cache is None else m.prefill(x, cache)


@nnx.jit
def decode_step(m, x_t, cache):
    return m.decode_step(x_t, cache)


def randomize(module, key, scale=0.4):
    """Every parameter (biases and norm scales included) random, so that none is trivially 0/1."""
    params = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jr.split(key, len(leaves))
    new = [
        scale * jr.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves, strict=True)
    ]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


def params_np(module, name):
    layer = getattr(module, name)
    kernel = np.asarray(layer.kernel.get_value(), np.float64)
    bias = getattr(layer, "bias", None)
    bias = None if bias is None else np.asarray(bias.get_value(), np.float64)
    return kernel, bias


def proj_np(module, name, x):
    kernel, bias = params_np(module, name)
    if name == "out":
        y = np.einsum("bthd,hdo->bto", x, kernel)
    else:
        y = np.einsum("btc,c...->bt...", x, kernel)
    return y if bias is None else y + bias


def rope_np(x, theta):
    if theta is None:
        return x
    half = x.shape[-1] // 2
    freqs = theta ** (-np.arange(half) / half)
    ang = np.arange(x.shape[1])[:, None] * freqs
    cos, sin = np.cos(ang)[:, None], np.sin(ang)[:, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def softmax_np(s, axis=-1):
    s = s - s.max(axis, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis, keepdims=True)


def masked_attention_np(q, k, v, visible, scale):
    """Dense softmax attention, kv heads shared by consecutive query heads."""
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    s = np.einsum("bthd,bshd->bhts", q, k) * scale
    s = np.where(visible, s, -np.inf)
    return np.einsum("bhts,bshd->bthd", softmax_np(s), v)


def gla_np(q, k, v, g, scale):
    """The GLA recurrence token by token: S = diag(e^g) S + k^T v, o = s q S."""
    b, t, h, kd = q.shape
    state = np.zeros((b, h, kd, v.shape[-1]))
    out = []
    for i in range(t):
        state = np.exp(g[:, i])[..., None] * state + k[:, i, ..., None] * v[:, i, :, None, :]
        out.append(scale * np.einsum("bhk,bhkv->bhv", q[:, i], state))
    return np.stack(out, 1)


def log_sigmoid_np(x):
    return -np.logaddexp(0.0, -x)


def liger_np(m, x, num_keys):
    """Liger attention from the layer's weights, by hand in float64."""
    x = np.asarray(x, np.float64)
    q, k, v = (proj_np(m, n, x) for n in ("query", "key", "value"))
    t = x.shape[1]
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    visible = (i - j >= 0) & (i - j < num_keys)
    qr, kr = rope_np(q, m.rope_theta), rope_np(k, m.rope_theta)
    swa = masked_attention_np(qr, kr, v, visible, q.shape[-1] ** -0.5)
    grp = m.num_heads // m.num_kv_heads
    rep = lambda a: np.repeat(a, grp, axis=2)
    g = log_sigmoid_np(k) / 16.0
    gla = gla_np(softmax_np(q), rep(softmax_np(k)), rep(v), rep(g), 1.0)
    return proj_np(m, "out", 0.5 * swa + 0.5 * gla)


def gla_layer_np(m, x):
    x = np.asarray(x, np.float64)
    q, k, v = (proj_np(m, n, x) for n in ("q_proj", "k_proj", "v_proj"))
    low = np.einsum("btc,cr->btr", x, params_np(m, "gate_down")[0])
    up, up_bias = params_np(m, "gate_up")
    g = log_sigmoid_np(np.einsum("btr,rhk->bthk", low, up) + up_bias) / 16.0
    o = gla_np(q, k, v, g, q.shape[-1] ** -0.5)
    scale = np.asarray(m.norm.scale.get_value(), np.float64)
    o = o / np.sqrt(np.mean(o**2, -1, keepdims=True) + 1e-6) * scale
    o = o * (lambda z: z / (1 + np.exp(-z)))(proj_np(m, "g_proj", x))
    return proj_np(m, "out", o)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def make_x(key, t=T, dtype=jnp.float32):
    return jr.normal(key, (B, t, C), dtype)


def decode_all(m, x, t0, **prefill_kw):
    """Prefill ``x[:, :t0]`` (or start from an empty cache if t0 == 0), then decode the rest."""
    if t0:
        y0, cache = prefill(m, x[:, :t0], **prefill_kw)
        ys = [y0]
    else:
        cache, ys = m.init_cache(x.shape[0], **prefill_kw), []
    for t in range(t0, x.shape[1]):
        y_t, cache = decode_step(m, x[:, t], cache)
        ys.append(y_t[:, None])
    return jnp.concatenate(ys, 1), cache


# --- shapes ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda r: layers.SoftmaxAttention(4, C, num_kv_heads=2, out_features=12, rngs=r),
        lambda r: layers.GatedLinearAttention(2, C, out_features=12, rngs=r),
        lambda r: layers.LigerAttention(4, C, num_kv_heads=2, out_features=12, window=5, rngs=r),
    ],
)
def test_shapes(make, getkey):
    m = make(nnx.Rngs(0))
    x = make_x(getkey())
    assert fwd(m, x).shape == (B, T, 12)
    kw = {"max_len": T + 1} if isinstance(m, layers.SoftmaxAttention) else {}
    y, cache = prefill(m, x, **kw)
    assert y.shape == (B, T, 12)
    y_t, cache = decode_step(m, x[:, 0], cache)
    assert y_t.shape == (B, 12) and int(cache.index) == T + 1


# --- softmax attention ------------------------------------------------------------------------


def test_softmax_attention_matches_flax_multihead_attention(getkey):
    mha = randomize(nnx.MultiHeadAttention(4, C, num_kv_heads=2, rngs=nnx.Rngs(0)), getkey())
    ours = layers.SoftmaxAttention(4, C, num_kv_heads=2, rngs=nnx.Rngs(1))
    for name in ("query", "key", "value", "out"):
        nnx.update(getattr(ours, name), nnx.state(getattr(mha, name), nnx.Param))
    x = make_x(getkey())
    mask = nnx.make_causal_mask(jnp.ones((B, T)))
    expected = nnx.jit(lambda m, x: m(x, mask=mask, decode=False))(mha, x)
    assert rel_err(fwd(ours, x), expected) < 1e-5


@pytest.mark.parametrize("t0", [0, 9])
def test_softmax_attention_decode_equals_prefill(t0, getkey):
    m = randomize(
        layers.SoftmaxAttention(4, C, num_kv_heads=2, rope_theta=50.0, rngs=nnx.Rngs(0)),
        getkey(),
    )
    x = make_x(getkey())
    y, cache = decode_all(m, x, t0, max_len=T + 3)
    assert rel_err(y, fwd(m, x)) < 1e-5
    assert int(cache.index) == T and cache.key.shape == (B, 2, T + 3, C // 4)


# --- gated linear attention -------------------------------------------------------------------


def test_gla_layer_matches_hand_computation(getkey):
    m = randomize(layers.GatedLinearAttention(2, C, rngs=nnx.Rngs(0)), getkey())
    x = make_x(getkey())
    assert rel_err(fwd(m, x), gla_layer_np(m, x)) < 1e-5


@pytest.mark.parametrize("t0", [0, 1, 17])
def test_gla_layer_prefill_equals_step_by_step_decode(t0, getkey):
    m = randomize(layers.GatedLinearAttention(2, C, chunk_size=16, rngs=nnx.Rngs(0)), getkey())
    x = make_x(getkey())
    y_full, cache_full = prefill(m, x)
    y, cache = decode_all(m, x, t0)
    assert rel_err(y, y_full) < 1e-5
    assert rel_err(cache.state, cache_full.state) < 1e-5
    # two chained prefills == one
    y1, c1 = prefill(m, x[:, : t0 + 3])
    y2, c2 = prefill(m, x[:, t0 + 3 :], c1)
    assert rel_err(jnp.concatenate([y1, y2], 1), y_full) < 1e-5
    assert int(c2.index) == T


# --- Liger attention --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rope_theta, kv_heads, window, compat",
    [(None, 4, 5, False), (100.0, 2, 5, False), (100.0, 2, 5, True), (None, 1, 1, False)],
)
def test_liger_equals_half_swa_plus_half_gla_by_hand(rope_theta, kv_heads, window, compat, getkey):
    m = layers.LigerAttention(
        4,
        C,
        num_kv_heads=kv_heads,
        rope_theta=rope_theta,
        window=window,
        liger_compatible_window=compat,
        chunk_size=16,
        rngs=nnx.Rngs(0),
    )
    randomize(m, getkey())
    assert m.num_window_keys == window + compat
    x = make_x(getkey())
    y = fwd(m, x)
    assert rel_err(y, liger_np(m, x, window + compat)) < 1e-5
    # the convention is pinned: the oracle with one key more or less disagrees
    assert rel_err(y, liger_np(m, x, window + compat + 1)) > 1e-3
    if window + compat > 1:
        assert rel_err(y, liger_np(m, x, window + compat - 1)) > 1e-3


@pytest.mark.parametrize("t0, compat", [(0, False), (3, True), (15, False)])
def test_liger_decode_equals_prefill(t0, compat, getkey):
    # window 6 (7 keys with compat) < T: the ring buffer wraps several times; t0 = 3 < window
    # leaves empty slots
    m = layers.LigerAttention(
        4,
        C,
        num_kv_heads=2,
        rope_theta=100.0,
        window=6,
        liger_compatible_window=compat,
        chunk_size=16,
        rngs=nnx.Rngs(0),
    )
    assert m.num_window_keys == 6 + compat
    randomize(m, getkey())
    x = make_x(getkey())
    y_full, cache_full = prefill(m, x)
    y, cache = decode_all(m, x, t0)
    assert rel_err(y, y_full) < 1e-5
    assert rel_err(cache.state, cache_full.state) < 1e-5
    np.testing.assert_allclose(cache.key, cache_full.key, atol=1e-6)
    np.testing.assert_allclose(cache.value, cache_full.value, atol=1e-6)


# --- linearize --------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["softmax", "flax"])
def test_linearize_reuses_weights(source, getkey):
    if source == "softmax":
        attn = layers.SoftmaxAttention(4, C, num_kv_heads=2, rope_theta=100.0, rngs=nnx.Rngs(0))
        apply = lambda x: fwd(attn, x)
    else:
        attn = nnx.MultiHeadAttention(4, C, num_kv_heads=2, decode=False, rngs=nnx.Rngs(0))
        mask = nnx.make_causal_mask(jnp.ones((B, T)))
        apply = lambda x: nnx.jit(lambda m, x: m(x, mask=mask))(attn, x)
    randomize(attn, getkey())
    liger = layers.linearize(attn, window=7, liger_compatible_window=True)
    assert isinstance(liger, layers.LigerAttention)
    assert liger.num_window_keys == 8 and liger.num_kv_heads == 2
    assert liger.rope_theta == (100.0 if source == "softmax" else None)
    src, new = nnx.state(attn, nnx.Param), nnx.state(liger, nnx.Param)
    src_leaves, new_leaves = jax.tree.leaves(src), jax.tree.leaves(new)
    assert len(src_leaves) == len(new_leaves) == 8  # 4 kernels + 4 biases, nothing new
    assert jax.tree.structure(src) == jax.tree.structure(new)
    for a, b in zip(src_leaves, new_leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    x = make_x(getkey())
    y_soft, y_lin = apply(x), fwd(liger, x)
    assert np.all(np.isfinite(y_lin))
    assert rel_err(y_lin, y_soft) > 1e-2
    # the modules do not share Variables: training one leaves the other alone
    liger.query.kernel.set_value(jnp.zeros_like(liger.query.kernel.get_value()))
    np.testing.assert_array_equal(apply(x), y_soft)


# --- jit and grad -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda r: layers.SoftmaxAttention(2, C, rope_theta=10.0, param_dtype=jnp.float64, rngs=r),
        lambda r: layers.GatedLinearAttention(2, C, chunk_size=8, param_dtype=jnp.float64, rngs=r),
        lambda r: layers.LigerAttention(
            2, C, window=4, chunk_size=8, param_dtype=jnp.float64, rngs=r
        ),
    ],
)
def test_jit_and_grad_match_finite_differences(make, getkey):
    m = randomize(make(nnx.Rngs(0)), getkey())
    x = make_x(getkey(), t=13, dtype=jnp.float64)
    ct = jr.normal(getkey(), (B, 13, C), jnp.float64)
    graphdef, params = nnx.split(m, nnx.Param)

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(x) * ct)

    grads = jax.jit(jax.grad(loss))(params)
    loss = jax.jit(loss)
    direction = jax.tree.map(lambda p: jr.normal(getkey(), p.shape, p.dtype), params)
    eps = 1e-5
    shifted = lambda s: loss(jax.tree.map(lambda p, d: p + s * eps * d, params, direction))
    fd = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    ad = sum(
        jnp.vdot(g, d)
        for g, d in zip(jax.tree.leaves(grads), jax.tree.leaves(direction), strict=True)
    )
    np.testing.assert_allclose(ad, fd, rtol=1e-6)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


# --- CLEAR 2-D local attention ----------------------------------------------------------------


def clear_np(m, x, grid_shape, radius, num_global):
    """Dense softmax attention under CLEAR's mask, by hand in float64 from the layer's weights."""
    x = np.asarray(x, np.float64)
    q, k, v = (proj_np(m, n, x) for n in ("query", "key", "value"))
    h, w = grid_shape
    y, xx = np.divmod(np.arange(h * w), w)
    visible = np.ones((x.shape[1],) * 2, bool)
    d2 = (y[:, None] - y[None]) ** 2 + (xx[:, None] - xx[None]) ** 2
    visible[num_global:, num_global:] = d2 < radius**2
    return proj_np(m, "out", masked_attention_np(q, k, v, visible, q.shape[-1] ** -0.5))


@pytest.mark.parametrize(
    "grid_shape, radius, num_global, kv_heads",
    [((7, 5), 2, 3, 2), ((6, 9), 3.5, 0, 4), ((4, 3), 10, 2, 1)],  # last: r > diagonal
)
def test_local_attention_2d_matches_dense_masked_oracle(
    grid_shape, radius, num_global, kv_heads, getkey
):
    m = layers.LocalAttention2D(4, C, radius=radius, num_kv_heads=kv_heads, rngs=nnx.Rngs(0))
    randomize(m, getkey())
    t = num_global + grid_shape[0] * grid_shape[1]
    x = make_x(getkey(), t=t)
    call = nnx.jit(lambda m, x: m(x, grid_shape=grid_shape, num_global=num_global))
    y = call(m, x)
    assert y.shape == (B, t, C)
    assert rel_err(y, clear_np(m, x, grid_shape, radius, num_global)) < 1e-5
    if radius == 2:  # strict: the pairs at distance exactly 2 must be excluded
        assert rel_err(y, clear_np(m, x, grid_shape, 2.01, num_global)) > 1e-3


def test_local_attention_2d_from_attention_and_grad(getkey):
    mha = randomize(nnx.MultiHeadAttention(2, C, rngs=nnx.Rngs(0)), getkey())
    m = layers.LocalAttention2D.from_attention(mha, radius=2)
    for a, b in zip(
        jax.tree.leaves(nnx.state(mha, nnx.Param)),
        jax.tree.leaves(nnx.state(m, nnx.Param)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    x = make_x(getkey(), t=1 + 4 * 4)
    graphdef, params = nnx.split(m, nnx.Param)
    loss = lambda p: jnp.sum(nnx.merge(graphdef, p)(x, grid_shape=(4, 4), num_global=1) ** 2)
    grads = jax.jit(jax.grad(loss))(params)
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="rotary"):
        layers.LocalAttention2D.from_attention(
            layers.SoftmaxAttention(2, C, rope_theta=10.0, rngs=nnx.Rngs(0)), radius=2
        )


# --- errors -----------------------------------------------------------------------------------


def test_bad_inputs():
    r = nnx.Rngs(0)
    soft = layers.SoftmaxAttention(2, C, rngs=r)
    gla = layers.GatedLinearAttention(2, C, rngs=r)
    liger = layers.LigerAttention(2, C, window=4, rngs=r)
    with pytest.raises(ValueError, match=r"\[batch, seq, in_features=16\]"):
        liger(jnp.ones((T, C)))
    with pytest.raises(ValueError, match="in_features=16"):
        gla(jnp.ones((B, T, C + 1)))
    with pytest.raises(TypeError, match="floating"):
        soft(jnp.ones((B, T, C), jnp.int32))
    with pytest.raises(ValueError, match="one token"):
        liger.decode_step(jnp.ones((B, 2, C)), liger.init_cache(B))
    with pytest.raises(TypeError, match="LigerCache"):
        liger.decode_step(jnp.ones((B, C)), gla.init_cache(B))
    with pytest.raises(ValueError, match="batch size"):
        gla.decode_step(jnp.ones((B + 1, C)), gla.init_cache(B))
    with pytest.raises(ValueError, match="ring buffer holds 4 keys"):
        layers.LigerAttention(2, C, window=5, rngs=r).decode_step(
            jnp.ones((B, C)), liger.init_cache(B)
        )
    with pytest.raises(ValueError, match="max_len=3 is shorter"):
        soft.prefill(jnp.ones((B, 5, C)), max_len=3)
    _, full = soft.prefill(jnp.ones((B, 3, C)), max_len=3)
    with pytest.raises(ValueError, match="cache is full"):
        soft.decode_step(jnp.ones((B, C)), full)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        layers.SoftmaxAttention(4, C, num_kv_heads=3, rngs=r)
    with pytest.raises(ValueError, match="window"):
        layers.LigerAttention(2, C, window=0, rngs=r)
    with pytest.raises(ValueError, match="even head_dim"):
        layers.LigerAttention(2, C, head_dim=5, rope_theta=10.0, rngs=r)
    with pytest.raises(ValueError, match="not divisible"):
        layers.SoftmaxAttention(3, C, rngs=r)
    with pytest.raises(ValueError, match="power of two"):
        layers.GatedLinearAttention(2, C, chunk_size=24, rngs=r)
    with pytest.raises(ValueError, match="impl"):
        layers.LigerAttention(2, C, impl="cuda", rngs=r)
    with pytest.raises(ValueError, match="gate_logit_normalizer"):
        layers.GatedLinearAttention(2, C, gate_logit_normalizer=0.0, rngs=r)
    with pytest.raises(TypeError, match="linearize takes"):
        layers.linearize(nnx.Linear(C, C, rngs=r))
    with pytest.raises(ValueError, match="normalize_qk"):
        layers.linearize(nnx.MultiHeadAttention(2, C, normalize_qk=True, rngs=r))
    with pytest.raises(ValueError, match="self-attention"):
        layers.linearize(nnx.MultiHeadAttention(2, C, in_kv_features=8, rngs=r))
    clear = layers.LocalAttention2D(2, C, radius=2, rngs=r)
    with pytest.raises(ValueError, match="num_global \\+ height \\* width"):
        clear(jnp.ones((B, 12, C)), grid_shape=(3, 3), num_global=2)
    with pytest.raises(ValueError, match="radius"):
        layers.LocalAttention2D(2, C, radius=0, rngs=r)
    with pytest.raises(TypeError, match="radius"):
        layers.LocalAttention2D(2, C, radius="8", rngs=r)


def test_layers_reachable_from_package():
    assert kp.layers is layers
