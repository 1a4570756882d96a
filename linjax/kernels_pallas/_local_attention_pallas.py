"""Pallas flash attention restricted to a 1-D window: forward, dq and dk/dv kernels.

Layout inside the kernels is ``[batch * heads, seq, dim]`` so that a tile is
``(block, dim)``: the last two block dims are a multiple of 8 and the full head dim, as
Mosaic TPU requires, and contiguous rows for Triton. Keys and values are passed as
whole-sequence blocks (pointer arithmetic on GPU) and each program walks only the key
blocks that intersect its window with a ``lax.fori_loop`` over dynamic slices: for query
block ``[i0, i0 + b)`` that is key blocks ``(i0 - w + 1) // b`` to ``(i0 + b - 1) // b``
(causal), at most ``ceil((w + b - 1) / b) + 1`` of them (reference/kernels.md §4.2, §5.1).

Forward (FlashAttention-2, Algorithm 1): online softmax with running max ``m``, sum ``l``
and accumulator in float32; it also writes ``lse = m + log l`` for the backward pass.
Backward (Algorithm 2), with ``delta = rowsum(o * do)`` computed in XLA: a ``dq`` kernel
over query blocks (same key ranges) and a ``dk, dv`` kernel over key blocks, which visits
query blocks ``k0 // b .. (k0 + b - 1 + w - 1) // b``. Probabilities are recomputed as
``exp(s - lse)`` with the mask applied *before* the exponential. Residuals are q, k, v, o
and the ``[seq]`` log-sum-exp: no ``O(T^2)`` or ``O(T w)`` tensor is saved.

Grouped-query attention: the key/value ``index_map`` picks head ``h // groups``; ``dk``
and ``dv`` are produced per query head and summed over each group in XLA.

The kernels are generic block-sparse flash attention: which blocks a program visits and the
in-block mask come from a static *pattern* (:class:`Window1D` here; the 2-D CLEAR window of
:mod:`._local_attention_2d_pallas` is another) with ``kv_ranges(i)`` (key-block ranges of
query block ``i``), ``q_ranges(j)`` (query-block ranges of key block ``j``) and
``visible(i, j)`` (the ``[block, block]`` mask).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linjax.kernels_pallas import _checks, _compat

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class Window1D:
    """Pattern of the 1-D window over a sequence padded to whole blocks."""

    window: int
    causal: bool
    block: int
    seq_len: int  # true length; the arrays are padded to a multiple of ``block``
    padded_len: int

    @property
    def num_blocks(self) -> int:
        return self.padded_len // self.block

    def visible(self, q_block, k_block):
        """``[block, block]`` window mask between query block ``q_block`` and key block."""
        shape = (self.block, self.block)
        qpos = q_block * self.block + lax.broadcasted_iota(jnp.int32, shape, 0)
        kpos = k_block * self.block + lax.broadcasted_iota(jnp.int32, shape, 1)
        diff = qpos - kpos
        mask = (diff < self.window) & ((diff >= 0) if self.causal else (diff > -self.window))
        if self.padded_len != self.seq_len:
            mask = mask & (kpos < self.seq_len)
        return mask

    def kv_ranges(self, q_block):
        """Key blocks ``[lo, hi)`` that intersect the windows of query block ``q_block``."""
        b = jnp.int32(self.block)
        q_start = q_block * b
        lo = lax.div(jnp.maximum(q_start - (self.window - 1), 0), b)
        last = q_start + b - 1 + (0 if self.causal else self.window - 1)
        hi = jnp.minimum(lax.div(last, b) + 1, self.num_blocks)
        return [(lo, hi)]

    def q_ranges(self, k_block):
        """Query blocks ``[lo, hi)`` whose windows reach into key block ``k_block``."""
        b = jnp.int32(self.block)
        k_start = k_block * b
        first = k_start if self.causal else jnp.maximum(k_start - (self.window - 1), 0)
        lo = lax.div(first, b)
        hi = jnp.minimum(lax.div(k_start + b - 1 + self.window - 1, b) + 1, self.num_blocks)
        return [(lo, hi)]

    def keys_per_query(self) -> int:
        """Visible keys per query, for cost estimates."""
        return min(self.window, self.seq_len) * (1 if self.causal else 2)


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    """Static description of one call (hashable: it keys the jit cache)."""

    pattern: Any  # Window1D or another pattern with the same methods
    scale: float
    heads: int
    kv_heads: int
    name: str = "local_attention"

    @property
    def block(self) -> int:
        return self.pattern.block

    @property
    def num_blocks(self) -> int:
        return self.pattern.num_blocks

    @property
    def padded_len(self) -> int:
        return self.pattern.padded_len

    @property
    def groups(self) -> int:
        return self.heads // self.kv_heads


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _default_block(seq_len: int) -> int:
    return min(128, max(16, pl.next_power_of_2(seq_len)))


def _precision(dtype) -> lax.Precision:
    # Full-precision inputs get full-precision products (no TF32 / bf16 passes).
    return lax.Precision.DEFAULT if jnp.dtype(dtype).itemsize < 4 else lax.Precision.HIGHEST


def _dot(a, b, acc, *, trans_a=False, trans_b=False):
    """``a @ b`` (optionally transposed operands) accumulated in ``acc``."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(a, b, dims, precision=_precision(a.dtype), preferred_element_type=acc)


def _loop(ranges, body, carry):
    """Run ``body(j, carry)`` for ``j`` in each ``[lo, hi)`` of ``ranges`` in turn."""
    for lo, hi in ranges:
        carry = lax.fori_loop(lo, hi, body, carry)
    return carry


def _fwd_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: FlashConfig):
    b = cfg.block
    i = pl.program_id(1)
    q = q_ref[...]
    acc_t = _checks.accum_dtype(q.dtype)

    def body(j, carry):
        m, l, acc = carry
        start = pl.multiple_of(j * b, b)
        k = k_ref[pl.ds(start, b), :]
        v = v_ref[pl.ds(start, b), :]
        s = _dot(q, k, acc_t, trans_b=True) * cfg.scale
        s = jnp.where(cfg.pattern.visible(i, j), s, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new)
        l = correction * l + jnp.sum(p, axis=1, keepdims=True)
        acc = correction * acc + _dot(p.astype(v.dtype), v, acc_t)
        return m_new, l, acc

    m0 = jnp.full((b, 1), MASK_VALUE, acc_t)
    l0 = jnp.zeros((b, 1), acc_t)
    acc0 = jnp.zeros((b, v_ref.shape[-1]), acc_t)
    m, l, acc = _loop(cfg.pattern.kv_ranges(i), body, (m0, l0, acc0))
    # Every real query sees itself, so l >= 1 after the loop (FlashAttention-2 §3.1.1).
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: FlashConfig):
    b = cfg.block
    i = pl.program_id(1)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    acc_t = _checks.accum_dtype(q.dtype)

    def body(j, dq):
        start = pl.multiple_of(j * b, b)
        k = k_ref[pl.ds(start, b), :]
        v = v_ref[pl.ds(start, b), :]
        s = _dot(q, k, acc_t, trans_b=True) * cfg.scale
        # Mask before exp: a hidden score may exceed lse by any amount.
        p = jnp.exp(jnp.where(cfg.pattern.visible(i, j), s - lse, -jnp.inf))
        ds = p * (_dot(do, v, acc_t, trans_b=True) - delta)
        return dq + _dot(ds.astype(k.dtype), k, acc_t)

    dq = _loop(cfg.pattern.kv_ranges(i), body, jnp.zeros((b, q.shape[-1]), acc_t))
    dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg):
    b = cfg.block
    j = pl.program_id(1)
    k, v = k_ref[...], v_ref[...]
    acc_t = _checks.accum_dtype(k.dtype)

    def body(i, carry):
        dk, dv = carry
        start = pl.multiple_of(i * b, b)
        q = q_ref[pl.ds(start, b), :]
        do = do_ref[pl.ds(start, b), :]
        lse = lse_ref[pl.ds(start, b), :]
        delta = delta_ref[pl.ds(start, b), :]
        s = _dot(q, k, acc_t, trans_b=True) * cfg.scale
        p = jnp.exp(jnp.where(cfg.pattern.visible(i, j), s - lse, -jnp.inf))
        dv = dv + _dot(p.astype(do.dtype), do, acc_t, trans_a=True)
        ds = p * (_dot(do, v, acc_t, trans_b=True) - delta)
        dk = dk + _dot(ds.astype(q.dtype), q, acc_t, trans_a=True)
        return dk, dv

    init = (jnp.zeros((b, k.shape[-1]), acc_t), jnp.zeros((b, v.shape[-1]), acc_t))
    dk, dv = _loop(cfg.pattern.q_ranges(j), body, init)
    dk_ref[...] = (dk * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# Block specs over the [batch * heads, seq, dim] layout; the grid is (batch * heads, blocks).
def _tile(cfg: FlashConfig, dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, cfg.block, dim), lambda bh, i: (bh, i, 0))


def _whole(cfg: FlashConfig, dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, cfg.padded_len, dim), lambda bh, i: (bh, 0, 0))


def _kv_head(cfg: FlashConfig, bh):
    # lax.div / lax.rem on non-negative ints: floor division would lower through `sign`.
    heads = jnp.int32(cfg.heads)
    batch, head = lax.div(bh, heads), lax.rem(bh, heads)
    return batch * cfg.kv_heads + lax.div(head, jnp.int32(cfg.groups))


def _kv_tile(cfg: FlashConfig, dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, cfg.block, dim), lambda bh, j: (_kv_head(cfg, bh), j, 0))


def _kv_whole(cfg: FlashConfig, dim: int) -> pl.BlockSpec:
    return pl.BlockSpec((None, cfg.padded_len, dim), lambda bh, i: (_kv_head(cfg, bh), 0, 0))


def _call(kernel, cfg: FlashConfig, *, in_specs, out_specs, out_shape, name, flops, bytes_):
    return _compat.pallas_call(
        functools.partial(kernel, cfg=cfg),
        grid=(out_shape[0].shape[0], cfg.num_blocks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        cost_estimate=pl.CostEstimate(
            flops=int(flops), transcendentals=int(flops // 8), bytes_accessed=int(bytes_)
        ),
        name=name,
    )


def _window_flops(cfg: FlashConfig, rows: int, d: int, dv: int) -> float:
    keys = cfg.pattern.keys_per_query()
    return 2.0 * rows * cfg.padded_len * keys * (d + dv)


def _forward(cfg: FlashConfig, q, k, v):
    bh, _, d = q.shape
    dv = v.shape[-1]
    out_shape = (
        jax.ShapeDtypeStruct((bh, cfg.padded_len, dv), q.dtype),
        jax.ShapeDtypeStruct((bh, cfg.padded_len, 1), _checks.accum_dtype(q.dtype)),
    )
    return _call(
        _fwd_kernel,
        cfg,
        in_specs=[_tile(cfg, d), _kv_whole(cfg, d), _kv_whole(cfg, dv)],
        out_specs=(_tile(cfg, dv), _tile(cfg, 1)),
        out_shape=out_shape,
        name=f"{cfg.name}_fwd",
        flops=_window_flops(cfg, bh, d, dv),
        bytes_=(q.size + 2 * k.size + v.size) * q.dtype.itemsize,
    )(q, k, v)


def _backward(cfg: FlashConfig, q, k, v, o, lse, do):
    bh, _, d = q.shape
    dv = v.shape[-1]
    acc_t = _checks.accum_dtype(q.dtype)
    delta = jnp.sum(o.astype(acc_t) * do.astype(acc_t), axis=-1, keepdims=True)
    flops = _window_flops(cfg, bh, d, dv)
    nbytes = 2 * (q.size + k.size + v.size + do.size) * q.dtype.itemsize
    dq = _call(
        _dq_kernel,
        cfg,
        in_specs=[
            _tile(cfg, d),
            _kv_whole(cfg, d),
            _kv_whole(cfg, dv),
            _tile(cfg, dv),
            _tile(cfg, 1),
            _tile(cfg, 1),
        ],
        out_specs=(_tile(cfg, d),),
        out_shape=(jax.ShapeDtypeStruct(q.shape, q.dtype),),
        name=f"{cfg.name}_dq",
        flops=flops,
        bytes_=nbytes,
    )(q, k, v, do, lse, delta)[0]
    # dk/dv are per query head; with groups > 1 they are summed below in float32.
    grad_t = q.dtype if cfg.groups == 1 else acc_t
    dk, dv_ = _call(
        _dkv_kernel,
        cfg,
        in_specs=[
            _whole(cfg, d),
            _kv_tile(cfg, d),
            _kv_tile(cfg, dv),
            _whole(cfg, dv),
            _whole(cfg, 1),
            _whole(cfg, 1),
        ],
        out_specs=(_tile(cfg, d), _tile(cfg, dv)),
        out_shape=(
            jax.ShapeDtypeStruct((bh, cfg.padded_len, d), grad_t),
            jax.ShapeDtypeStruct((bh, cfg.padded_len, dv), grad_t),
        ),
        name=f"{cfg.name}_dkv",
        flops=1.5 * flops,
        bytes_=nbytes,
    )(q, k, v, do, lse, delta)
    if cfg.groups > 1:

        def group_sum(x):
            x = x.reshape(bh // cfg.heads, cfg.kv_heads, cfg.groups, *x.shape[1:])
            return x.sum(axis=2).reshape(-1, *x.shape[3:]).astype(q.dtype)

        dk, dv_ = group_sum(dk), group_sum(dv_)
    return dq, dk, dv_


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(cfg: FlashConfig, q, k, v):
    return _forward(cfg, q, k, v)[0]


def _attention_fwd(cfg: FlashConfig, q, k, v):
    o, lse = _forward(cfg, q, k, v)
    return o, (q, k, v, o, lse)


def _attention_bwd(cfg: FlashConfig, residuals, do):
    return _backward(cfg, *residuals, do)


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(cfg: FlashConfig, q, k, v):
    """Block-sparse flash attention in the kernel layout ``[batch * heads, padded_len, dim]``.

    ``k`` and ``v`` have ``batch * kv_heads`` rows; differentiable (``custom_vjp``).
    """
    return _attention(cfg, q, k, v)


def to_kernel_layout(x, dim: int):
    """``[b, t, h, e]`` -> ``[b * h, t, dim]``, zero-padding the last axis to ``dim``."""
    b, t, h, e = x.shape
    x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, dim - e)))
    return jnp.swapaxes(x, 1, 2).reshape(b * h, t, dim)


def from_kernel_layout(o, batch: int, dim: int):
    """``[b * h, t, dim_padded]`` -> ``[b, t, h, dim]``."""
    o = o.reshape(batch, -1, *o.shape[1:])[..., :dim]
    return jnp.swapaxes(o, 1, 2)


@functools.partial(jax.jit, static_argnames=("window", "causal", "scale", "block_size"))
def local_attention_pallas(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    causal: bool,
    scale: float,
    block_size: int | None = None,
) -> jax.Array:
    """Sliding-window attention through the Pallas kernels (inputs already validated)."""
    b, t, h, d = q.shape
    hk, dv = k.shape[2], v.shape[-1]
    block = block_size or _default_block(t)
    padded_len = _cdiv(t, block) * block
    pattern = Window1D(
        window=min(window, t), causal=causal, block=block, seq_len=t, padded_len=padded_len
    )
    cfg = FlashConfig(pattern=pattern, scale=scale, heads=h, kv_heads=hk)
    dk_pad, dv_pad = _compat.pad_dim_for_backend(d), _compat.pad_dim_for_backend(dv)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded_len - t), (0, 0), (0, 0)))
    o = flash_attention(
        cfg,
        to_kernel_layout(pad(q), dk_pad),
        to_kernel_layout(pad(k), dk_pad),
        to_kernel_layout(pad(v), dv_pad),
    )
    return from_kernel_layout(o, b, dv)[:, :t]
