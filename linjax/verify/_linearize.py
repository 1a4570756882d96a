r"""Per-node linearizations: the backward (CROWN) step of one equation.

A linearization is built once per node and call of :func:`crown`, from the bounds of its
arguments, and then applied in every backward pass that crosses the node. Called with
``lams`` (one ``[S, *out_shape]`` array per output, ``None`` where no coefficient flows
back) it returns coefficients for the arguments and a bias ``[S]`` such that

$$\sum \Lambda \cdot y \;\ge\; \sum_i \sum \Lambda_i \cdot x_i + \text{bias}$$

for every point of the argument boxes. Upper bounds are lower bounds of $-C f$, so one
convention serves both (rows of ``lams`` are ``[C; -C]``).

* :class:`LinearLin`: exact, for ops affine in their bounded arguments; $\Lambda_i$ is
  the VJP of the op applied to each row (``vmap`` over rows), bias
  $\Lambda \cdot g(0)$.
* :class:`ElementwiseLin`: from a :class:`~linjax.verify.LinearRelaxation`;
  $\Lambda_i = \Lambda^+ a^L_i + \Lambda^- a^U_i$ (summed over broadcast axes),
  bias $\Lambda^+ c^L + \Lambda^- c^U$. Accepts ``alpha`` (free lower slopes at crossing
  ReLU-like neurons) for alpha-CROWN.
* :class:`ConcretizeLin`: the fallback; the output is a fresh variable in its interval.
* :class:`BackwardLin`: wraps a rule's own backward function.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linjax.verify._box import Box
from linjax.verify._relaxations import PivotFreedom
from linjax.verify._rules import LinearRelaxation


def unbroadcast(lam: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum ``lam`` ``[S, *out]`` over the axes along which ``shape`` was broadcast."""
    extra = lam.ndim - 1 - len(shape)
    if extra:
        lam = lam.sum(axis=tuple(range(1, 1 + extra)))
    axes = tuple(
        i + 1 for i, (s, t) in enumerate(zip(shape, lam.shape[1:], strict=True)) if s == 1 != t
    )
    return lam.sum(axis=axes, keepdims=True) if axes else lam


def safe_mul(lam: jax.Array, c: jax.Array) -> jax.Array:
    """``lam * c`` with ``0 * inf = 0`` (an infinite offset with no weight costs nothing)."""
    return jnp.where(lam == 0, 0, lam * c)


def row_sum(v: jax.Array) -> jax.Array:
    """Sum over all but the leading (row) axis."""
    return v.reshape(v.shape[0], -1).sum(axis=1)


def _phase_taps(stride: int, k: int) -> tuple[int, np.ndarray]:
    """Taps ``s * (L - 1 - a) + r`` of each phase ``r`` (``k`` marks a zero tap)."""
    taps = -(-k // stride)
    tab = np.array([[stride * (taps - 1 - a) + r for a in range(taps)] for r in range(stride)])
    return taps, np.where(tab < k, tab, k)


def strided_conv_transpose(params: dict, w: jax.Array, lhs_shape, out_shape) -> Callable | None:
    r"""The VJP of a strided 2-D ``conv_general_dilated`` in its input, as one stride-1 conv.

    XLA computes this VJP as a convolution with an input dilated by the stride, which is
    slow on CPU. With $n + q = s p + r$ ($q$ the low padding), input element $n$ gets
    $\sum_j W[s j + r]\, \bar y[p - j]$: for every phase $r$ a stride-1 correlation of
    $\bar y$ with a $\lceil k/s \rceil$-tap kernel. All phases are the output channels of
    one undilated convolution, then interleaved (sub-pixel shuffle) and cropped. Returns
    ``None`` where this does not apply (stride 1, dilations, groups, negative padding).
    """
    dn = params["dimension_numbers"]
    strides, pads = params["window_strides"], params["padding"]
    if (
        len(dn.lhs_spec) != 4
        or all(s == 1 for s in strides)
        or any(d != 1 for d in (*params["lhs_dilation"], *params["rhs_dilation"]))
        or params["feature_group_count"] != 1
        or params["batch_group_count"] != 1
        or any(lo < 0 for lo, _ in pads)
    ):
        return None
    w = jnp.transpose(w, dn.rhs_spec)  # [O, I, kh, kw]
    o, i, kh, kw = w.shape
    (sh, sw), (qh, qw) = strides, (pads[0][0], pads[1][0])
    nh, nw = (lhs_shape[a] for a in dn.lhs_spec[2:])
    hy, wy = (out_shape[a] for a in dn.out_spec[2:])
    (lh, th), (lw, tw) = _phase_taps(sh, kh), _phase_taps(sw, kw)
    ph, pw = -(-(qh + nh) // sh), -(-(qw + nw) // sw)
    w = jnp.pad(w, ((0, 0), (0, 0), (0, 1), (0, 1)))  # index k -> a zero tap
    kern = w[:, :, th[:, None, :, None], tw[None, :, None, :]]  # [O, I, sh, sw, lh, lw]
    kern = kern.transpose(0, 2, 3, 1, 4, 5).reshape(o, sh * sw * i, lh, lw)

    def transpose(ct: jax.Array) -> jax.Array:
        y = jnp.transpose(ct, dn.out_spec)  # [B, O, hy, wy]
        b = y.shape[0]
        pad = [(0, 0, 0), (0, 0, 0), (lh - 1, ph - hy, 0), (lw - 1, pw - wy, 0)]
        y = lax.pad(y, jnp.zeros((), y.dtype), pad)
        z = lax.conv_general_dilated(
            y, kern.astype(y.dtype), (1, 1), "VALID", dimension_numbers=("NCHW", "IOHW", "NCHW")
        )  # [B, (sh, sw, I), ph, pw]
        z = z.reshape(b, sh, sw, i, ph, pw).transpose(0, 3, 4, 1, 5, 2)
        z = z.reshape(b, i, ph * sh, pw * sw)[:, :, qh : qh + nh, qw : qw + nw]
        return jnp.transpose(z, np.argsort(dn.lhs_spec))

    return transpose


# Ops that map 0 to 0 when their only bounded argument is 0 (the others multiply it or
# select parts of it): their bias is zero, so no pass over the coefficients is spent on it.
_HOMOGENEOUS = {
    "reshape", "squeeze", "expand_dims", "broadcast_in_dim", "transpose", "rev", "slice",
    "dynamic_slice", "reduce_sum", "cumsum", "neg", "copy", "convert_element_type",
    "reduce_precision", "mul", "div", "dot_general", "conv_general_dilated",
}  # fmt: skip


class LinearLin:
    """Exact backward step of an op affine in its bounded arguments (through its VJP)."""

    def __init__(self, prim, params: dict, args: list, in_avals: list):
        self.bounded = [isinstance(a, Box) for a in args]
        self.multiple = prim.multiple_results
        self.homogeneous = sum(self.bounded) == 1 and prim.name in _HOMOGENEOUS

        def f(*bvals):
            it = iter(bvals)
            full = [next(it) if b else a for a, b in zip(args, self.bounded, strict=True)]
            out = prim.bind(*full, **params)
            return list(out) if self.multiple else out

        zeros = [
            jnp.zeros(av.shape, av.dtype) for av, b in zip(in_avals, self.bounded, strict=True) if b
        ]
        # For an affine op the VJP does not depend on the point; at 0 the primal is g(0).
        self.offset, self.vjp = jax.vjp(f, *zeros)
        self.conv_t = None
        if prim is lax.conv_general_dilated_p and self.bounded == [True, False]:
            self.conv_t = strided_conv_transpose(
                params, args[1], in_avals[0].shape, self.offset.shape
            )

    def __call__(self, lams: list, alpha: Any = None):
        offsets = self.offset if self.multiple else [self.offset]
        rows = next(lam.shape[0] for lam in lams if lam is not None)
        full = [
            lam if lam is not None else jnp.zeros((rows,) + o.shape, o.dtype)
            for lam, o in zip(lams, offsets, strict=True)
        ]
        if self.homogeneous:
            bias = jnp.zeros((rows,), full[0].dtype)
        else:
            bias = sum(row_sum(lam * o) for lam, o in zip(full, offsets, strict=True))
        ct = full if self.multiple else full[0]
        if self.conv_t is not None:
            return [jax.vmap(self.conv_t)(ct), None], bias
        lam_b = iter(jax.vmap(self.vjp)(ct))
        lam_ins = [next(lam_b) if b else None for b in self.bounded]
        return lam_ins, bias


class ConcretizeLin:
    """Fallback: treat each output as a fresh variable ranging over its interval."""

    def __init__(self, out_bounds: list[Box], num_inputs: int):
        self.out_bounds = out_bounds
        self.num_inputs = num_inputs

    def __call__(self, lams: list, alpha: Any = None):
        bias = 0
        for lam, b in zip(lams, self.out_bounds, strict=True):
            if lam is not None:
                lp, ln = jnp.maximum(lam, 0), jnp.minimum(lam, 0)
                bias = bias + row_sum(safe_mul(lp, b.lower) + safe_mul(ln, b.upper))
        return [None] * self.num_inputs, bias


def _per_input(slopes: Any, bounded: list[bool], name: str) -> list:
    if isinstance(slopes, (tuple, list)):
        if len(slopes) != len(bounded):
            raise ValueError(
                f"the CROWN rule of '{name}' returned {len(slopes)} slopes for "
                f"{len(bounded)} arguments (give one per argument, None for constants)"
            )
        return [s if b else None for s, b in zip(slopes, bounded, strict=True)]
    if sum(bounded) != 1:
        raise ValueError(
            f"the CROWN rule of '{name}' returned a single slope but {sum(bounded)} arguments "
            "are bounded; return a tuple with one slope per argument"
        )
    return [slopes if b else None for b in bounded]


def _offset_bias(lam: jax.Array, mag: jax.Array, c_low: jax.Array, c_up: jax.Array):
    r"""Per row $\sum \Lambda^+ c^L + \Lambda^- c^U$, with $0 \cdot \infty = 0$.

    An infinite offset that meets a non-zero coefficient of its side makes the row's bias
    $-\infty$ (the line is vacuous there); the finite offsets go through
    $\Lambda (c^L + c^U)/2 + |\Lambda| (c^L - c^U)/2$.
    """
    inf_l, inf_u = ~jnp.isfinite(c_low), ~jnp.isfinite(c_up)
    c_low, c_up = jnp.where(inf_l, 0, c_low), jnp.where(inf_u, 0, c_up)
    cols = [(c_low + c_up) / 2, inf_l.astype(lam.dtype), inf_u.astype(lam.dtype)]
    cols_mag = [(c_low - c_up) / 2, cols[1], cols[2]]
    rows = lam.shape[0]
    if c_low.ndim == lam.ndim:  # per-row offsets (per-row alpha slopes)
        s = jnp.stack([row_sum(lam * c) for c in cols], axis=1)
        m = jnp.stack([row_sum(mag * c) for c in cols_mag], axis=1)
    else:
        s = lam.reshape(rows, -1) @ jnp.stack([c.reshape(-1) for c in cols], axis=1)
        m = mag.reshape(rows, -1) @ jnp.stack([c.reshape(-1) for c in cols_mag], axis=1)
    # lam+ = (lam + |lam|)/2 meets an infinite lower offset; -lam- = (|lam| - lam)/2 an upper.
    hit = (s[:, 1] + m[:, 1] > 0) | (m[:, 2] - s[:, 2] > 0)
    return jnp.where(hit, -jnp.inf, s[:, 0] + m[:, 0])


class ElementwiseLin:
    """Backward step from elementwise linear bounds, with an optional free pivot slope."""

    def __init__(
        self,
        relax: LinearRelaxation,
        args: list,
        out: Box,
        name: str,
        freedom: PivotFreedom | None = None,
    ):
        bounded = [isinstance(a, Box) for a in args]
        shape, dtype = out.lower.shape, out.lower.dtype
        self.in_shapes = [jnp.shape(a.lower) if isinstance(a, Box) else None for a in args]

        def full(v):
            return jnp.broadcast_to(jnp.asarray(v, dtype), shape)

        aL = [None if s is None else full(s) for s in _per_input(relax.lower_slopes, bounded, name)]
        aU = [None if s is None else full(s) for s in _per_input(relax.upper_slopes, bounded, name)]
        cL, cU = full(relax.lower_offset), full(relax.upper_offset)
        # Where a line is not finite (a pole, an overflow, an unbounded input), use the
        # concrete output interval instead: slope 0, offset = the IBP bound.
        bad_l = ~jnp.isfinite(cL)
        bad_u = ~jnp.isfinite(cU)
        for a in aL:
            bad_l = bad_l if a is None else bad_l | ~jnp.isfinite(a)
        for a in aU:
            bad_u = bad_u if a is None else bad_u | ~jnp.isfinite(a)
        self.aL = [None if a is None else jnp.where(bad_l, 0, a) for a in aL]
        self.aU = [None if a is None else jnp.where(bad_u, 0, a) for a in aU]
        self.cL = jnp.where(bad_l, out.lower, cL)
        self.cU = jnp.where(bad_u, out.upper, cU)
        self.freedom = None
        if freedom is not None:
            # Only slopes at finite, crossing elements of the single bounded input are free.
            self.freedom = freedom._replace(crossing=freedom.crossing & ~bad_l & ~bad_u)
            self.slot = bounded.index(True)

    @property
    def alpha_init(self) -> jax.Array | None:
        """The pivot slope CROWN chose (alpha-CROWN's starting point), or ``None``."""
        return None if self.freedom is None else self.freedom.init

    def coefficients(self, alpha: Any = None) -> tuple[list, list, jax.Array, jax.Array]:
        """``(aL, aU, cL, cU)``: per-argument slopes (``None`` for constants) and offsets.

        With ``alpha``, the lower (convex side) or upper line of every crossing element is
        the pivot line of slope ``alpha`` (clipped to its valid range).
        """
        aL, aU, cL, cU = list(self.aL), list(self.aU), self.cL, self.cU
        if alpha is not None and self.freedom is not None:
            fr = self.freedom
            s = jnp.clip(alpha, fr.slope_min, fr.slope_max)
            off = fr.py - s * fr.px
            low, up = fr.crossing & fr.convex, fr.crossing & ~fr.convex
            aL[self.slot] = jnp.where(low, s, aL[self.slot])
            cL = jnp.where(low, off, cL)
            aU[self.slot] = jnp.where(up, s, aU[self.slot])
            cU = jnp.where(up, off, cU)
        return aL, aU, cL, cU

    def __call__(self, lams: list, alpha: Any = None):
        (lam,) = lams
        aL, aU, cL, cU = self.coefficients(alpha)
        # One product per element (the line of lam's sign), exact like lam+ a + lam- b;
        # the offsets enter through two matrix products.
        pos = lam >= 0
        lam_ins = [
            None if a is None else unbroadcast(lam * jnp.where(pos, a, b), s)
            for a, b, s in zip(aL, aU, self.in_shapes, strict=True)
        ]
        return lam_ins, _offset_bias(lam, jnp.abs(lam), cL, cU)


class BackwardLin:
    """Wraps a rule's ``backward(lam) -> (lam_args, bias)`` (``lam`` a list if several outputs)."""

    def __init__(self, fn: Callable, multiple: bool, num_inputs: int, name: str):
        self.fn, self.multiple, self.num_inputs, self.name = fn, multiple, num_inputs, name

    def __call__(self, lams: list, alpha: Any = None):
        out = self.fn(lams if self.multiple else lams[0])
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"the CROWN backward function of '{self.name}' must return (lam_args, bias)"
            )
        lam_ins, bias = out
        lam_ins = list(lam_ins)
        if len(lam_ins) != self.num_inputs:
            raise ValueError(
                f"the CROWN backward function of '{self.name}' returned {len(lam_ins)} "
                f"coefficients for {self.num_inputs} arguments"
            )
        return lam_ins, bias
