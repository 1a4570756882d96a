"""Patch-mode intermediate passes and the sub-pixel conv transpose against the dense pass.

The dense backward pass (one ``[S, *shape]`` coefficient row per pre-activation element,
convolutions transposed by ``jax.vjp``) is the oracle: the patch pass must give the same
bounds to float64 rounding on every convolutional layout it accepts, fall back to it on
graphs it does not, and the bounds must contain sampled outputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from linjax import verify as vf
from linjax.verify import _crown, _patches
from linjax.verify import _linearize as lz


def _conv(x, w, strides, padding, dn=("NCHW", "OIHW", "NCHW"), **kw):
    return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn, **kw)


# --- strided_conv_transpose vs jax.vjp ------------------------------------------------------
_NCHW, _NHWC = ("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC")
TRANSPOSE_CASES = {
    # name: (lhs shape, rhs shape, strides, padding, dimension numbers)
    "nchw-s2-k4-p1": ((1, 3, 14, 14), (5, 3, 4, 4), (2, 2), ((1, 1), (1, 1)), _NCHW),
    "nhwc-s2-same": ((1, 11, 9, 2), (3, 3, 2, 4), (2, 2), "SAME", _NHWC),
    "asym-strides-k5": ((1, 2, 12, 13), (3, 2, 5, 3), (3, 2), ((2, 0), (1, 2)), _NCHW),
    "k-below-stride": ((1, 2, 12, 9), (4, 2, 2, 2), (3, 3), "VALID", _NCHW),
    "uncovered-tail": ((1, 1, 10, 10), (2, 1, 3, 3), (4, 4), ((0, 0), (1, 0)), _NCHW),
}


@pytest.mark.parametrize("case", TRANSPOSE_CASES)
def test_strided_conv_transpose_matches_vjp(case):
    lhs_shape, rhs_shape, strides, padding, dn = TRANSPOSE_CASES[case]
    kx, kw, kc = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, lhs_shape)
    w = jax.random.normal(kw, rhs_shape)

    def f(x):
        return _conv(x, w, strides, padding, dn)

    (eqn,) = jax.make_jaxpr(f)(x).eqns
    out, vjp = jax.vjp(f, x)
    transpose = lz.strided_conv_transpose(eqn.params, w, lhs_shape, out.shape)
    assert transpose is not None
    cts = jax.random.normal(kc, (3,) + out.shape)
    want = jax.vmap(lambda c: vjp(c)[0])(cts)
    got = jax.vmap(transpose)(cts)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_strided_conv_transpose_declines_what_it_does_not_cover():
    x, w = jnp.ones((1, 2, 8, 8)), jnp.ones((3, 2, 3, 3))
    for kw in (
        dict(strides=(1, 1), padding="SAME"),  # stride 1: XLA's transpose is a plain conv
        dict(strides=(2, 2), padding="SAME", rhs_dilation=(2, 2)),
        dict(strides=(2, 2), padding=((-1, 0), (0, 0))),
    ):
        (eqn,) = jax.make_jaxpr(lambda x, kw=kw: _conv(x, w, **kw))(x).eqns
        assert lz.strided_conv_transpose(eqn.params, w, x.shape, (1, 3, 4, 4)) is None


# --- patch pass vs dense pass ---------------------------------------------------------------
def _nets():
    k = jax.random.split(jax.random.key(3), 10)
    w1, w2 = (
        jax.random.normal(k[0], (6, 2, 4, 4)) * 0.4,
        jax.random.normal(k[1], (8, 6, 4, 4)) * 0.2,
    )
    b1, b2 = jax.random.normal(k[2], (6,)) * 0.1, jax.random.normal(k[3], (8,)) * 0.1
    d = jax.random.normal(k[4], (3, 8 * 3 * 3)) * 0.2

    def nchw(x):  # [2, 12, 12]: the benchmark's CNN shape, small
        h = jax.nn.relu(_conv(x[None], w1, (2, 2), ((1, 1), (1, 1)))[0] + b1[:, None, None])
        h = jax.nn.relu(_conv(h[None], w2, (2, 2), ((1, 1), (1, 1)))[0] + b2[:, None, None])
        return d @ h.reshape(-1)

    v1 = jax.random.normal(k[5], (3, 3, 2, 6)) * 0.3  # HWIO
    v2 = jax.random.normal(k[6], (3, 3, 3, 6)) * 0.3  # two groups
    v3 = jax.random.normal(k[7], (2, 2, 6, 4)) * 0.3
    c1 = jax.random.normal(k[8], (6,)) * 0.1
    nhwc_dn = ("NHWC", "HWIO", "NHWC")

    def nhwc(x):  # [9, 8, 2]: SAME, grouped, dilated, asymmetric strides, mul/sub, 3 activations
        h = jnp.tanh(_conv(x[None], v1, (1, 1), "SAME", nhwc_dn) + c1)
        h = _conv(
            h, v2, (2, 1), ((2, 1), (0, 2)), nhwc_dn, rhs_dilation=(1, 2), feature_group_count=2
        )
        h = jax.nn.leaky_relu(h * 1.5 - 0.2)
        h = jax.nn.relu(_conv(h, v3, (1, 1), "VALID", nhwc_dn))[0]
        return jnp.stack([h.sum(), (h * h[::-1]).mean(), h[0, 0, 0]])

    u = jax.random.normal(k[9], (5, 3, 1, 1))

    def pointwise(x):  # [3, 6, 6]: a 1x1 convolution between sigmoids
        h = jax.nn.sigmoid(_conv(jax.nn.sigmoid(x)[None], u, (1, 1), "VALID"))
        return h.reshape(-1)[:4]

    return {
        "nchw": (nchw, (2, 12, 12)),
        "nhwc": (nhwc, (9, 8, 2)),
        "pointwise": (pointwise, (3, 6, 6)),
    }


NETS = _nets()


def _crown_both(monkeypatch, fn, box, **kw):
    """``(patch result, dense result, patch passes taken)`` of :func:`vf.crown`."""
    taken = []
    real = _patches.interval

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(_patches, "interval", spy)
    patched = vf.crown(fn, box, **kw)
    monkeypatch.setattr(_patches, "interval", lambda *a, **k: None)
    dense = vf.crown(fn, box, **kw)
    monkeypatch.setattr(_patches, "interval", real)
    return patched, dense, taken


@pytest.mark.parametrize("name", NETS)
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_patch_pass_equals_dense_pass(name, eps, monkeypatch, getkey, check_sound):
    fn, shape = NETS[name]
    x = jax.random.uniform(getkey(), shape, jnp.float64)
    box = vf.Box.from_eps(x, eps)
    patched, dense, taken = _crown_both(monkeypatch, fn, box)
    assert any(taken), f"{name}: no patch pass was taken"
    np.testing.assert_allclose(patched.lower, dense.lower, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(patched.upper, dense.upper, rtol=1e-10, atol=1e-12)
    check_sound(fn, box, patched, getkey(), num=2000)


def test_patch_pass_under_jit_and_vmap(monkeypatch, getkey):
    fn, shape = NETS["nchw"]
    xs = jax.random.uniform(getkey(), (3,) + shape, jnp.float64)
    batched = jax.jit(jax.vmap(lambda x: vf.crown(fn, vf.Box.from_eps(x, 0.1))))(xs)
    for i in range(3):
        _, dense, _ = _crown_both(monkeypatch, fn, vf.Box.from_eps(xs[i], 0.1))
        np.testing.assert_allclose(batched.lower[i], dense.lower, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(batched.upper[i], dense.upper, rtol=1e-10, atol=1e-12)


def test_graphs_outside_patch_mode_fall_back(monkeypatch, getkey, check_sound):
    k = jax.random.split(getkey(), 2)
    w = jax.random.normal(k[0], (2, 2, 3, 3)) * 0.5
    w2 = jax.random.normal(k[1], (2, 2, 3, 3)) * 0.5

    def residual(x):  # [2, 6, 6]: x + conv(x) has two bounded arguments
        h = jax.nn.relu(x + _conv(x[None], w, (1, 1), "SAME")[0])
        return jax.nn.relu(_conv(h[None], w2, (1, 1), "SAME")).sum(axis=(2, 3))[0]

    def transposed(x):  # a transpose between the convolutions
        h = jax.nn.relu(_conv(x[None], w, (1, 1), "SAME"))
        h = jnp.swapaxes(h, 2, 3)
        return jax.nn.relu(_conv(h, w2, (1, 1), "SAME")).sum(axis=(2, 3))[0]

    w3 = jax.random.normal(k[1], (3, 3, 6, 2)) * 0.5

    def mixed_layouts(x):  # the second conv reads the NCHW map as NHWC: axes disagree
        h = jax.nn.relu(_conv(x[None], w, (1, 1), "SAME"))
        return jax.nn.relu(_conv(h, w3, (1, 1), "SAME", _NHWC)).sum(axis=(1, 2))[0]

    x = jax.random.uniform(getkey(), (2, 6, 6), jnp.float64)
    box = vf.Box.from_eps(x, 0.1)
    for fn in (residual, transposed, mixed_layouts):
        patched, dense, taken = _crown_both(monkeypatch, fn, box)
        assert taken and not any(taken)
        np.testing.assert_array_equal(patched.lower, dense.lower)
        check_sound(fn, box, patched, getkey(), num=2000)


def test_shared_alpha_slopes_take_the_patch_pass(monkeypatch, getkey):
    """A per-node alpha (no row axis) is unfolded like the CROWN slopes; per-row ones fall back."""
    fn, shape = NETS["nchw"]
    box = vf.Box.from_eps(jax.random.uniform(getkey(), shape, jnp.float64), 0.2)
    inits, _ = _crown.alpha_sites(fn, box)
    alphas = {
        i: jax.random.uniform(jax.random.fold_in(getkey(), i), a.shape) for i, a in inits.items()
    }
    _, patched, _ = _crown.linear_parts(fn, box, None, "crown", alphas)
    monkeypatch.setattr(_patches, "interval", lambda *a, **k: None)
    _, dense, _ = _crown.linear_parts(fn, box, None, "crown", alphas)
    for a, b in zip(patched, dense, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


# --- offsets with infinities ----------------------------------------------------------------
def test_offset_bias_keeps_zero_times_inf_at_zero():
    lam = jnp.array([[1.0, -2.0, 0.0], [0.0, -1.0, 3.0], [2.0, 0.0, -1.0]])
    c_low = jnp.array([-jnp.inf, 0.5, 1.0])
    c_up = jnp.array([2.0, 1.0, jnp.inf])
    got = lz._offset_bias(lam, jnp.abs(lam), c_low, c_up)
    # Row 0 puts weight 1 on the -inf lower offset; row 1 only finite ones; row 2 puts
    # weight -1 on the +inf upper offset.
    np.testing.assert_array_equal(got, [-jnp.inf, -1.0 + 3.0, -jnp.inf])
