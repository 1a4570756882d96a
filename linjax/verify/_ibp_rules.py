r"""Interval (IBP) rules for the built-in primitives.

Affine maps use the centre/radius form: for $y = Wx$ with $x \in [c - r, c + r]$,
$y \in [Wc - |W| r, Wc + |W| r]$, which is exact for one affine map. Order-preserving
ops (reshapes, slices, sums, max, monotone activations) map ``lower`` and ``upper``
separately. Comparisons produce boolean boxes: ``lower`` = "surely true", ``upper`` =
"possibly true", which ``select_n`` consumes.

Domains: ``sqrt``/``rsqrt``/``log`` are bounded on the part of the interval where they are
defined (inputs are clipped to ``>= 0``, ``log1p`` to ``>= -1``), so a box reaching ``0``
gives ``-inf`` for ``log`` and ``+inf`` for ``rsqrt``; division by an interval containing
0 gives ``(-inf, inf)``. ``mul`` of an infinite bound by an interval touching 0 gives NaN.
"""

from __future__ import annotations

import functools as ft

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as prims

from linjax.verify import _graph
from linjax.verify._box import Box
from linjax.verify._rules import set_rule


def lo(a):
    """Lower end of a box, or the constant itself."""
    return a.lower if isinstance(a, Box) else a


def hi(a):
    """Upper end of a box, or the constant itself."""
    return a.upper if isinstance(a, Box) else a


def bind(prim, params, args):
    """``prim.bind`` with a uniform list result."""
    out = prim.bind(*args, **params)
    return list(out) if prim.multiple_results else out


def _boxes(prim, lows, highs):
    if prim.multiple_results:
        return [Box(a, b) for a, b in zip(lows, highs, strict=True)]
    return Box(lows, highs)


def _check_const(prim, args, positions):
    for i in positions:
        if i < len(args) and isinstance(args[i], Box):
            raise NotImplementedError(
                f"'{prim.name}' with an index/predicate argument (position {i}) that depends "
                "on the bounded input is not supported; only data arguments may be bounded"
            )


def monotone(prim, const_positions=()):
    """Rule for ops non-decreasing in every bounded argument: map lower and upper apart."""

    def rule(*args, **params):
        _check_const(prim, args, const_positions)
        return _boxes(
            prim,
            bind(prim, params, [lo(a) for a in args]),
            bind(prim, params, [hi(a) for a in args]),
        )

    return rule


def _elementwise(f, *, decreasing=False, domain_min=None):
    def rule(x, **params):
        l, u = x.lower, x.upper
        if domain_min is not None:
            l, u = jnp.maximum(l, domain_min), jnp.maximum(u, domain_min)
        fl, fu = f(l), f(u)
        return Box(fu, fl) if decreasing else Box(fl, fu)

    return rule


def _centre_radius(linear, abs_linear, x: Box) -> Box:
    c, r = linear(x.center), abs_linear(x.radius)
    return Box(c - r, c + r)


def _bilinear(prim, params, a, b):
    """``prim`` bilinear in ``(a, b)`` (``dot_general``, ``conv``, ``mul``)."""

    def f(x, y):
        return bind(prim, params, [x, y])

    if isinstance(a, Box) and isinstance(b, Box):
        # Midpoint-radius product (Rump 1999): |AB - Ac Bc| <= |Ac| Br + Ar |Bc| + Ar Br.
        ac, ar, bc, br = a.center, a.radius, b.center, b.radius
        c = f(ac, bc)
        r = f(jnp.abs(ac), br) + f(ar, jnp.abs(bc)) + f(ar, br)
        return Box(c - r, c + r)
    if isinstance(a, Box):
        return _centre_radius(lambda v: f(v, b), lambda v: f(v, jnp.abs(b)), a)
    return _centre_radius(lambda v: f(a, v), lambda v: f(jnp.abs(a), v), b)


def _dot_like(prim):
    def rule(a, b, **params):
        return _bilinear(prim, params, a, b)

    return rule


def _square_bounds(l, u, f=jnp.square):
    """Bounds of an even function increasing in |x| (x**2, x**4, cosh)."""
    crossing = (l < 0) & (u > 0)
    fl, fu = f(l), f(u)
    return jnp.where(crossing, f(jnp.zeros_like(l)), jnp.minimum(fl, fu)), jnp.maximum(fl, fu)


def _mul(a, b, **params):
    if isinstance(a, Box) and isinstance(b, Box):
        if a is b:  # x * x of one variable: a square, not a product of independent factors
            return Box(*_square_bounds(a.lower, a.upper))
        p = [a.lower * b.lower, a.lower * b.upper, a.upper * b.lower, a.upper * b.upper]
        return Box(ft.reduce(jnp.minimum, p), ft.reduce(jnp.maximum, p))
    if isinstance(a, Box):
        return _centre_radius(lambda v: v * b, lambda v: v * jnp.abs(b), a)
    return _centre_radius(lambda v: a * v, lambda v: jnp.abs(a) * v, b)


def reciprocal_bounds(y: Box) -> Box:
    """``1 / y``; ``(-inf, inf)`` where the interval contains 0."""
    l, u = y.lower, y.upper
    has_zero = (l <= 0) & (u >= 0)
    safe_l, safe_u = jnp.where(has_zero, 1, l), jnp.where(has_zero, 1, u)
    inf = jnp.full_like(l, jnp.inf)
    return Box(jnp.where(has_zero, -inf, 1 / safe_u), jnp.where(has_zero, inf, 1 / safe_l))


def _div(a, b, **params):
    if isinstance(b, Box):
        return _mul(a, reciprocal_bounds(b))
    return _centre_radius(lambda v: v / b, lambda v: v / jnp.abs(b), a)


def _sub(a, b, **params):
    return Box(lo(a) - hi(b), hi(a) - lo(b))


def _neg(x, **params):
    return Box(-x.upper, -x.lower)


def _abs(x, **params):
    return Box(*_square_bounds(x.lower, x.upper, jnp.abs))


def _square(x, **params):
    return Box(*_square_bounds(x.lower, x.upper))


def _cosh(x, **params):
    return Box(*_square_bounds(x.lower, x.upper, jnp.cosh))


def _integer_pow(x, *, y, **params):
    l, u = x.lower, x.upper
    if y == 0:
        one = jnp.ones_like(l)
        return Box(one, one)
    fl, fu = lax.integer_pow(l, y), lax.integer_pow(u, y)
    if y > 0:
        if y % 2 == 0:
            return Box(*_square_bounds(l, u, lambda v: lax.integer_pow(v, y)))
        return Box(fl, fu)
    # Negative powers: monotone on each side of 0, unbounded across it.
    crossing = (l <= 0) & (u >= 0)
    inf = jnp.full_like(l, jnp.inf)
    low, high = jnp.minimum(fl, fu), jnp.maximum(fl, fu)
    if y % 2 == 0:  # x**-2k: smallest at the end point farthest from 0, +inf at 0
        return Box(low, jnp.where(crossing, inf, high))
    return Box(jnp.where(crossing, -inf, low), jnp.where(crossing, inf, high))


def pwl_eval(x, left, right):
    """``right * x`` for ``x >= 0`` and ``left * x`` below."""
    return jnp.where(x >= 0, right * x, left * x)


def _pwl(x, *, left, right):
    l, u = x.lower, x.upper
    fl, fu = pwl_eval(l, left, right), pwl_eval(u, left, right)
    crossing = (l < 0) & (u > 0)
    zero = jnp.zeros_like(fl)
    low, high = jnp.minimum(fl, fu), jnp.maximum(fl, fu)
    return Box(
        jnp.where(crossing, jnp.minimum(low, zero), low),
        jnp.where(crossing, jnp.maximum(high, zero), high),
    )


def _bool_box(a):
    return a if isinstance(a, Box) else Box(a, a)


def _ge(a, b, *, strict):
    if a is b:
        v = jnp.full(jnp.shape(a.lower), not strict)
        return Box(v, v)
    a, b = _bool_box(a), _bool_box(b)
    if strict:
        return Box(a.lower > b.upper, a.upper > b.lower)
    return Box(a.lower >= b.upper, a.upper >= b.lower)


def _eq(a, b):
    if a is b:
        v = jnp.full(jnp.shape(a.lower), True)
        return Box(v, v)
    a, b = _bool_box(a), _bool_box(b)
    surely = (a.lower == a.upper) & (b.lower == b.upper) & (a.lower == b.lower)
    possibly = (a.lower <= b.upper) & (b.lower <= a.upper)
    return Box(surely, possibly)


def _check_bool(name, *args):
    for a in args:
        if jnp.result_type(lo(a)) != jnp.bool_:
            raise NotImplementedError(f"'{name}' on bounded integers (bitwise) is not supported")


def _and(a, b, **params):
    _check_bool("and", a, b)
    a, b = _bool_box(a), _bool_box(b)
    return Box(a.lower & b.lower, a.upper & b.upper)


def _or(a, b, **params):
    _check_bool("or", a, b)
    a, b = _bool_box(a), _bool_box(b)
    return Box(a.lower | b.lower, a.upper | b.upper)


def _not(a, **params):
    _check_bool("not", a)
    return Box(~a.upper, ~a.lower)


def select_cases(pred: Box, n: int):
    """Masks ``possible[i]`` (case ``i`` may be chosen) and ``sure[i]`` (it is chosen)."""
    plo, phi = pred.lower.astype(jnp.int32), pred.upper.astype(jnp.int32)
    possible = [(plo <= i) & (i <= phi) for i in range(n)]
    sure = [(plo == i) & (phi == i) for i in range(n)]
    return possible, sure


def _select_n(pred, *cases, linjax_refine=None, **params):
    if not isinstance(pred, Box):
        return monotone(prims.select_n_p)(pred, *cases, **params)
    possible, _ = select_cases(pred, len(cases))
    if linjax_refine is not None:
        # A case equal to the compared value x is only taken on its side of the threshold.
        cases = [
            c if r is None else _clip_side(c, *r) for c, r in zip(cases, linjax_refine, strict=True)
        ]
    shape = jnp.broadcast_shapes(*(jnp.shape(lo(c)) for c in cases))
    lows = [jnp.broadcast_to(lo(c), shape) for c in cases]
    highs = [jnp.broadcast_to(hi(c), shape) for c in cases]
    top, bottom = ft.reduce(jnp.maximum, highs), ft.reduce(jnp.minimum, lows)
    # At least one case is possible, so min over possible lows <= top (and vice versa).
    low = ft.reduce(
        jnp.minimum, [jnp.where(p, v, top) for p, v in zip(possible, lows, strict=True)]
    )
    high = ft.reduce(
        jnp.maximum, [jnp.where(p, v, bottom) for p, v in zip(possible, highs, strict=True)]
    )
    return Box(low, high)


def _clip_side(c: Box, side: str, t) -> Box:
    if side == "lower":  # taken only where x >= t
        return Box(jnp.maximum(c.lower, t), jnp.maximum(c.upper, t))
    return Box(jnp.minimum(c.lower, t), jnp.minimum(c.upper, t))


def _convert(x, *, new_dtype, **params):
    if new_dtype == jnp.bool_ and x.lower.dtype != jnp.bool_:
        # x != 0 is not monotone.
        surely = (x.lower > 0) | (x.upper < 0)
        possibly = (x.lower != 0) | (x.upper != 0)
        return Box(surely, possibly)
    return monotone(prims.convert_element_type_p)(x, new_dtype=new_dtype, **params)


def _sort(*args, **params):
    if len(args) != 1:
        raise NotImplementedError("'sort' of several operands (sort by key) is not supported")
    return monotone(prims.sort_p)(*args, **params)


_MONOTONE = [
    "add", "reshape", "transpose", "broadcast_in_dim", "squeeze", "slice", "concatenate",
    "pad", "rev", "reduce_sum", "reduce_max", "reduce_min",
    "max", "min", "clamp", "cumsum", "cummax", "cummin", "cumlogsumexp", "reduce_window_sum",
    "reduce_window_max", "reduce_window_min", "reduce_precision", "sharding_constraint",
    "split", "tile", "floor", "ceil", "round", "sign", "stack", "unstack",
]  # fmt: skip
_INDEXED = {"dynamic_slice": range(1, 64), "dynamic_update_slice": range(2, 64), "gather": (1,),
            "scatter": (1,), "scatter_add": (1,)}  # fmt: skip
_INCREASING = {
    "exp": jnp.exp, "exp2": jnp.exp2, "expm1": jnp.expm1, "tanh": jnp.tanh,
    "logistic": jax.nn.sigmoid, "erf": lax.erf, "atan": jnp.arctan, "asinh": jnp.arcsinh,
    "sinh": jnp.sinh, "cbrt": jnp.cbrt,
}  # fmt: skip


def _register():
    def prim(name):
        p = getattr(prims, f"{name}_p", None) or _graph.lax_primitive(name)
        return p

    for name in _MONOTONE:
        p = prim(name)
        if p is not None:
            set_rule(p, ibp=monotone(p))
    for name, positions in _INDEXED.items():
        p = prim(name)
        if p is not None:
            set_rule(p, ibp=monotone(p, tuple(positions)))
    for name, f in _INCREASING.items():
        p = prim(name)
        if p is not None:
            set_rule(p, ibp=_elementwise(f))
    set_rule(prims.sqrt_p, ibp=_elementwise(jnp.sqrt, domain_min=0.0))
    set_rule(prims.log_p, ibp=_elementwise(jnp.log, domain_min=0.0))
    set_rule(prims.log1p_p, ibp=_elementwise(jnp.log1p, domain_min=-1.0))
    set_rule(prims.rsqrt_p, ibp=_elementwise(lax.rsqrt, decreasing=True, domain_min=0.0))
    set_rule(prims.erfc_p, ibp=_elementwise(lax.erfc, decreasing=True))
    set_rule(prims.dot_general_p, ibp=_dot_like(prims.dot_general_p))
    set_rule(prims.conv_general_dilated_p, ibp=_dot_like(prims.conv_general_dilated_p))
    set_rule(prims.mul_p, ibp=_mul)
    set_rule(prims.div_p, ibp=_div)
    set_rule(prims.sub_p, ibp=_sub)
    set_rule(prims.neg_p, ibp=_neg)
    set_rule(prims.abs_p, ibp=_abs)
    set_rule(prims.square_p, ibp=_square)
    set_rule(prims.cosh_p, ibp=_cosh)
    set_rule(prims.integer_pow_p, ibp=_integer_pow)
    set_rule(_graph.pwl_p, ibp=_pwl)
    set_rule(prims.select_n_p, ibp=_select_n)
    set_rule(prims.convert_element_type_p, ibp=_convert)
    set_rule(prims.sort_p, ibp=_sort)
    set_rule(prims.ge_p, ibp=lambda a, b, **p: _ge(a, b, strict=False))
    set_rule(prims.gt_p, ibp=lambda a, b, **p: _ge(a, b, strict=True))
    set_rule(prims.le_p, ibp=lambda a, b, **p: _ge(b, a, strict=False))
    set_rule(prims.lt_p, ibp=lambda a, b, **p: _ge(b, a, strict=True))
    set_rule(prims.eq_p, ibp=lambda a, b, **p: _eq(a, b))
    set_rule(prims.ne_p, ibp=lambda a, b, **p: _not(_eq(a, b)))
    set_rule(prims.and_p, ibp=_and)
    set_rule(prims.or_p, ibp=_or)
    set_rule(prims.not_p, ibp=_not)


_register()
