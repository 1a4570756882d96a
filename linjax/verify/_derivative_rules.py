r"""Rules for primitives that appear in derivative graphs (``jax.jacrev`` of a network).

* ``add_any`` (``add_jaxvals``): how reverse mode sums cotangents at a fan-out (residual
  connections); affine, so exact in CROWN.
* :data:`hull_select_p`: ``select_n`` on a predicate that depends on the input, as the
  derivative of ReLU-like ops is written (``select(z > 0, g, 0)``). Where the predicate
  is decided the output is the chosen case exactly; where it is not, the output lies
  between $\min(c_0, c_1)$ and $\max(c_0, c_1)$ (the Clarke hull of the two branches), and
  the CROWN rule keeps it linear in the cases: the upper line of $\max$ is
  $c_1 + \text{chord of relu}(c_0 - c_1)$, the lower line of $\min$ its mirror image.
  For ReLU' with $g \in [l, u]$, $l < 0 < u$, that is
  $\tfrac{-l}{u-l}(g - u) \le \text{relu}'(z)\,g \le \tfrac{u}{u-l}(g - l)$,
  instead of forgetting $g$ (what the generic rule does).
  The graph rewrite :func:`hull_selects` swaps it in for ``select_n`` in graphs built by
  :func:`~linjax.verify.jacobian_bounds` only, so other callers are unaffected.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.extend import core as jex
from jax.extend.core import primitives as prims

from linjax.verify import _graph
from linjax.verify._box import Box
from linjax.verify._ibp_rules import monotone, select_cases
from linjax.verify._rules import LinearRelaxation, get_rule, set_rule

#: ``select_n`` with a bounded predicate, relaxed by the hull of its two cases.
hull_select_p = jex.Primitive("linjax_hull_select")


def _ends(c, shape):
    if isinstance(c, Box):
        return jnp.broadcast_to(c.lower, shape), jnp.broadcast_to(c.upper, shape)
    v = jnp.broadcast_to(jnp.asarray(c), shape)
    return v, v


def _upper_of_max(l0, u0, l1, u1):
    """Slopes ``(a0, a1)`` and offset ``c`` with ``max(c0, c1) <= a0 c0 + a1 c1 + c``."""
    first, second = l0 >= u1, (l1 >= u0) & ~(l0 >= u1)
    ld, ud = l0 - u1, u0 - l1  # range of c0 - c1
    ok = ud > ld
    k = jnp.where(ok, ud / jnp.where(ok, ud - ld, 1), 1)
    a0 = jnp.where(first, 1.0, jnp.where(second, 0.0, k)).astype(l0.dtype)
    off = jnp.where(first | second, 0.0, -k * ld).astype(l0.dtype)
    return a0, 1 - a0, off


def _hull_select_crown(pred, *cases, out_bounds, **params):
    if len(cases) != 2:
        return get_rule(prims.select_n_p).crown(pred, *cases, out_bounds=out_bounds, **params)
    shape = jnp.shape(out_bounds.lower)
    (l0, u0), (l1, u1) = _ends(cases[0], shape), _ends(cases[1], shape)
    _, (sure0, sure1) = select_cases(pred, 2)
    sure0, sure1 = jnp.broadcast_to(sure0, shape), jnp.broadcast_to(sure1, shape)
    uA0, uA1, uc = _upper_of_max(l0, u0, l1, u1)
    # min(c0, c1) = -max(-c0, -c1) >= a0 c0 + a1 c1 - c.
    lA0, lA1, lc = _upper_of_max(-u0, -l0, -u1, -l1)
    lc = -lc
    one, zero = jnp.ones(shape, l0.dtype), jnp.zeros(shape, l0.dtype)

    def decide(a0, a1, c):
        a0 = jnp.where(sure0, one, jnp.where(sure1, zero, a0))
        a1 = jnp.where(sure1, one, jnp.where(sure0, zero, a1))
        return a0, a1, jnp.where(sure0 | sure1, zero, c)

    lA0, lA1, lc = decide(lA0, lA1, lc)
    uA0, uA1, uc = decide(uA0, uA1, uc)
    # A constant case contributes slope * value to the offset.
    low, up = [None], [None]
    for c, lo_end, a_l, a_u in ((cases[0], l0, lA0, uA0), (cases[1], l1, lA1, uA1)):
        if isinstance(c, Box):
            low.append(a_l)
            up.append(a_u)
        else:
            low.append(None)
            up.append(None)
            lc = lc + a_l * lo_end
            uc = uc + a_u * lo_end
    return LinearRelaxation(tuple(low), lc, tuple(up), uc)


def hull_selects(graph: _graph.Graph) -> _graph.Graph:
    """``graph`` with every float ``select_n`` on a bounded predicate using the hull rule."""
    nodes = []
    for node in graph.nodes:
        if (
            node.primitive is prims.select_n_p
            and _graph.is_bounded(node.inputs[0])
            and jnp.issubdtype(graph.avals[node.outputs[0]].dtype, jnp.floating)
        ):
            node = node._replace(primitive=hull_select_p)
        nodes.append(node)
    return graph._replace(nodes=nodes)


def _register():
    set_rule(prims.add_jaxvals_p, ibp=monotone(prims.add_jaxvals_p), linear=True)
    set_rule(hull_select_p, ibp=get_rule(prims.select_n_p).ibp, crown=_hull_select_crown)


_register()
