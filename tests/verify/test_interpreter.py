"""The jaxpr interpreter: nested calls, constants, transforms, extension and errors."""

import functools as ft

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.core import Primitive

from linjax import verify as vf


def _net(key, act=jax.nn.relu, d=3, h=5, o=2):
    k1, k2, k3 = jax.random.split(key, 3)
    w1, b1 = jax.random.normal(k1, (h, d)), jax.random.normal(k2, (h,))
    w2 = jax.random.normal(k3, (o, h))

    def fn(x):
        return w2 @ act(w1 @ x + b1)

    return fn


def _same(a, b, tol=1e-12):
    np.testing.assert_allclose(a.lower, b.lower, rtol=tol, atol=tol)
    np.testing.assert_allclose(a.upper, b.upper, rtol=tol, atol=tol)


@jax.custom_vjp
def _relu_custom_vjp(x):
    return jnp.maximum(x, 0.0)


_relu_custom_vjp.defvjp(lambda x: (_relu_custom_vjp(x), x), lambda x, g: (g * (x > 0),))


@jax.custom_jvp
def _tanh_custom_jvp(x):
    return jnp.tanh(x)


_tanh_custom_jvp.defjvp(lambda p, t: (jnp.tanh(p[0]), t[0] * (1 - jnp.tanh(p[0]) ** 2)))


@pytest.mark.parametrize("method", [vf.ibp, vf.crown])
def test_nested_calls_are_inlined(method, getkey):
    key = getkey()
    plain = _net(key, lambda z: jnp.tanh(jnp.maximum(z, 0.0)))
    wrapped = _net(
        key,
        lambda z: jax.checkpoint(_tanh_custom_jvp)(jax.jit(_relu_custom_vjp)(z)),
    )
    box = vf.Box.from_eps(jax.random.normal(getkey(), (3,)), 0.5)
    _same(method(jax.jit(wrapped), box), method(plain, box))


def test_constants_are_evaluated_exactly(getkey):
    w = jax.random.normal(getkey(), (4, 3))

    def fn(x):  # the normalisation depends only on w: evaluated concretely, no bounds
        wn = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        return wn @ x + jnp.sin(w).sum()

    box = vf.Box.from_eps(jnp.zeros(3), 1.0)
    wn = w / jnp.linalg.norm(w, axis=1, keepdims=True)
    rad = jnp.abs(wn).sum(1)
    _same(vf.ibp(fn, box), vf.Box(jnp.sin(w).sum() - rad, jnp.sin(w).sum() + rad))


def test_constant_and_identity_functions():
    box = vf.Box(jnp.array([-1.0, 0.0]), jnp.array([1.0, 2.0]))
    const = jnp.array([3.0, 4.0, 5.0])
    for out in (vf.ibp(lambda x: const, box), vf.crown(lambda x: const, box)):
        _same(out, vf.Box(const, const))
    lin = vf.linear_bounds(lambda x: const, box)
    np.testing.assert_array_equal(lin.lA, 0.0)
    np.testing.assert_array_equal(lin.lb, const)
    for out in (vf.ibp(lambda x: x, box), vf.crown(lambda x: x, box)):
        _same(out, box)


def test_leaky_relu_is_recognised_as_piecewise_linear():
    box = vf.Box(jnp.array([-1.0]), jnp.array([3.0]))
    lin = vf.linear_bounds(lambda x: jax.nn.leaky_relu(x, 0.2), box)
    # Chord through (-1, -0.2) and (3, 3) above; slope 1 through the kink below (u > -l).
    np.testing.assert_allclose(lin.uA, [[0.8]])
    np.testing.assert_allclose(lin.ub, [0.6])
    np.testing.assert_allclose(lin.lA, [[1.0]])
    np.testing.assert_allclose(lin.lb, [0.0])
    handwritten = vf.linear_bounds(lambda x: jnp.where(x > 0, x, 0.2 * x), box)
    for a, b in zip(lin, handwritten, strict=True):
        np.testing.assert_allclose(a, b)


def test_vmap_over_boxes_equals_loop(getkey):
    fn = _net(getkey(), jax.nn.gelu)
    centres = jax.random.normal(getkey(), (4, 3))
    boxes = jax.vmap(lambda c: vf.Box.from_eps(c, 0.3))(centres)
    spec = jax.random.normal(getkey(), (3, 2))
    batched = {
        "ibp": jax.vmap(lambda b: vf.ibp(fn, b))(boxes),
        "crown": jax.vmap(lambda b: vf.crown(fn, b, spec=spec))(boxes),
        "crown-ibp": jax.vmap(lambda b: vf.crown(fn, b, intermediate="ibp"))(boxes),
    }
    for i in range(4):
        box = jax.tree.map(lambda v, i=i: v[i], boxes)
        looped = {
            "ibp": vf.ibp(fn, box),
            "crown": vf.crown(fn, box, spec=spec),
            "crown-ibp": vf.crown(fn, box, intermediate="ibp"),
        }
        for name in batched:
            _same(jax.tree.map(lambda v, i=i: v[i], batched[name]), looped[name], 1e-10)
    lin = jax.vmap(lambda b: vf.linear_bounds(fn, b))(boxes)
    assert lin.lA.shape == (4, 2, 3)


def test_jit_matches_eager_and_bounds_are_differentiable(getkey):
    k1, k2 = jax.random.split(getkey())
    w1, w2 = jax.random.normal(k1, (5, 3)), jax.random.normal(k2, (2, 5))
    box = vf.Box.from_eps(jax.random.normal(getkey(), (3,)), 0.4)

    def lower_sum(params, box):
        a, b = params
        return vf.crown(lambda x: b @ jnp.tanh(a @ x), box).lower.sum()

    eager = lower_sum((w1, w2), box)
    np.testing.assert_allclose(jax.jit(lower_sum)((w1, w2), box), eager, rtol=1e-12)
    grads = jax.grad(lower_sum)((w1, w2), box)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    # Finite-difference check of the directional derivative along a random direction.
    d1 = jax.random.normal(getkey(), w1.shape)
    h = 1e-6
    fd = (lower_sum((w1 + h * d1, w2), box) - lower_sum((w1 - h * d1, w2), box)) / (2 * h)
    np.testing.assert_allclose(jnp.vdot(grads[0], d1), fd, rtol=1e-5, atol=1e-7)


def test_float32_box_gives_float32_bounds():
    box = vf.Box.from_eps(jnp.zeros(3, jnp.float32), 0.5)
    w = jnp.ones((2, 3), jnp.float32)
    for out in (vf.ibp(lambda x: jnp.tanh(w @ x), box), vf.crown(lambda x: jnp.tanh(w @ x), box)):
        assert out.lower.dtype == jnp.float32 and out.upper.dtype == jnp.float32


def test_unsupported_primitive_names_it_and_how_to_register():
    p = Primitive("linjax_test_unsupported")
    p.def_impl(lambda x: x)
    p.def_abstract_eval(lambda x: x)
    box = vf.Box(jnp.zeros(2), jnp.ones(2))
    with pytest.raises(NotImplementedError, match="linjax_test_unsupported.*register_rule"):
        vf.crown(lambda x: p.bind(x) + 1.0, box)
    # Constants may use any primitive: only bounded values need rules.
    vf.ibp(lambda x: x + p.bind(jnp.ones(2)), box)
    with pytest.raises(NotImplementedError, match="'while'"):
        vf.ibp(
            lambda x: jax.lax.fori_loop(
                0, jnp.int32(3) + jnp.int32(x[0] > 0), lambda i, v: v * 2, x
            ),
            box,
        )


def _relu6_primitive(name):
    p = Primitive(name)
    p.def_impl(lambda x: jnp.clip(x, 0.0, 6.0))
    p.def_abstract_eval(lambda x: x)
    return p


def _relu6_ibp(x):
    return vf.Box(jnp.clip(x.lower, 0.0, 6.0), jnp.clip(x.upper, 0.0, 6.0))


def _relu6_relaxation(x, *, out_bounds):
    # Chord between the end points above a nondecreasing clip is not sound in general;
    # the constant lines at the output bounds are (and are what we test is used).
    zero = jnp.zeros_like(x.lower)
    return vf.LinearRelaxation(zero, out_bounds.lower, zero, out_bounds.upper)


@pytest.mark.parametrize("kind", ["ibp_only", "relaxation", "backward"])
def test_register_rule_for_a_new_primitive(kind, getkey, check_sound):
    p = _relu6_primitive(f"linjax_test_relu6_{kind}")
    if kind == "ibp_only":
        vf.register_rule(p, ibp=_relu6_ibp)
    elif kind == "relaxation":
        vf.register_rule(p, ibp=_relu6_ibp, crown=_relu6_relaxation)
    else:

        def crown_rule(x, *, out_bounds):
            def backward(lam):  # identity on [0, 6]-stable inputs would be exact; use bounds
                lp, ln = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
                bias = (lp * out_bounds.lower + ln * out_bounds.upper).reshape(lam.shape[0], -1)
                return (None,), bias.sum(1)

            return backward

        vf.register_rule(p, ibp=_relu6_ibp, crown=crown_rule)
    w1, w2 = 3 * jax.random.normal(getkey(), (4, 3)), jax.random.normal(getkey(), (2, 4))
    box = vf.Box.from_eps(jax.random.normal(getkey(), (3,)), 0.5)

    def fn(x):
        return w2 @ p.bind(w1 @ x)

    def reference(x):
        return w2 @ jnp.clip(w1 @ x, 0.0, 6.0)

    for out in (vf.ibp(fn, box), vf.crown(fn, box), vf.crown(fn, box, intermediate="ibp")):
        check_sound(reference, box, out, getkey())
        _same(out, vf.ibp(reference, box), 1e-12)  # constant lines = interval arithmetic here


def test_register_rule_replaces_a_builtin_rule():
    calls = []
    p = _relu6_primitive("linjax_test_replace")

    def ibp_rule(x):
        calls.append("ibp")
        return _relu6_ibp(x)

    vf.register_rule(p, ibp=ibp_rule)
    vf.register_rule(p, crown=_relu6_relaxation)  # keeps the IBP rule
    vf.crown(lambda x: p.bind(x), vf.Box(jnp.zeros(2), jnp.ones(2)))
    assert calls


def test_register_rule_validates_arguments():
    with pytest.raises(TypeError, match="Primitive"):
        vf.register_rule("tanh", ibp=lambda x: x)
    with pytest.raises(ValueError, match="at least one"):
        vf.register_rule(jax.lax.tanh_p)
    with pytest.raises(TypeError, match="callable"):
        vf.register_rule(jax.lax.tanh_p, ibp=3)


def test_bad_crown_rule_output_is_reported():
    p = _relu6_primitive("linjax_test_bad_rule")
    vf.register_rule(p, ibp=_relu6_ibp, crown=lambda x, *, out_bounds: 42)
    with pytest.raises(TypeError, match="LinearRelaxation or a backward function"):
        vf.crown(lambda x: p.bind(x), vf.Box(jnp.zeros(2), jnp.ones(2)))


@pytest.mark.parametrize("fn_name", ["ibp", "crown", "linear_bounds"])
def test_bad_inputs_raise(fn_name):
    fn = ft.partial(getattr(vf, fn_name)) if fn_name == "ibp" else getattr(vf, fn_name)
    good = vf.Box(jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ValueError, match="lower <= upper"):
        fn(jnp.tanh, vf.Box(jnp.ones(2), jnp.zeros(2)))
    with pytest.raises(ValueError, match="same shape"):
        fn(jnp.tanh, vf.Box(jnp.zeros(2), jnp.ones(3)))
    with pytest.raises(TypeError, match="floating"):
        fn(jnp.tanh, vf.Box(jnp.zeros(2, jnp.int32), jnp.ones(2, jnp.int32)))
    with pytest.raises(TypeError, match="Box"):
        fn(jnp.tanh, jnp.zeros(2))
    with pytest.raises(TypeError, match="single array"):
        fn(lambda x: (x, x), good)
    with pytest.raises(TypeError, match="floating"):
        fn(lambda x: (x > 0).astype(jnp.int32), good)
    if fn_name != "ibp":
        with pytest.raises(ValueError, match="spec.shape"):
            fn(jnp.tanh, good, spec=jnp.ones((3, 5)))
        with pytest.raises(ValueError, match="spec.shape"):
            fn(jnp.tanh, good, spec=jnp.ones(2))
        with pytest.raises(ValueError, match="intermediate"):
            fn(jnp.tanh, good, intermediate="lp")


def test_multidimensional_output_shapes(getkey):
    k = jax.random.normal(getkey(), (2, 3, 4))

    def fn(x):  # [4] -> [2, 3]
        return jnp.tanh(k @ x)

    box = vf.Box.from_eps(jnp.zeros(4), 0.2)
    assert vf.crown(fn, box).lower.shape == (2, 3)
    lin = vf.linear_bounds(fn, box)
    assert lin.lA.shape == (2, 3, 4) and lin.lb.shape == (2, 3)
    spec = jnp.ones((5, 2, 3))  # [S, *out_shape] is accepted as well as [S, 6]
    _same(vf.crown(fn, box, spec=spec), vf.crown(fn, box, spec=spec.reshape(5, 6)))


def test_alpha_hook_reproduces_crown_and_stays_sound(getkey, check_sound):
    from linjax.verify import _crown

    k1, k2, k3 = jax.random.split(getkey(), 3)
    w1, w2, w3 = (
        2 * jax.random.normal(k, s)
        for k, s in zip((k1, k2, k3), ((5, 3), (5, 5), (2, 5)), strict=True)
    )

    def fn(x):
        return w3 @ jax.nn.relu(w2 @ jax.nn.leaky_relu(w1 @ x, 0.1))

    box = vf.Box.from_eps(jax.random.normal(getkey(), (3,)), 0.5)
    inits, starts = _crown.alpha_sites(fn, box)
    # The first pre-activation (w1 @ x) has its exact range from IBP: no CROWN pass.
    assert len(inits) == 2 and starts[-1] == "output" and len(starts) == 2

    def bounds(alphas):
        box_, (lA, lb, uA, ub), _ = _crown.linear_parts(fn, box, None, "crown", alphas)
        return vf.Box(_crown.concretize(lA, lb, box_), -_crown.concretize(-uA, -ub, box_))

    _same(bounds(inits), vf.crown(fn, box))
    for value in (0.0, 0.3, 1.0):  # any slope in the valid range is sound (clipped to it)
        alphas = {i: jnp.full_like(a, value) for i, a in inits.items()}
        alphas[("output", max(inits))] = jnp.full((4,) + inits[max(inits)].shape, 2.0)
        check_sound(fn, box, bounds(alphas), getkey())
    grads = jax.grad(lambda al: bounds(al).lower.sum())(inits)
    assert set(grads) == set(inits) and all(bool(jnp.all(jnp.isfinite(g))) for g in grads.values())
