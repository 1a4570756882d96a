"""Bounding step of branch and bound: one jitted, vmapped call per batch of sub-domains.

A sub-domain is a box plus *clamps* on pre-activation variables (ReLU splits): for each
split variable ``r``, arrays ``(lo, hi)`` of its shape (``-inf``/``inf`` where free).
``_crown.propagate`` intersects the variable's bounds with them, so the relaxation of
the ReLU that consumes it is exact on the split neurons and every bound holds on the
sub-domain. For each sub-domain the step returns the margin lower bound, branching
scores (input coordinates and unstable neurons) and the best point of a short PGD run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from linjax.verify import _graph
from linjax.verify import _linearize as lz
from linjax.verify._alpha_crown import _optimise, _sites
from linjax.verify._attack import pgd
from linjax.verify._box import Box
from linjax.verify._crown import concretize, propagate
from linjax.verify._property import margin_of, reduce_rows


class Site(NamedTuple):
    """A ReLU-like node (free pivot slope) whose argument ``var`` can be split at ``px``."""

    node: int
    var: int
    px: Any


class Bounded(NamedTuple):
    """Per sub-domain results of one bounding call (leading batch axis under vmap)."""

    lower: jax.Array  # margin lower bound (inf for an empty sub-domain)
    input_score: jax.Array  # [*in_shape]
    relu_score: dict  # var -> [*shape], -inf where not splittable
    x_adv: jax.Array  # [*in_shape], inside the box
    m_adv: jax.Array  # margin at x_adv


def find_sites(graph: _graph.Graph, prop_root) -> list[Site]:
    """ReLU-like nodes with a free slope whose bounded argument has the output's shape."""
    sites = []
    for idx, lin in enumerate(prop_root.lins):
        if not (isinstance(lin, lz.ElementwiseLin) and lin.freedom is not None):
            continue
        var = graph.nodes[idx].inputs[lin.slot]
        if not _graph.is_bounded(var) or var == 0:
            continue  # splitting the input itself is input splitting
        shape = tuple(graph.avals[var].shape)
        if tuple(jnp.shape(lin.freedom.px)) != shape:
            continue
        sites.append(Site(idx, var, lin.freedom.px))
    return sites


def _backward_record(prop, start: int, lam0: jax.Array, nodes: set[int], alphas=None, inject=None):
    """``_crown.backward``, also returning the coefficients at ``nodes``.

    ``alphas`` maps node indices to slopes ``[rows, *shape]``; ``inject`` maps variables
    to extra coefficients (the beta-CROWN split terms) added to the objective.
    """
    graph, avals = prop.graph, prop.graph.avals
    rows = lam0.shape[0]
    lams = {start: lam0}
    for r, lam in (inject or {}).items():
        lams[r] = lams[r] + lam if r in lams else lam
    bias = jnp.zeros((rows,), lam0.dtype)
    seen = {}
    for idx in range(prop.producer[start], -1, -1):
        node = graph.nodes[idx]
        outs = [lams.pop(o, None) for o in node.outputs]
        if all(lam is None for lam in outs):
            continue
        if idx in nodes:
            seen[idx] = outs[0]
        lam_ins, b = prop.lins[idx](outs, None if alphas is None else alphas.get(idx))
        bias = bias + b
        for r, li in zip(node.inputs, lam_ins, strict=True):
            if li is not None and _graph.is_bounded(r):
                lams[r] = lams[r] + li if r in lams else li
    lam_x = lams.pop(0, None)
    if lam_x is None:
        lam_x = jnp.zeros((rows,) + tuple(avals[0].shape), avals[0].dtype)
    return lam_x, bias, seen


def beta_crown(graph, box: Box, lam0, splits: dict, *, steps: int, lr, intermediate: str):
    r"""Lower bounds ``[S]`` of ``lam0 . f`` on a ReLU-split sub-domain (alpha-beta-CROWN).

    The sub-domain is $\{x \in B : lo \le z_r(x) \le hi\}$ for the clamped variables.
    For multipliers $\beta^{lo}, \beta^{hi} \ge 0$, on it
    $c^\top f \ge c^\top f - \beta^{lo} \cdot (z - lo) - \beta^{hi} \cdot (hi - z)$,
    whose CROWN lower bound over the whole box (relaxations from the clamped bounds) is
    maximised jointly over the free slopes (alpha) and $\beta$ by projected Adam,
    keeping the best value per row. $\beta = 0$ is plain alpha-CROWN on the clamped
    bounds (the starting point), so the result is never looser than that.
    """
    s = lam0.shape[0]
    keys, inits, lows, highs = _sites(graph, box, intermediate, s, splits)
    masks = {r: (jnp.isfinite(lo), jnp.isfinite(hi)) for r, (lo, hi) in splits.items()}
    ends = {
        r: (jnp.where(ml, lo, 0), jnp.where(mh, hi, 0))
        for (r, (lo, hi)), (ml, mh) in zip(splits.items(), masks.values(), strict=True)
    }
    betas0 = {r: (jnp.zeros((s,) + lo.shape, lo.dtype),) * 2 for r, (lo, _) in splits.items()}

    def lower(params):
        alist, betas = params
        alphas = dict(zip(keys, alist, strict=True)) if keys else None
        p = propagate(graph, box, intermediate=intermediate, alphas=alphas, splits=splits)
        out_alphas = {idx: a[:s] for (k, idx), a in (alphas or {}).items() if k == "output"}
        inject, extra = {}, jnp.zeros((s,), lam0.dtype)
        for r, (b_lo, b_hi) in betas.items():
            (ml, mh), (lo, hi) = masks[r], ends[r]
            b_lo, b_hi = jnp.where(ml, b_lo, 0), jnp.where(mh, b_hi, 0)
            inject[r] = b_hi - b_lo
            extra = extra + lz.row_sum(b_lo * lo - b_hi * hi)
        lam_x, bias, _ = _backward_record(p, graph.output, lam0, set(), out_alphas, inject)
        return concretize(lam_x, bias + extra, box)

    params = (list(inits), betas0)
    if not keys and not splits:
        return lower(params)
    opt = optax.adam(lr)

    def objective(params):
        low = lower(params)
        return jnp.where(jnp.isfinite(low), low, 0).sum(), low

    grad = jax.value_and_grad(objective, has_aux=True)

    def project(params):
        alist, betas = params
        alist = [jnp.clip(a, lo, hi) for a, lo, hi in zip(alist, lows, highs, strict=True)]
        return alist, jax.tree.map(lambda b: jnp.maximum(b, 0), betas)

    def step(carry, _):
        params, state, best = carry
        (_, low), g = grad(params)
        g = jax.tree.map(lambda v: jnp.where(jnp.isfinite(v), v, 0), g)
        g = jax.tree.map(jnp.negative, g)  # ascent
        upd, state = opt.update(g, state, params)
        params = project(optax.apply_updates(params, upd))
        return (params, state, jnp.maximum(best, jnp.where(jnp.isnan(low), -jnp.inf, low))), None

    best0 = jnp.full((s,), -jnp.inf, lam0.dtype)
    (params, _, best), _ = jax.lax.scan(step, (params, opt.init(params), best0), None, steps)
    low = lower(params)
    return jnp.maximum(best, jnp.where(jnp.isnan(low), -jnp.inf, low))


def _pivot_gap(lin, lam: jax.Array, px: jax.Array) -> jax.Array:
    """Per neuron, how much the relaxation's gap at the pivot costs the bound (``>= 0``)."""
    fr = lin.freedom
    aL, aU = lin.aL[lin.slot], lin.aU[lin.slot]
    gap_l = aL * px + lin.cL - fr.py  # <= 0: lower line below the pivot
    gap_u = aU * px + lin.cU - fr.py  # >= 0: upper line above the pivot
    cost = jnp.maximum(lam, 0) * gap_l + jnp.minimum(lam, 0) * gap_u
    return jnp.where(fr.crossing, -cost, 0)


def make_bounder(
    fn: Callable,
    like: jax.ShapeDtypeStruct,
    out_shape: tuple,
    sites: list[Site],
    *,
    method: str,
    intermediate: str,
    steps: int,
    lr: float,
    attack_steps: int,
) -> Callable:
    """``jit(vmap(one))`` with ``one(lower, upper, clamps, spec, threshold, mask) -> Bounded``.

    The property (``spec`` ``[S, n_out]``, ``threshold`` ``[S]``, ``mask`` ``[G, S]``) is
    an argument shared by the batch, so one compilation serves every property of a shape.
    """
    site_nodes = {s.node for s in sites}
    split_vars = sorted({s.var for s in sites})

    def one(lower, upper, clamps, spec, threshold, mask):
        box = Box(lower, upper)

        def margin(x):
            return margin_of(fn, x, spec, threshold, mask)

        splits = {r: clamps[r] for r in split_vars} or None
        with jax.default_matmul_precision("highest"):
            graph = _graph.trace(fn, like)
            inter = "ibp" if method == "ibp" else intermediate
            p = propagate(graph, box, intermediate=inter, splits=splits)
            # An interval with lower > upper (beyond rounding) proves the sub-domain empty.
            tol = jnp.sqrt(jnp.finfo(lower.dtype).eps)
            empty = jnp.zeros((), bool)
            for b in p.bounds.values():
                slack = tol * (1 + jnp.abs(b.lower) + jnp.abs(b.upper))
                empty = empty | jnp.any(b.lower > b.upper + slack)
            lam0 = spec.reshape((spec.shape[0],) + out_shape)
            lam_x, bias, seen = _backward_record(p, graph.output, lam0, site_nodes)
            lb = concretize(lam_x, bias, box)
            if method == "ibp":
                ob = p.bounds[graph.output]
                lo, hi = ob.lower.reshape(-1), ob.upper.reshape(-1)
                lb = jnp.maximum(spec, 0) @ lo + jnp.minimum(spec, 0) @ hi
            elif method == "alpha-crown" and splits:
                beta = beta_crown(
                    graph, box, lam0, splits, steps=steps, lr=lr, intermediate=intermediate
                )
                lb = jnp.maximum(lb, beta)
            elif method == "alpha-crown":
                opt = _optimise(
                    fn, box, spec, lr, steps=steps, intermediate=intermediate, splits=splits
                )
                lb = jnp.maximum(lb, opt.lower)
        v = lb - threshold
        v = jnp.where(jnp.isnan(v), -jnp.inf, v)
        low = jnp.where(empty, jnp.inf, reduce_rows(v, mask))
        # Critical row: the best row of the worst group (the one to improve).
        per_group = jnp.max(jnp.where(mask, v[None], -jnp.inf), axis=1)
        g = jnp.argmin(per_group)
        k = jnp.argmax(jnp.where(mask[g], v, -jnp.inf))
        lam_k = lam_x[k]
        input_score = jnp.abs(lam_k) * (upper - lower)
        relu_score = {r: jnp.full(like_shape(graph, r), -jnp.inf, lower.dtype) for r in split_vars}
        for s in sites:
            lin = p.lins[s.node]
            lam = seen[s.node][k] if s.node in seen else jnp.zeros_like(lin.cL)
            b = p.bounds[s.var]
            bal = jnp.minimum(b.upper - s.px, s.px - b.lower) / jnp.maximum(
                b.upper - b.lower, 1e-30
            )
            score = _pivot_gap(lin, lam, s.px) + 1e-6 * bal
            score = jnp.where(lin.freedom.crossing, score, -jnp.inf)
            relu_score[s.var] = jnp.maximum(relu_score[s.var], score)
        # Candidates: the minimiser of the critical row's linear bound and the centre.
        vertex = jnp.where(lam_k > 0, lower, upper)
        x0 = jnp.stack([vertex, box.center])
        xs, ms = pgd(margin, box, x0, attack_steps, 4 * (upper - lower) / attack_steps)
        ms = jnp.where(jnp.isnan(ms), jnp.inf, ms)
        i = jnp.argmin(ms)
        return Bounded(low, input_score, relu_score, xs[i], ms[i])

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None, None)))


def like_shape(graph: _graph.Graph, var: int) -> tuple[int, ...]:
    return tuple(graph.avals[var].shape)
