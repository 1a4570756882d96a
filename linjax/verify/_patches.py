r"""Patch-mode backward passes for the intermediate bounds of convolutional chains.

CROWN bounds every pre-activation ``v`` by a backward pass started at the identity, one
row per element of ``v``. For a convolutional feature map the dense rows ``[S, *shape]``
are almost all zero: the row of output position $(i, j)$ only touches a window of every
earlier feature map (its receptive field). In *patch mode* (auto_LiRPA's
``conv_mode="patches"``) a row keeps only that window,

$$P\,[i, j, m, a, b, c] \;=\; \Lambda_{(m, i, j)}\big[i\,s_h - o_h + a,\;
j\,s_w - o_w + b,\; c\big],$$

with $(i, j)$ the spatial position of ``v``, ``m`` = (sign, channel of ``v``), $(a, b)$
inside a window of size $p_h \times p_w$ and ``c`` the channels of the current
variable; the stride $s$ and origin $o$ are the geometry of the chain so far. Each step
is the dense step restricted to the windows:

* a convolution ``y = conv(x, W)`` (stride $t$, dilation $d$, low padding $q$): one
  matmul contracts the output channels with the kernel and the result is folded into a
  window of size $(p - 1) t + (k - 1) d + 1$; the geometry becomes $(s t,\; o t + q)$;
* an elementwise relaxation (ReLU, ...) or an affine elementwise op multiplies by its
  slopes *unfolded* to the same windows, and its offsets enter the bias through one
  batched dot per window;
* reshapes that only add or drop unit axes change nothing.

Window entries outside a feature map (zero padding) are zeroed before a convolution and
meet zero slopes and a zero box radius elsewhere, so they never contribute. At the input
the rows are concretised against the unfolded centre and radius of the box. The cost per
row is the window size, not the feature-map size: for the 2-conv CNN of
``benchmarks/verify.py`` the conv-layer pass does ~100x less arithmetic than the dense
one. Anything else on the way (an op with two bounded arguments such as a residual
add, dense layers, transposes, per-row alpha slopes) makes the pass fall back to the
dense one, which gives the same bounds.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linjax.verify import _graph
from linjax.verify import _linearize as lz
from linjax.verify._box import Box

_DIAGONAL = {"add", "sub", "neg", "mul", "div", "convert_element_type", "copy"}
_UNIT_RESHAPES = {"reshape", "squeeze", "broadcast_in_dim", "expand_dims"}


class _Step(NamedTuple):
    kind: str  # "conv", "diag", "relax" or "unit"
    node: int  # node index
    out: int  # variable the coefficients arrive at
    arg: int  # variable they leave for


class Geometry(NamedTuple):
    """Patch windows: for start position ``i`` the window starts at ``i * stride - origin``."""

    stride: tuple[int, int]
    origin: tuple[int, int]
    size: tuple[int, int]


def _nonunit(shape) -> list[int]:
    return [i for i, s in enumerate(shape) if s != 1]


def _is_unit_reshape(in_shape, out_shape) -> bool:
    sizes = [in_shape[i] for i in _nonunit(in_shape)]
    return sizes == [out_shape[i] for i in _nonunit(out_shape)]


def _map_spatial(spatial, src_shape, dst_shape):
    """Spatial axes of ``src`` as axes of ``dst`` through a unit reshape (``None`` if lost)."""
    src, dst = _nonunit(src_shape), _nonunit(dst_shape)
    if any(a not in src for a in spatial):
        return None
    return tuple(dst[src.index(a)] for a in spatial)


def _conv_ok(node: _graph.Node, avals) -> bool:
    p = node.params
    lhs, rhs = node.inputs
    dn = p["dimension_numbers"]
    return (
        _graph.is_bounded(lhs)
        and not _graph.is_bounded(rhs)
        and len(dn.lhs_spec) == 4
        and all(d == 1 for d in p["lhs_dilation"])
        and p["batch_group_count"] == 1
        and avals[lhs].shape[dn.lhs_spec[0]] == 1
    )


def _plan(prop, start: int, alpha_of) -> tuple[list[_Step], dict[int, tuple[int, int]]] | None:
    """The chain of steps from ``start`` back to the input and each variable's spatial axes."""
    graph, avals = prop.graph, prop.graph.avals
    steps: list[_Step] = []
    v = start
    while v != 0:
        idx = prop.producer[v]
        node, lin = graph.nodes[idx], prop.lins[idx]
        bounded = [r for r in node.inputs if _graph.is_bounded(r)]
        if len(bounded) != 1 or len(node.outputs) != 1:
            return None
        (arg,) = bounded
        name = node.primitive.name
        same = tuple(avals[arg].shape) == tuple(avals[v].shape)
        if isinstance(lin, lz.LinearLin) and name == "conv_general_dilated":
            if not _conv_ok(node, avals):
                return None
            kind = "conv"
        elif isinstance(lin, lz.LinearLin) and name in _DIAGONAL and same:
            kind = "diag"
        elif isinstance(lin, lz.LinearLin) and name in _UNIT_RESHAPES:
            if not _is_unit_reshape(avals[arg].shape, avals[v].shape):
                return None
            kind = "unit"
        elif isinstance(lin, lz.ElementwiseLin) and same:
            alpha = alpha_of(idx)
            if alpha is not None and jnp.ndim(alpha) > len(avals[v].shape):
                return None  # one slope per row: only the dense pass can apply it
            kind = "relax"
        else:
            return None
        steps.append(_Step(kind, idx, v, arg))
        v = arg
    if not any(s.kind == "conv" for s in steps):
        return None
    # Spatial axes: fixed by every convolution, carried through the other steps.
    spatial: dict[int, tuple[int, int]] = {}
    for s in steps:
        if s.kind == "conv":
            dn = graph.nodes[s.node].params["dimension_numbers"]
            for var, axes in ((s.out, dn.out_spec[2:]), (s.arg, dn.lhs_spec[2:])):
                if spatial.setdefault(var, tuple(axes)) != tuple(axes):
                    return None

    def across(s: _Step, src: int, dst: int):  # the spatial axes of src, as axes of dst
        if s.kind != "unit":
            return spatial[src]
        return _map_spatial(spatial[src], avals[src].shape, avals[dst].shape)

    for order in (steps, steps[::-1]):  # carry outwards in both directions
        for s in order:
            for src, dst in ((s.out, s.arg), (s.arg, s.out)):
                if s.kind != "conv" and src in spatial and dst not in spatial:
                    if (axes := across(s, src, dst)) is None:
                        return None
                    spatial[dst] = axes
    if any(s.kind != "conv" and across(s, s.out, s.arg) != spatial[s.arg] for s in steps):
        return None  # two convolutions disagree on which axes are spatial
    if any(min(avals[v].shape[a] for a in spatial[v]) < 2 for v in spatial):
        return None
    return steps, spatial


def _canonical(t: jax.Array, spatial: tuple[int, int]) -> jax.Array:
    """``t`` as ``[H, W, C]``: the spatial axes first, the others flattened in order."""
    rest = [i for i in range(t.ndim) if i not in spatial]
    t = jnp.transpose(t, (*spatial, *rest))
    return t.reshape(t.shape[:2] + (-1,))


def _inside(size: tuple[int, int], grid: tuple[int, int], geo: Geometry) -> bool:
    """Whether every window lies inside a map of ``size`` (no padding entries)."""
    return all(
        o <= 0 and (n - 1) * st - o + p <= sz
        for sz, n, st, o, p in zip(size, grid, geo.stride, geo.origin, geo.size, strict=True)
    )


def unfold(t: jax.Array, spatial, grid: tuple[int, int], geo: Geometry) -> jax.Array:
    """Windows of ``t`` at every start position: ``[Ho, Wo, ph, pw, C]``, zero outside ``t``."""
    t = _canonical(t, spatial)
    h, w, _ = t.shape
    pads, index = [], []
    for n, size, stride, origin, p in zip(
        grid, (h, w), geo.stride, geo.origin, geo.size, strict=True
    ):
        pads.append((origin, (n - 1) * stride - origin + p - size, 0))  # negative = crop
        index.append(np.arange(n)[:, None] * stride + np.arange(p)[None, :])
    tp = lax.pad(t, jnp.zeros((), t.dtype), [*pads, (0, 0, 0)])
    hi, wi = index
    return tp[hi[:, None, :, None], wi[None, :, None, :]]


def _fold(t: jax.Array, strides, dilation, size) -> jax.Array:
    """``out[.., a*s + u*d, b*s + v*d, :] += t[.., a, b, u, v, :]`` for a window of ``size``."""
    ph, pw, kh, kw = t.shape[-5:-1]
    (sh, sw), (dh, dw), (nh, nw) = strides, dilation, size
    zero = jnp.zeros((), t.dtype)
    lead = [(0, 0, 0)] * (t.ndim - 5)
    if (dh, dw) == (1, 1):
        # Taps u = s*l + r: entry a lands at s*(a + l) + r, so the window is the sum over
        # the ceil(k/s)^2 shifts l of the [ph, s] x [pw, s] grids (kernel zero-padded).
        lh, lw = -(-kh // sh), -(-kw // sw)
        t = jnp.pad(t, [(0, 0)] * (t.ndim - 3) + [(0, lh * sh - kh), (0, lw * sw - kw), (0, 0)])
        t = t.reshape(t.shape[:-3] + (lh, sh, lw, sw, t.shape[-1]))
        out = None
        for i in range(lh):
            for j in range(lw):
                piece = jnp.moveaxis(t[..., i, :, j, :, :], -3, -4)  # [.., ph, s, pw, s, C]
                pad = [(i, lh - 1 - i, 0), (0, 0, 0), (j, lw - 1 - j, 0), (0, 0, 0), (0, 0, 0)]
                piece = lax.pad(piece, zero, lead + pad)
                out = piece if out is None else out + piece
        grid = out.shape[:-5] + ((ph + lh - 1) * sh, (pw + lw - 1) * sw, out.shape[-1])
        return out.reshape(grid)[..., :nh, :nw, :]
    out = None
    for u in range(kh):  # dilated kernels: place each tap's [ph, pw] grid
        for v in range(kw):
            pad = [
                (u * dh, nh - 1 - u * dh - (ph - 1) * sh, sh - 1),
                (v * dw, nw - 1 - v * dw - (pw - 1) * sw, sw - 1),
                (0, 0, 0),
            ]
            piece = lax.pad(t[..., u, v, :], zero, lead + pad)
            out = piece if out is None else out + piece
    return out


def _conv_step(p: jax.Array, node: _graph.Node, geo: Geometry):
    """Coefficients on a conv's output windows -> on its input windows, and the new geometry.

    ``p`` is ``[Ho, Wo, M, ph, pw, C_out]``; one matmul over the output channels gives
    every (window entry, kernel tap) pair, which :func:`_fold` then places: entry ``a``
    and tap ``u`` land at ``a * stride + u * dilation`` of the input window.
    """
    params = node.params
    dn = params["dimension_numbers"]
    w = jnp.transpose(node.inputs[1].value, dn.rhs_spec)  # [O, I/g, kh, kw]
    groups = params["feature_group_count"]
    o, ig, kh, kw = w.shape
    (sh, sw), (dh, dw) = params["window_strides"], params["rhs_dilation"]
    (ph, pw), (qh, qw) = geo.size, (params["padding"][0][0], params["padding"][1][0])
    w = w.reshape(groups, o // groups, ig, kh, kw).transpose(0, 1, 3, 4, 2).astype(p.dtype)
    if groups == 1:
        t = jnp.tensordot(p, w[0], axes=1)  # [.., ph, pw, kh, kw, I]
    else:
        lead = p.shape[:-1]
        p = p.reshape(lead + (groups, o // groups))
        t = jnp.einsum("...go,gouvi->...uvgi", p, w).reshape(lead + (kh, kw, groups * ig))
    size = ((ph - 1) * sh + (kh - 1) * dh + 1, (pw - 1) * sw + (kw - 1) * dw + 1)
    out = _fold(t, (sh, sw), (dh, dw), size)
    geo = Geometry(
        (geo.stride[0] * sh, geo.stride[1] * sw),
        (geo.origin[0] * sh + qh, geo.origin[1] * sw + qw),
        size,
    )
    return out, geo


def interval(prop, box: Box, start: int, alphas, start_key) -> Box | None:
    """CROWN bounds of variable ``start`` by a patch-mode pass, or ``None`` if it does not apply.

    Same bounds as the dense pass ``_crown._crown_interval`` (the same relaxations and
    the same sums, restricted to the non-zero windows). Arrays are laid out
    ``[Ho, Wo, M, ph, pw, C]`` (start position, row, window, channel), which keeps the
    window sums contiguous.
    """

    def alpha_of(idx):
        return alphas.get((start_key, idx), alphas.get(idx)) if alphas else None

    plan = _plan(prop, start, alpha_of)
    if plan is None:
        return None
    steps, spatial = plan
    graph, avals = prop.graph, prop.graph.avals
    aval = avals[start]
    dtype = aval.dtype
    sh_axes = spatial[start]
    grid = tuple(aval.shape[a] for a in sh_axes)
    rest_shape = [aval.shape[i] for i in range(len(aval.shape)) if i not in sh_axes]
    c0 = int(np.prod(rest_shape, dtype=np.int64))
    # Rows [sign, channel] at every start position: +-identity windows of size 1.
    eye = jnp.eye(c0, dtype=dtype)
    p = jnp.broadcast_to(jnp.concatenate([eye, -eye])[:, None, None, :], (*grid, 2 * c0, 1, 1, c0))
    geo = Geometry((1, 1), (0, 0), (1, 1))
    bias = jnp.zeros((*grid, 2 * c0), dtype)
    clean = True  # every window entry outside the current map is zero

    def unf(t, var):  # [Ho, Wo, ph, pw, C]
        return unfold(jnp.broadcast_to(t, avals[var].shape), spatial[var], grid, geo)

    def rows(win):  # broadcast a window array over the rows of p
        return win[:, :, None]

    def window_dot(x, win):  # per row, the sum over its window of x [Ho, Wo, M, ...] * win
        return jnp.einsum("xymabc,xyabc->xym", x, win)

    for step in steps:
        node, lin = graph.nodes[step.node], prop.lins[step.node]
        name = node.primitive.name
        if step.kind == "conv":
            if not clean:  # zero the entries that fall in the padding of the conv's output
                p = p * rows(unf(jnp.ones((), dtype), step.out))
            p, geo = _conv_step(p, node, geo)
            clean = _inside(tuple(avals[step.arg].shape[a] for a in spatial[step.arg]), grid, geo)
        elif step.kind == "diag":
            bias = bias + window_dot(p, unf(lin.offset, step.out))
            if name == "neg" or (name == "sub" and node.inputs[1] == step.arg):
                p = -p
            elif name in ("mul", "div"):
                (diag,) = lin.vjp(jnp.ones(avals[step.out].shape, dtype))
                p = p * rows(unf(diag, step.out))
                clean = True
        elif step.kind == "relax":
            a_lows, a_ups, c_low, c_up = lin.coefficients(alpha_of(step.node))
            slot = node.inputs.index(step.arg)
            # Offsets: p+ cL + p- cU = p (cL + cU)/2 + |p| (cL - cU)/2, two window dots.
            c_low, c_up = unf(c_low, step.out), unf(c_up, step.out)
            bias = bias + window_dot(p, (c_low + c_up) / 2)
            bias = bias + window_dot(jnp.abs(p), (c_low - c_up) / 2)
            a_low, a_up = unf(a_lows[slot], step.out), unf(a_ups[slot], step.out)
            p = p * jnp.where(p >= 0, rows(a_low), rows(a_up))
            clean = True
        # "unit": the windows are unchanged; only the spatial axes were renamed
    value = window_dot(p, unf(box.center, 0)) - window_dot(jnp.abs(p), unf(box.radius, 0)) + bias
    # An infinite offset or box radius met by a zero coefficient gives NaN (0 * inf)
    # where the dense pass has 0; -inf is the sound (if vacuous) lower bound there.
    value = jnp.where(jnp.isnan(value), -jnp.inf, value)
    low, neg_high = value[..., :c0], value[..., c0:]  # [Ho, Wo, C]

    def to_var(t):
        rest = [i for i in range(len(aval.shape)) if i not in sh_axes]
        t = t.reshape(grid + tuple(rest_shape))
        return jnp.transpose(t, np.argsort((*sh_axes, *rest)))

    return Box(to_var(low), to_var(-neg_high))
