r"""Derivatives of smooth activations as single nodes, so their intervals are tight.

JAX writes $\tanh'(z)\,g$ as ``g*(1-t) + g*(1-t)*t`` with $t = \tanh z$; interval
arithmetic on that expression forgets that the factors share $t$ and inflates the range
of $\tanh' \in (0, 1]$ up to $[-2, 4]$ per layer. :func:`with_derivative_nodes` re-traces
``fn`` so that activations differentiate to ``g * derivative(z)``, where
:data:`derivative_p` is one elementwise primitive:

* ``tanh``, ``logistic``, ``erf``, ``erfc``, ``atan``: its IBP rule is the exact range of
  $\sigma'$ on $[l, u]$ (the derivatives are monotone between their listed critical
  points, so the range is spanned by the end points and the critical points inside);
* composite activations, i.e. elementwise sub-graphs of one variable with a product of
  two dependent values or several nonlinear ops (GELU $z\,\Phi(z)$ in both forms, SiLU
  $z\,\sigma(z)$, ...): the derivative of the whole sub-graph is bounded by IBP on
  ``PIECES`` sub-intervals of $[l, u]$ (united, then intersected with the
  whole-interval bound); the overestimate shrinks linearly with the piece width;
* smooth elementwise activations that JAX wraps in a ``jit`` or ``custom_jvp`` call of
  one array (``softplus``, ``elu``, ``celu``, ...) are treated the same way, their
  derivative following the call's own derivative rule.
"""

from __future__ import annotations

import functools as ft
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend import core as jex
from jax.extend.core import primitives as prims
from jax.interpreters import ad, batching, mlir

from linjax.verify import _graph
from linjax.verify._box import Box
from linjax.verify._rules import set_rule

_TWO_OVER_SQRT_PI = 2 / math.sqrt(math.pi)


def _d_logistic(x):
    s = jax.nn.sigmoid(x)
    return s * (1 - s)


# kind -> (function, derivative, critical points of the derivative)
_KINDS: dict[str, tuple[Callable, Callable, tuple[float, ...]]] = {
    "tanh": (jnp.tanh, lambda x: 1 - jnp.square(jnp.tanh(x)), (0.0,)),
    "logistic": (jax.nn.sigmoid, _d_logistic, (0.0,)),
    "erf": (lax.erf, lambda x: _TWO_OVER_SQRT_PI * jnp.exp(-jnp.square(x)), (0.0,)),
    "erfc": (lax.erfc, lambda x: -_TWO_OVER_SQRT_PI * jnp.exp(-jnp.square(x)), (0.0,)),
    "atan": (jnp.arctan, lambda x: 1 / (1 + jnp.square(x)), (0.0,)),
}
_PRIMS = {
    prims.tanh_p: "tanh",
    prims.logistic_p: "logistic",
    prims.erf_p: "erf",
    prims.erfc_p: "erfc",
    prims.atan_p: "atan",
}

# key -> (composite activation, its derivative): elementwise sub-graphs of one variable.
_COMPOSITES: dict[str, tuple[Callable, Callable]] = {}

#: ``derivative(x, kind=k)``: the derivative of activation ``k`` at ``x``, elementwise.
derivative_p = jex.Primitive("linjax_derivative")


def _impl(x, *, kind):
    table = _KINDS if kind in _KINDS else _COMPOSITES
    return table[kind][1](x)


derivative_p.def_impl(_impl)
derivative_p.def_abstract_eval(lambda x, *, kind: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(derivative_p, mlir.lower_fun(_impl, multiple_results=False))
batching.primitive_batchers[derivative_p] = lambda args, dims, *, kind: (
    derivative_p.bind(args[0], kind=kind),
    dims[0],
)
ad.defjvp(derivative_p, lambda g, x, *, kind: jax.jvp(ft.partial(_impl, kind=kind), (x,), (g,))[1])


def _derivative_ibp(x: Box, *, kind) -> Box:
    if kind not in _KINDS:
        return _composite_ibp(x, kind)
    d, crit = _KINDS[kind][1], _KINDS[kind][2]
    l, u = x.lower, x.upper
    dl, du = d(l), d(u)
    low, high = jnp.minimum(dl, du), jnp.maximum(dl, du)
    for c in crit:
        inside = (l < c) & (c < u)
        dc = d(jnp.asarray(c, l.dtype))
        low = jnp.where(inside, jnp.minimum(low, dc), low)
        high = jnp.where(inside, jnp.maximum(high, dc), high)
    return Box(low, high)


#: Sub-intervals used to bound the derivative of a composite activation.
PIECES = 64


def _composite_ibp(x: Box, kind: str) -> Box:
    """IBP of the composite's derivative on ``PIECES`` sub-intervals, united.

    Interval arithmetic on ``d/dz [z * Phi(z)]`` overestimates by an amount proportional
    to the interval width; on sub-intervals that error shrinks, and the union of sound
    bounds is sound. The whole-interval bound is intersected in as well.
    """
    from linjax.verify._ibp import ibp  # the interpreter, on an elementwise function

    d = _COMPOSITES[kind][1]
    l, u = x.lower, x.upper
    t = jnp.linspace(0.0, 1.0, PIECES + 1, dtype=l.dtype).reshape((-1,) + (1,) * l.ndim)
    cuts = l[None] + t * (u - l)[None]
    lo_k, hi_k = jnp.minimum(cuts[:-1], cuts[1:]), jnp.maximum(cuts[:-1], cuts[1:])
    pieces = ibp(d, Box(lo_k, hi_k))
    whole = ibp(d, x)
    low = jnp.maximum(jnp.min(pieces.lower, axis=0), whole.lower)
    high = jnp.minimum(jnp.max(pieces.upper, axis=0), whole.upper)
    return Box(jnp.minimum(low, high), jnp.maximum(low, high))


set_rule(derivative_p, ibp=_derivative_ibp)


@ft.cache
def _activation(kind: str) -> Callable:
    f = _KINDS[kind][0]

    @jax.custom_jvp
    def act(x):
        return f(x)

    @act.defjvp
    def act_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return act(x), t * derivative_p.bind(x, kind=kind)

    return act


def _custom(f: Callable, kind: str) -> Callable:
    @jax.custom_jvp
    def act(x):
        return f(x)

    @act.defjvp
    def act_jvp(primals, tangents):
        (x,), (t,) = primals, tangents
        return act(x), t * derivative_p.bind(x, kind=kind)

    return act


_INLINE = {
    prims.jit_p: "jaxpr",
    prims.closed_call_p: "call_jaxpr",
    prims.call_p: "call_jaxpr",
    prims.remat_p: "jaxpr",
}


# Elementwise primitives a composite activation may be built from (with scalar literals).
_ELEMENTWISE = {
    p
    for p in (
        prims.add_p, prims.sub_p, prims.mul_p, prims.div_p, prims.neg_p, prims.tanh_p,
        prims.logistic_p, prims.erf_p, prims.erfc_p, prims.atan_p, prims.exp_p, prims.log_p,
        prims.log1p_p, prims.expm1_p, prims.integer_pow_p, prims.square_p, prims.sqrt_p,
        prims.rsqrt_p, prims.abs_p, prims.max_p, prims.min_p, prims.copy_p,
    )
}  # fmt: skip
_AFFINE = {prims.add_p, prims.sub_p, prims.neg_p, prims.copy_p}


# What the body of a "unit" activation call may contain, and what makes it smooth.
_UNIT_OK = _ELEMENTWISE | {
    prims.gt_p, prims.ge_p, prims.lt_p, prims.le_p, prims.eq_p, prims.ne_p, prims.select_n_p,
    prims.convert_element_type_p, prims.broadcast_in_dim_p, prims.jit_p,
    prims.custom_jvp_call_p,
}  # fmt: skip
_SMOOTH = {
    prims.exp_p, prims.expm1_p, prims.log_p, prims.log1p_p, prims.tanh_p, prims.logistic_p,
    prims.erf_p, prims.erfc_p, prims.atan_p, prims.sqrt_p, prims.rsqrt_p, prims.integer_pow_p,
    prims.div_p,
}  # fmt: skip
_BODY = {prims.jit_p: "jaxpr", prims.custom_jvp_call_p: "call_jaxpr"}


def _body_kind(sub: Any) -> str | None:
    """``"smooth"`` / ``"flat"`` for an elementwise body without array constants, else None."""
    if isinstance(sub, jex.ClosedJaxpr):
        if sub.consts:
            return None
        sub = sub.jaxpr
    smooth = False
    for e in sub.eqns:
        if e.primitive not in _UNIT_OK:
            return None
        if e.primitive is prims.broadcast_in_dim_p and e.invars[0].aval.shape != ():
            return None
        if e.primitive in _BODY:
            kind = _body_kind(e.params[_BODY[e.primitive]])
            if kind is None:
                return None
            smooth |= kind == "smooth"
        smooth |= e.primitive in _SMOOTH
    return "smooth" if smooth else "flat"


def _is_unit(eqn: jex.JaxprEqn) -> bool:
    """A ``jit``/``custom_jvp`` call that is a smooth elementwise function of one array.

    ``jax.nn.softplus``, ``elu``, ``celu``, ``selu``, ... (their derivatives are bounded on
    sub-intervals as one node; piecewise-linear ones such as ``relu`` are left to the
    ReLU relaxations).
    """
    if eqn.primitive not in _BODY or len(eqn.outvars) != 1:
        return False
    ins = [a for a in eqn.invars if not isinstance(a, jex.Literal)]
    out = eqn.outvars[0].aval
    if len(ins) != 1 or ins[0].aval.shape != out.shape:
        return False
    if not jnp.issubdtype(out.dtype, jnp.floating):
        return False
    if any(isinstance(a, jex.Literal) and jnp.ndim(a.val) != 0 for a in eqn.invars):
        return False
    return _body_kind(eqn.params[_BODY[eqn.primitive]]) == "smooth"


def _unit(eqn: jex.JaxprEqn) -> Callable:
    key = f"unit:{eqn}"
    if key not in _COMPOSITES:

        def f(x):
            vals = [a.val if isinstance(a, jex.Literal) else x for a in eqn.invars]
            (out,) = _graph._eval_eqn(eqn, vals)
            return out

        def df(x):
            return jax.jvp(f, (x,), (jnp.ones_like(x),))[1]

        _COMPOSITES[key] = (f, df)
    return _custom(_COMPOSITES[key][0], key)


def _groups(jaxpr: jex.Jaxpr) -> dict[int, tuple[Any, Any, list[int]]]:
    """Composite activations: ``{first eqn: (root var, output var, eqn indices)}``.

    A group is the set of elementwise equations computing values from a single variable
    ``r`` (and scalar literals) at ``r``'s shape, with exactly one value used outside it,
    and at least one product of two such values or two nonlinear ops (``z * Phi(z)``,
    ``z * sigmoid(z)``); single activations keep their exact per-primitive rule.
    """
    root: dict[Any, Any] = {}
    members: dict[Any, list[int]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        ins = [a for a in eqn.invars if not isinstance(a, jex.Literal)]
        roots = {root.get(a, a) for a in ins}
        lits_ok = all(not isinstance(a, jex.Literal) or jnp.ndim(a.val) == 0 for a in eqn.invars)
        elementwise = eqn.primitive in _ELEMENTWISE or _is_unit(eqn)
        if elementwise and len(roots) == 1 and lits_ok and ins:
            (r,) = roots
            out = eqn.outvars[0]
            if (
                out.aval.shape == r.aval.shape
                and all(a.aval.shape == r.aval.shape for a in ins)
                and jnp.issubdtype(out.aval.dtype, jnp.floating)
            ):
                root[out] = r
                members.setdefault(r, []).append(i)
    used_outside: dict[Any, set[Any]] = {}
    for i, eqn in enumerate(jaxpr.eqns):
        for a in eqn.invars:
            if not isinstance(a, jex.Literal) and a in root:
                r = root[a]
                if i not in members[r]:
                    used_outside.setdefault(r, set()).add(a)
    for a in jaxpr.outvars:
        if not isinstance(a, jex.Literal) and a in root:
            used_outside.setdefault(root[a], set()).add(a)
    plan = {}
    for r, idx in members.items():
        outs = used_outside.get(r, set())
        if len(outs) != 1:
            continue
        eqns = [jaxpr.eqns[i] for i in idx]
        bilinear = any(
            e.primitive in (prims.mul_p, prims.div_p)
            and not any(isinstance(a, jex.Literal) for a in e.invars)
            for e in eqns
        )
        nonlinear = sum(
            e.primitive not in _AFFINE
            and not (
                e.primitive in (prims.mul_p, prims.div_p)
                and any(isinstance(a, jex.Literal) for a in e.invars)
            )
            for e in eqns
        )
        if bilinear or nonlinear >= 2:
            plan[idx[0]] = (r, next(iter(outs)), idx)
    return plan


def _composite(jaxpr: jex.Jaxpr, r: Any, out: Any, idx: list[int]) -> Callable:
    eqns = [jaxpr.eqns[i] for i in idx]
    key = "composite:" + ";".join(str(e) for e in eqns) + f"->{out}"
    if key not in _COMPOSITES:

        def f(x):
            env = {r: x}
            _run(eqns, env)
            return env[out]

        def df(x):
            return jax.jvp(f, (x,), (jnp.ones_like(x),))[1]

        _COMPOSITES[key] = (f, df)
    return _custom(_COMPOSITES[key][0], key)


def _run(eqns: list, env: dict) -> None:
    def read(a):
        return a.val if isinstance(a, jex.Literal) else env[a]

    for eqn in eqns:
        vals = [read(a) for a in eqn.invars]
        kind = _PRIMS.get(eqn.primitive)
        if kind is not None and jnp.issubdtype(eqn.outvars[0].aval.dtype, jnp.floating):
            outs = [_activation(kind)(vals[0])]
        elif eqn.primitive in _INLINE:
            sub = eqn.params[_INLINE[eqn.primitive]]
            if isinstance(sub, jex.ClosedJaxpr):
                outs = _eval(sub.jaxpr, sub.consts, vals)
            else:
                outs = _eval(sub, [], vals)
        else:
            outs = _graph._eval_eqn(eqn, vals)
        for v, o in zip(eqn.outvars, outs, strict=True):
            if not isinstance(v, jex.DropVar):
                env[v] = o


def _eval(jaxpr: jex.Jaxpr, consts: list, args: list) -> list:
    env = {}
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a
    plan = _groups(jaxpr)
    skip: set[int] = set()
    for i, eqn in enumerate(jaxpr.eqns):
        if i in plan:
            r, out, idx = plan[i]
            env[out] = _composite(jaxpr, r, out, idx)(env[r])
            skip.update(idx)
        if i not in skip:
            if _is_unit(eqn):
                (x,) = [env[a] for a in eqn.invars if not isinstance(a, jex.Literal)]
                env[eqn.outvars[0]] = _unit(eqn)(x)
            else:
                _run([eqn], env)
    return [a.val if isinstance(a, jex.Literal) else env[a] for a in jaxpr.outvars]


def with_derivative_nodes(fn: Callable, like: jax.ShapeDtypeStruct) -> Callable:
    """``fn`` (same values) whose smooth activations differentiate to :data:`derivative_p`."""
    closed = jax.make_jaxpr(fn)(like)

    def wrapped(x):
        (out,) = _eval(closed.jaxpr, closed.consts, [x])
        return out

    return wrapped
