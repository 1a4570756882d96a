r"""CROWN rules (linear relaxations and backward steps) for the built-in primitives.

Affine ops are marked ``linear`` and propagated exactly through their VJP. Nonlinear ops
return a :class:`~linjax.verify.LinearRelaxation` built from ``_relaxations`` (or a
:class:`Relaxed` carrying the free pivot slope alpha-CROWN can optimise), or a backward
function for ops that are not elementwise (``reduce_max``, ``div`` by a bounded
denominator, ``select_n`` on a bounded predicate). Primitives with an IBP rule but no
CROWN rule (``sort``, ``floor``, ``cummax``, ``dot_general`` of two bounded operands,
comparisons, ...) are concretised by the interpreter.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import primitives as prims

from linjax.verify import _graph
from linjax.verify import _relaxations as rx
from linjax.verify._box import Box
from linjax.verify._ibp_rules import reciprocal_bounds, select_cases
from linjax.verify._linearize import ElementwiseLin, row_sum, safe_mul, unbroadcast
from linjax.verify._relaxations import PivotFreedom
from linjax.verify._rules import LinearRelaxation, set_rule


class Relaxed(NamedTuple):
    """A relaxation with a free pivot slope (ReLU-like ops; alpha-CROWN hook)."""

    relaxation: LinearRelaxation
    freedom: PivotFreedom | None


def _neg(a):
    return Box(-a.upper, -a.lower) if isinstance(a, Box) else -a


def _single(relax):
    """Rule for a one-argument elementwise op from ``relax(l, u) -> (aL, cL, aU, cU)``."""

    def rule(x, *, out_bounds, **params):
        return LinearRelaxation(*relax(x.lower, x.upper))

    return rule


def _clipped(relax, low):
    """``relax`` on the part of the interval inside the domain ``x >= low``."""
    return lambda l, u: relax(jnp.maximum(l, low), jnp.maximum(u, low))


_SQRT_PI = math.sqrt(math.pi)


def _d_erf(x):
    return 2 / _SQRT_PI * jnp.exp(-jnp.square(x))


def _d_logistic(x):
    s = jax.nn.sigmoid(x)
    return s * (1 - s)


_S_SHAPED = {
    "tanh": (jnp.tanh, lambda x: 1 - jnp.square(jnp.tanh(x))),
    "logistic": (jax.nn.sigmoid, _d_logistic),
    "erf": (lax.erf, _d_erf),
    "atan": (jnp.arctan, lambda x: 1 / (1 + jnp.square(x))),
    "asinh": (jnp.arcsinh, lambda x: lax.rsqrt(1 + jnp.square(x))),
    "cbrt": (jnp.cbrt, lambda x: 1 / (3 * jnp.square(jnp.cbrt(x)))),
}
_REVERSE_S = {
    "erfc": (lax.erfc, lambda x: -_d_erf(x)),
    "sinh": (jnp.sinh, jnp.cosh),
}
_CONVEX = {
    "exp": (jnp.exp, jnp.exp),
    "exp2": (jnp.exp2, lambda x: math.log(2) * jnp.exp2(x)),
    "expm1": (jnp.expm1, jnp.exp),
    "cosh": (jnp.cosh, jnp.sinh),
    "square": (jnp.square, lambda x: 2 * x),
}


def _integer_pow(x, *, y, out_bounds, **params):
    l, u = x.lower, x.upper
    zero = jnp.zeros_like(l)
    if y == 0:
        return LinearRelaxation(zero, zero + 1, zero, zero + 1)
    if y == 1:
        return LinearRelaxation(zero + 1, zero, zero + 1, zero)

    def f(v):
        return lax.integer_pow(v, y)

    def df(v):
        return y * lax.integer_pow(v, y - 1)

    if y > 0:
        return LinearRelaxation(*(rx.convex if y % 2 == 0 else rx.reverse_s_shaped)(f, df, l, u))
    # x**y, y < 0: convex for x > 0; for x < 0 convex (y even) or concave (y odd).
    pos, neg = l > 0, u < 0
    side = pos | neg
    ls, us = jnp.where(side, l, 1), jnp.where(side, u, 2)
    on_pos = rx.convex(f, df, ls, us)
    on_neg = (rx.convex if y % 2 == 0 else rx.concave)(f, df, ls, us)
    nan = jnp.full_like(l, jnp.nan)  # crossing the pole: concretised (to +-inf)
    return LinearRelaxation(
        *(jnp.where(pos, p, jnp.where(neg, n, nan)) for p, n in zip(on_pos, on_neg, strict=True))
    )


def _pwl_rule(left, right):
    def rule(x, *, out_bounds, **params):
        rel, freedom = rx.piecewise_linear(x.lower, x.upper, left, right)
        return Relaxed(LinearRelaxation(*rel), freedom)

    return rule


def _pwl_prim(x, *, left, right, out_bounds):
    return _pwl_rule(left, right)(x, out_bounds=out_bounds)


def _max_const(x: Box, c, slot: int) -> Relaxed:
    """``max(x, c)`` for a constant ``c``: a ReLU of ``x - c`` shifted by ``c``."""
    l, u = x.lower, x.upper
    c = jnp.broadcast_to(jnp.asarray(c, l.dtype), jnp.broadcast_shapes(l.shape, jnp.shape(c)))
    pos, neg = l >= c, u <= c  # also right for c = -inf / +inf (softmax's max(-inf, .))
    cs = jnp.where(jnp.isfinite(c), c, 0)
    (aL, cL, aU, cU), fr = rx.piecewise_linear(l - cs, u - cs, 0.0, 1.0)
    one, zero = jnp.ones_like(aL), jnp.zeros_like(aL)

    def fix(a, off):
        # y = relu(x - c) + c: same slope, offset shifted by c - a c.
        a = jnp.where(pos, one, jnp.where(neg, zero, a))
        off = jnp.where(pos, zero, jnp.where(neg, c, off + cs - a * cs))
        return a, off

    aL, cL = fix(aL, cL)
    aU, cU = fix(aU, cU)
    fr = fr._replace(crossing=fr.crossing & ~pos & ~neg, px=fr.px + cs, py=fr.py + cs)
    slopes = (lambda a: (a, None)) if slot == 0 else (lambda a: (None, a))
    return Relaxed(LinearRelaxation(slopes(aL), cL, slopes(aU), cU), fr)


def _max_two(a: Box, b: Box) -> LinearRelaxation:
    """``max(x, y)`` of two bounded operands."""
    lx, ux, ly, uy = a.lower, a.upper, b.lower, b.upper
    shape = jnp.broadcast_shapes(lx.shape, ly.shape)
    lx, ux, ly, uy = (jnp.broadcast_to(v, shape) for v in (lx, ux, ly, uy))
    x_wins, y_wins = lx >= uy, (ly >= ux) & ~(lx >= uy)
    # Lower: the operand with the larger midpoint. Upper: max = y + relu(x - y) with
    # x - y in [lx - uy, ux - ly] and relu's chord there.
    pick_x = (lx + ux >= ly + uy).astype(lx.dtype)
    ld, ud = lx - uy, ux - ly
    ok = ud > ld
    k = jnp.where(ok, ud / jnp.where(ok, ud - ld, 1), 1)
    one, zero = jnp.ones_like(lx), jnp.zeros_like(lx)
    aLx = jnp.where(x_wins, one, jnp.where(y_wins, zero, pick_x))
    aUx = jnp.where(x_wins, one, jnp.where(y_wins, zero, k))
    cU = jnp.where(x_wins | y_wins, zero, -k * ld)
    return LinearRelaxation((aLx, 1 - aLx), zero, (aUx, 1 - aUx), cU)


def _max(a, b, *, out_bounds, **params):
    if isinstance(a, Box) and isinstance(b, Box):
        if a is b:
            one = jnp.ones_like(a.lower)
            return LinearRelaxation((one, None), 0 * one, (one, None), 0 * one)
        return _max_two(a, b)
    return _max_const(a, b, 0) if isinstance(a, Box) else _max_const(b, a, 1)


def _reflect(res):
    """Relaxation of ``-g(-x)`` from one of ``g`` (``min`` from ``max``)."""
    rel, fr = (res.relaxation, res.freedom) if isinstance(res, Relaxed) else (res, None)
    new = LinearRelaxation(rel.upper_slopes, -rel.upper_offset, rel.lower_slopes, -rel.lower_offset)
    if fr is None:
        return new
    return Relaxed(new, fr._replace(convex=~fr.convex, px=-fr.px, py=-fr.py))


def _min(a, b, *, out_bounds, **params):
    if a is b:
        return _max(a, b, out_bounds=out_bounds)
    return _reflect(_max(_neg(a), _neg(b), out_bounds=_neg(out_bounds)))


def _compose(outer, inner):
    """Elementwise relaxation of ``outer(inner(x))`` from ``(aL, cL, aU, cU)`` tuples."""
    aL2, cL2, aU2, cU2 = outer
    aL1, cL1, aU1, cU1 = inner
    p, n = jnp.maximum(aL2, 0), jnp.minimum(aL2, 0)
    aL, cL = p * aL1 + n * aU1, p * cL1 + n * cU1 + cL2
    p, n = jnp.maximum(aU2, 0), jnp.minimum(aU2, 0)
    aU, cU = p * aU1 + n * aL1, p * cU1 + n * cL1 + cU2
    return aL, cL, aU, cU


def _flat(res):
    rel = res.relaxation if isinstance(res, Relaxed) else res
    pick = next(i for i, s in enumerate(rel.lower_slopes) if s is not None)
    return rel.lower_slopes[pick], rel.lower_offset, rel.upper_slopes[pick], rel.upper_offset


def _clamp(lo, x, hi, *, out_bounds, **params):
    if isinstance(lo, Box) or isinstance(hi, Box) or not isinstance(x, Box):
        return None  # concretised
    inner = _max_const(x, lo, 0)
    t = Box(jnp.maximum(x.lower, lo), jnp.maximum(x.upper, lo))
    outer = _reflect(_max_const(_neg(t), -hi, 0))
    aL, cL, aU, cU = _compose(_flat(outer), _flat(inner))
    return LinearRelaxation((None, aL, None), cL, (None, aU, None), cU)


def _mul(a, b, *, out_bounds, **params):
    if a is b:
        aL, cL, aU, cU = rx.convex(jnp.square, lambda v: 2 * v, a.lower, a.upper)
        return LinearRelaxation((aL, None), cL, (aU, None), cU)
    (aLx, aLy), cL, (aUx, aUy), cU = rx.mccormick(a.lower, a.upper, b.lower, b.upper)
    return LinearRelaxation((aLx, aLy), cL, (aUx, aUy), cU)


def _reciprocal(y: Box) -> tuple[LinearRelaxation, Box]:
    """``1/y``: convex for ``y > 0``, concave for ``y < 0``, concretised across 0."""
    l, u = y.lower, y.upper
    pos, neg = l > 0, u < 0
    side = pos | neg
    ls, us = jnp.where(side, l, 1), jnp.where(side, u, 2)

    def f(v):
        return 1 / v

    def df(v):
        return -1 / jnp.square(v)

    on_pos, on_neg = rx.convex(f, df, ls, us), rx.concave(f, df, ls, us)
    nan = jnp.full_like(l, jnp.nan)
    rel = [jnp.where(pos, p, jnp.where(neg, n, nan)) for p, n in zip(on_pos, on_neg, strict=True)]
    return LinearRelaxation(*rel), reciprocal_bounds(y)


def _div(a, b, *, out_bounds, **params):
    """``a / b`` with a bounded ``b``: McCormick on ``a * r`` then ``r = 1/b``."""
    rel_r, r = _reciprocal(b)
    recip = ElementwiseLin(rel_r, [b], r, "div")
    b_shape = jnp.shape(b.lower)
    if isinstance(a, Box):
        (aLx, aLr), cL, (aUx, aUr), cU = rx.mccormick(a.lower, a.upper, r.lower, r.upper)
        prod = ElementwiseLin(
            LinearRelaxation((aLx, aLr), cL, (aUx, aUr), cU), [a, r], out_bounds, "div"
        )

        def backward(lam):
            (lam_a, lam_r), b1 = prod([lam])
            (lam_b,), b2 = recip([lam_r])
            return (lam_a, lam_b), b1 + b2

    else:

        def backward(lam):
            (lam_b,), b2 = recip([unbroadcast(lam * a, b_shape)])
            return (None, lam_b), b2

    return backward


def _argmax_mask(v: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """One-hot (ties broken by position) of the maximum of ``v`` over ``axes``."""
    keep = [i for i in range(v.ndim) if i not in axes]
    perm = keep + list(axes)
    vt = jnp.transpose(v, perm)
    flat = vt.reshape(vt.shape[: len(keep)] + (-1,))
    onehot = jax.nn.one_hot(jnp.argmax(flat, axis=-1), flat.shape[-1], dtype=v.dtype)
    return jnp.transpose(onehot.reshape(vt.shape), np.argsort(perm))


def _reduce_max(x, *, axes, out_bounds, **params):
    """``y >= x_k`` (k: largest lower bound); ``y <= x_k`` if ``x_k`` dominates, else ``max u``."""
    axes = tuple(int(a) for a in axes)
    mask = _argmax_mask(x.lower, axes)
    others = jnp.max(jnp.where(mask > 0, -jnp.inf, x.upper), axis=axes)
    dominated = jnp.max(x.lower, axis=axes) >= others
    upper_mask = mask * jnp.expand_dims(dominated, axes).astype(mask.dtype)
    upper_off = jnp.where(dominated, 0, out_bounds.upper)
    row_axes = [a + 1 for a in axes]

    def backward(lam):
        lp, ln = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
        lam_x = jnp.expand_dims(lp, row_axes) * mask + jnp.expand_dims(ln, row_axes) * upper_mask
        return (lam_x,), row_sum(safe_mul(ln, upper_off))

    return backward


def _reduce_min(x, *, axes, out_bounds, **params):
    # min(x) = -max(-x): a lower bound with lam on min is one with -lam on max(-x).
    inner = _reduce_max(_neg(x), axes=axes, out_bounds=_neg(out_bounds))

    def backward(lam):
        (lam_w,), bias = inner(-lam)
        return (-lam_w,), bias

    return backward


def _select_n(pred, *cases, out_bounds, **params):
    """Bounded predicate: exact where the case is decided, the interval elsewhere."""
    _, sure = select_cases(pred, len(cases))
    undecided = ~jnp.any(jnp.stack(jnp.broadcast_arrays(*sure)), axis=0)

    def backward(lam):
        lam_cases, bias = [], 0
        for c, s in zip(cases, sure, strict=True):
            li = jnp.where(s, lam, 0)
            if isinstance(c, Box):
                lam_cases.append(unbroadcast(li, jnp.shape(c.lower)))
            else:
                lam_cases.append(None)
                bias = bias + row_sum(jnp.broadcast_to(li * c, lam.shape))
        lu = jnp.where(undecided, lam, 0)
        lp, ln = jnp.maximum(lu, 0), jnp.minimum(lu, 0)
        bias = bias + row_sum(safe_mul(lp, out_bounds.lower) + safe_mul(ln, out_bounds.upper))
        return [None, *lam_cases], bias

    return backward


def _one_bounded(bounded, params):
    return sum(bounded) == 1


_LINEAR = [
    "add", "sub", "neg", "reshape", "transpose", "broadcast_in_dim", "squeeze", "slice",
    "concatenate", "pad", "rev", "reduce_sum", "cumsum",
    "reduce_window_sum", "sharding_constraint", "split", "tile", "dynamic_slice",
    "dynamic_update_slice", "gather", "scatter_add", "stack", "unstack",
]  # fmt: skip


def _register():
    def prim(name):
        return getattr(prims, f"{name}_p", None) or _graph.lax_primitive(name)

    for name in _LINEAR:
        p = prim(name)
        if p is not None:
            set_rule(p, linear=True)
    set_rule(prims.mul_p, linear=_one_bounded, crown=_mul)
    set_rule(prims.dot_general_p, linear=_one_bounded)
    set_rule(prims.conv_general_dilated_p, linear=_one_bounded)
    set_rule(prims.div_p, linear=lambda bounded, params: not bounded[1], crown=_div)
    set_rule(prims.select_n_p, linear=lambda bounded, params: not bounded[0], crown=_select_n)
    set_rule(
        prims.convert_element_type_p,
        linear=lambda bounded, params: jnp.issubdtype(params["new_dtype"], jnp.floating),
    )
    for table, relax in ((_S_SHAPED, rx.s_shaped), (_REVERSE_S, rx.reverse_s_shaped),
                         (_CONVEX, rx.convex)):  # fmt: skip
        for name, (f, df) in table.items():
            set_rule(prim(name), crown=_single(lambda l, u, f=f, df=df, r=relax: r(f, df, l, u)))
    set_rule(
        prims.log_p,
        crown=_single(_clipped(lambda l, u: rx.concave(jnp.log, lambda v: 1 / v, l, u), 0.0)),
    )
    set_rule(
        prims.log1p_p,
        crown=_single(
            _clipped(lambda l, u: rx.concave(jnp.log1p, lambda v: 1 / (1 + v), l, u), -1.0)
        ),
    )
    set_rule(
        prims.sqrt_p,
        crown=_single(
            _clipped(lambda l, u: rx.concave(jnp.sqrt, lambda v: 0.5 * lax.rsqrt(v), l, u), 0.0)
        ),
    )
    set_rule(
        prims.rsqrt_p,
        crown=_single(
            _clipped(
                lambda l, u: rx.convex(lax.rsqrt, lambda v: -0.5 * lax.rsqrt(v) / v, l, u), 0.0
            )
        ),
    )
    set_rule(prims.integer_pow_p, crown=_integer_pow)
    set_rule(prims.abs_p, crown=_pwl_rule(-1.0, 1.0))
    set_rule(_graph.pwl_p, crown=_pwl_prim)
    set_rule(prims.max_p, crown=_max)
    set_rule(prims.min_p, crown=_min)
    set_rule(prims.clamp_p, crown=_clamp)
    set_rule(prims.reduce_max_p, crown=_reduce_max)
    set_rule(prims.reduce_min_p, crown=_reduce_min)


_register()
