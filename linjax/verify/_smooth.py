r"""Derivatives of smooth activations as single nodes, so their intervals are exact.

JAX writes $\tanh'(z)\,g$ as ``g*(1-t) + g*(1-t)*t`` with $t = \tanh z$; interval
arithmetic on that expression forgets that the factors share $t$ and inflates the range
of $\tanh' \in (0, 1]$ up to $[-2, 4]$ per layer. :func:`with_derivative_nodes` re-traces
``fn`` with ``tanh``, ``logistic``, ``erf``, ``erfc`` and ``atan`` wrapped in a
``custom_jvp`` whose tangent is ``g * derivative(z)``, where :data:`derivative_p` is one
elementwise primitive. Its IBP rule is the exact range of $\sigma'$ on $[l, u]$: the
derivatives are monotone between their listed critical points, so the range is spanned
by the end points and the critical points inside the interval.
"""

from __future__ import annotations

import functools as ft
import math
from collections.abc import Callable

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

#: ``derivative(x, kind=k)``: the derivative of activation ``k`` at ``x``, elementwise.
derivative_p = jex.Primitive("linjax_derivative")


def _impl(x, *, kind):
    return _KINDS[kind][1](x)


derivative_p.def_impl(_impl)
derivative_p.def_abstract_eval(lambda x, *, kind: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(derivative_p, mlir.lower_fun(_impl, multiple_results=False))
batching.primitive_batchers[derivative_p] = lambda args, dims, *, kind: (
    derivative_p.bind(args[0], kind=kind),
    dims[0],
)
ad.defjvp(derivative_p, lambda g, x, *, kind: jax.jvp(_KINDS[kind][1], (x,), (g,))[1])


def _derivative_ibp(x: Box, *, kind) -> Box:
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


_INLINE = {
    prims.jit_p: "jaxpr",
    prims.closed_call_p: "call_jaxpr",
    prims.call_p: "call_jaxpr",
    prims.remat_p: "jaxpr",
}


def _eval(jaxpr: jex.Jaxpr, consts: list, args: list) -> list:
    env = {}
    for v, c in zip(jaxpr.constvars, consts, strict=True):
        env[v] = c
    for v, a in zip(jaxpr.invars, args, strict=True):
        env[v] = a

    def read(a):
        return a.val if isinstance(a, jex.Literal) else env[a]

    for eqn in jaxpr.eqns:
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
    return [read(v) for v in jaxpr.outvars]


def with_derivative_nodes(fn: Callable, like: jax.ShapeDtypeStruct) -> Callable:
    """``fn`` (same values) whose smooth activations differentiate to :data:`derivative_p`."""
    closed = jax.make_jaxpr(fn)(like)

    def wrapped(x):
        (out,) = _eval(closed.jaxpr, closed.consts, [x])
        return out

    return wrapped
