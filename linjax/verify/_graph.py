"""Trace ``fn`` to a flat graph of the equations that depend on the bounded input.

``jax.make_jaxpr`` gives a jaxpr with nested calls (``jit``, ``custom_jvp_call``,
``custom_vjp_call``, ``closed_call``, ``remat``). :func:`trace` walks it once:

* equations whose arguments are all constants (weights, literals, values computed from
  them) are evaluated right away, so bound rules only ever see the parts of ``fn`` that
  depend on the input;
* call primitives with a bounded argument are inlined (the primal ``call_jaxpr`` of a
  custom derivative is what the bounds are about);
* every other bounded equation becomes a :class:`Node` of a flat list in topological
  order, after checking that an IBP rule exists for its primitive.

A small peephole pass then recognises ``where(x >= 0, a * x, b * x)`` (how
``jax.nn.leaky_relu`` lowers: a comparison, a scaling and ``select_n``) as one
piecewise-linear node, whose relaxation is much tighter than bounding the select, and
dead nodes are dropped. Variables are integers; ``0`` is the input.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np
from jax import lax
from jax.extend import core as jex
from jax.extend.core import primitives as prims

from linjax.verify import _rules

#: Piecewise-linear ``y = where(x >= 0, right * x, left * x)`` (leaky ReLU, abs, ...).
pwl_p = jex.Primitive("linjax_pwl")


class Const(NamedTuple):
    """A value that does not depend on the bounded input (array or Python scalar)."""

    value: Any


class Node(NamedTuple):
    """One equation on bounded values: ``outputs = primitive(*inputs, **params)``."""

    primitive: jex.Primitive
    inputs: tuple  # int (bounded variable) or Const
    outputs: tuple[int, ...]
    params: dict


class Graph(NamedTuple):
    """Flat bounded graph; ``avals[v]`` is the ``ShapeDtypeStruct`` of variable ``v``."""

    nodes: list[Node]
    avals: list[jax.ShapeDtypeStruct]
    output: int | Const


# Call-like primitives inlined when a bounded value flows in, with the name of the param
# that holds the primal jaxpr.
_CALLS = {
    prims.jit_p: "jaxpr",
    prims.custom_jvp_call_p: "call_jaxpr",
    prims.custom_vjp_call_p: "call_jaxpr",
    prims.closed_call_p: "call_jaxpr",
    prims.call_p: "call_jaxpr",
    prims.remat_p: "jaxpr",
}


# Primitives that are the identity on values.
_ALIASES = {
    p
    for p in (
        getattr(prims, "stop_gradient_p", None),
        prims.copy_p,
        getattr(lax, "optimization_barrier_p", None),
    )
    if p is not None
}


def trace(fn: Callable[[jax.Array], jax.Array], like: jax.ShapeDtypeStruct) -> Graph:
    """Trace ``fn`` at an input shaped like ``like`` into a :class:`Graph`."""
    if not callable(fn):
        raise TypeError(f"fn must be a callable array -> array, got {type(fn).__name__}")
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(like)
    if not isinstance(out_shape, jax.ShapeDtypeStruct):
        raise TypeError(
            "fn must return a single array; got a pytree with structure "
            f"{jax.tree.structure(out_shape)} (wrap fn to return one array)"
        )
    if not jax.numpy.issubdtype(out_shape.dtype, jax.numpy.floating):
        raise TypeError(f"fn must return a real floating array, got dtype {out_shape.dtype}")
    builder = _Builder(like)
    (out,) = builder.inline(closed.jaxpr, closed.consts, [0])
    nodes = _rewrite_piecewise_linear(builder.nodes)
    return Graph(_prune(nodes, out), builder.avals, out)


class _Builder:
    def __init__(self, like: jax.ShapeDtypeStruct):
        self.nodes: list[Node] = []
        self.avals: list[jax.ShapeDtypeStruct] = [jax.ShapeDtypeStruct(like.shape, like.dtype)]

    def new_var(self, aval: Any) -> int:
        self.avals.append(jax.ShapeDtypeStruct(aval.shape, aval.dtype))
        return len(self.avals) - 1

    def inline(self, jaxpr: jex.Jaxpr, consts: list, in_refs: list) -> list:
        env: dict[Any, Any] = {}
        for v, c in zip(jaxpr.constvars, consts, strict=True):
            env[v] = Const(c)
        for v, r in zip(jaxpr.invars, in_refs, strict=True):
            env[v] = r

        def read(a):
            return Const(a.val) if isinstance(a, jex.Literal) else env[a]

        for eqn in jaxpr.eqns:
            ins = [read(a) for a in eqn.invars]
            if all(isinstance(r, Const) for r in ins):
                outs = [Const(v) for v in _eval_eqn(eqn, [r.value for r in ins])]
            elif eqn.primitive in _ALIASES:
                # Identity on values (stop_gradient's VJP is zero, so it must not be
                # linearized through autodiff): the output is the same bounded variable.
                outs = ins
            elif eqn.primitive in _CALLS:
                sub = eqn.params[_CALLS[eqn.primitive]]
                if isinstance(sub, jex.ClosedJaxpr):
                    outs = self.inline(sub.jaxpr, sub.consts, ins)
                else:
                    outs = self.inline(sub, [], ins)
            else:
                rule = _rules.get_rule(eqn.primitive)
                if rule is None or rule.ibp is None:
                    raise NotImplementedError(_rules.unsupported_message(eqn.primitive))
                outs = [self.new_var(v.aval) for v in eqn.outvars]
                self.nodes.append(Node(eqn.primitive, tuple(ins), tuple(outs), dict(eqn.params)))
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not isinstance(v, jex.DropVar):
                    env[v] = o
        return [read(v) for v in jaxpr.outvars]


def _eval_eqn(eqn: jex.JaxprEqn, vals: list) -> list:
    """Evaluate one equation on concrete (or outer-traced) values, as ``eval_jaxpr`` does."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(bind_params, tuple):  # older JAX: (subfuns, params)
        subfuns, bind_params = bind_params
    else:
        subfuns = []
    out = eqn.primitive.bind(*subfuns, *vals, **bind_params)
    return list(out) if eqn.primitive.multiple_results else [out]


def is_bounded(ref: Any) -> bool:
    """Whether a node input refers to a bounded variable."""
    return not isinstance(ref, Const)


# Peephole: where(x >= 0, right * x, left * x) -> pwl(x; left, right).

_COMPARE = {prims.ge_p: True, prims.gt_p: True, prims.le_p: False, prims.lt_p: False}


def _is_zero(value: Any) -> bool:
    if isinstance(value, jax.core.Tracer):
        return False
    v = np.asarray(value)
    return v.shape == () and v == 0


def _rewrite_piecewise_linear(nodes: list[Node]) -> list[Node]:
    producer = {out: node for node in nodes for out in node.outputs}
    out_nodes = []
    for node in nodes:
        new = _match_pwl(node, producer)
        if new is None:
            new = _refine_select(node, producer)
        out_nodes.append(new if new is not None else node)
    return out_nodes


def _refine_select(node: Node, producer: dict[int, Node]) -> Node | None:
    """Tag ``select_n(cmp(x, t), ..., x, ...)`` so that IBP clips ``x`` to its branch.

    ``jax.nn.elu`` computes ``expm1(where(x > 0, 0, x))``: the case ``x`` is only chosen
    where ``x <= 0``, so its interval can be clipped at ``t`` when the predicate is
    undecided (``refine`` holds, per case, ``("lower" | "upper", t)`` or ``None``).
    """
    if node.primitive is not prims.select_n_p or len(node.inputs) != 3:
        return None
    pred, *cases = node.inputs
    cmp = producer.get(pred) if is_bounded(pred) else None
    if cmp is None or cmp.primitive not in _COMPARE:
        return None
    a, b = cmp.inputs
    if is_bounded(a) and not is_bounded(b) and np.ndim(b.value) == 0:
        x, t, true_means_above = a, b.value, _COMPARE[cmp.primitive]
    elif is_bounded(b) and not is_bounded(a) and np.ndim(a.value) == 0:
        x, t, true_means_above = b, a.value, not _COMPARE[cmp.primitive]
    else:
        return None
    # Case 1 is taken when the predicate holds: x >= t if true_means_above, else x <= t.
    when = {
        1: "lower" if true_means_above else "upper",
        0: "upper" if true_means_above else "lower",
    }
    refine = tuple((when[i], t) if is_bounded(c) and c == x else None for i, c in enumerate(cases))
    if all(r is None for r in refine):
        return None
    return node._replace(params={**node.params, "linjax_refine": refine})


def _match_pwl(node: Node, producer: dict[int, Node]) -> Node | None:
    if node.primitive is not prims.select_n_p or len(node.inputs) != 3:
        return None
    pred, case0, case1 = node.inputs
    cmp = producer.get(pred) if is_bounded(pred) else None
    if cmp is None or cmp.primitive not in _COMPARE:
        return None
    a, b = cmp.inputs
    if is_bounded(a) and not is_bounded(b) and _is_zero(b.value):
        x, true_means_nonneg = a, _COMPARE[cmp.primitive]
    elif is_bounded(b) and not is_bounded(a) and _is_zero(a.value):
        x, true_means_nonneg = b, not _COMPARE[cmp.primitive]
    else:
        return None
    s0, s1 = _slope_of(case0, x, producer), _slope_of(case1, x, producer)
    if s0 is None or s1 is None:
        return None
    right, left = (s1, s0) if true_means_nonneg else (s0, s1)
    return Node(pwl_p, (x,), node.outputs, {"left": left, "right": right})


def _slope_of(ref: Any, x: int, producer: dict[int, Node]) -> Any:
    """``k`` if ``ref`` is ``k * x`` with a constant ``k`` that does not broadcast ``x``."""
    if ref == x and is_bounded(ref):
        return 1.0
    node = producer.get(ref) if is_bounded(ref) else None
    if node is None:
        return None
    if node.primitive is prims.neg_p and node.inputs[0] == x:
        return -1.0
    if node.primitive is prims.mul_p:
        u, v = node.inputs
        k = v if u == x and is_bounded(u) else u if v == x and is_bounded(v) else None
        if isinstance(k, Const) and np.ndim(k.value) == 0:
            return k.value
    return None


def _prune(nodes: list[Node], output: Any) -> list[Node]:
    """Drop nodes none of whose outputs reach ``output``."""
    live = {output} if is_bounded(output) else set()
    kept = []
    for node in reversed(nodes):
        if any(o in live for o in node.outputs):
            kept.append(node)
            live.update(r for r in node.inputs if is_bounded(r))
    return kept[::-1]


def lax_primitive(name: str) -> jex.Primitive | None:
    """``jax.lax.<name>_p`` if this JAX has it (some are not in ``jax.extend``)."""
    return getattr(lax, f"{name}_p", None)
