"""Pallas gated linear attention: one fused forward kernel, sequential over chunks.

Grid ``(batch * heads, value_tiles)``; each program keeps its slice of the state
transposed, ``S^T`` of shape ``[value_tile, K]`` in float32, and walks the chunks of its
sequence with a ``lax.fori_loop`` (the fused-chunk design of reference/kernels.md §5.3:
minimal HBM traffic, the state never leaves the core). The chunk-local cumulative
log-gates ``b`` are computed in XLA beforehand, because Mosaic TPU cannot lower
``cumsum`` in-kernel. Per chunk and per sub-chunk ``I`` of ``c`` tokens:

* inter: ``(q_I * exp(b_I)) @ S``;
* off-diagonal ``J < I``: ``(q_I * exp(b_I - b_n)) @ (k_J * exp(b_n - b_J))^T @ v_J`` with
  ``b_n`` the first row of ``I`` (both factors ``<= 1``);
* diagonal: ``[c, c, 32]`` elementwise products in float32 over key-column tiles (mask
  applied to the exponent before ``exp``), summed;
* state: ``S^T <- S^T * exp(b_last) + v^T @ (k * exp(b_last - b))``.

All loads are ``(rows, full dim)`` tiles at dynamic row offsets, rows a multiple of 8 and
powers of two for Triton (head dims are zero-padded to powers of two on GPU).

Backward: a ``custom_vjp`` whose backward pass differentiates the chunkwise XLA
implementation (:mod:`._gla_xla`), recomputing the forward from the inputs (the
``backward_pass_impl="xla"`` pattern of jax's Pallas ops). It is exact and stable, with
``O(T * C)`` memory; a Pallas backward kernel (reverse chunk walk, ``dS`` carried in
VMEM, ``dg`` by the reverse-cumsum identity of kernels.md §4.1) is future work.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from linjax.kernels_pallas import _compat
from linjax.kernels_pallas._gla_xla import gla_xla, sub_chunk_size


@dataclasses.dataclass(frozen=True)
class _Config:
    scale: float
    chunk: int
    sub: int
    num_chunks: int
    value_tile: int
    key_dim: int
    key_tile: int


def _precision(dtype) -> lax.Precision:
    return lax.Precision.DEFAULT if jnp.dtype(dtype).itemsize < 4 else lax.Precision.HIGHEST


def _dot(a, b, *, trans_a=False, trans_b=False):
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return lax.dot_general(
        a, b, dims, precision=_precision(a.dtype), preferred_element_type=a.dtype
    )


def _fwd_kernel(q_ref, k_ref, b_ref, v_ref, h0_ref, o_ref, ht_ref, *, cfg: _Config):
    big_c, c = cfg.chunk, cfg.sub
    acc = h0_ref.dtype  # the state's (accumulation) dtype
    tri = lax.broadcasted_iota(jnp.int32, (c, c, 1), 0) >= lax.broadcasted_iota(
        jnp.int32, (c, c, 1), 1
    )

    def rows(ref, start, size):
        return ref[pl.ds(start, size), :].astype(acc)

    def diagonal_block(start):
        # A_ij = sum_k q_ik k_jk exp(b_ik - b_jk), j <= i, as [c, c, key_tile] elementwise
        # products summed over static key-column tiles: a whole [16, 16, 128] float32
        # product does not fit in an H100's shared memory next to the state.
        a = jnp.zeros((c, c), acc)
        for col in range(0, cfg.key_dim, cfg.key_tile):
            cols = pl.ds(col, cfg.key_tile)
            q_t, k_t, b_t = (r[pl.ds(start, c), cols].astype(acc) for r in (q_ref, k_ref, b_ref))
            diff = jnp.where(tri, b_t[:, None, :] - b_t[None, :, :], -jnp.inf)
            a = a + jnp.sum(q_t[:, None, :] * k_t[None, :, :] * jnp.exp(diff), axis=-1)
        return a

    def chunk(n, state_t):
        base = pl.multiple_of(n * big_c, big_c)
        b_last = rows(b_ref, base + big_c - 1, 1)
        new_state_t = state_t * jnp.exp(b_last)
        for i in range(big_c // c):  # static loop over query sub-chunks
            start = base + i * c
            q_i, k_i, b_i, v_i = (rows(r, start, c) for r in (q_ref, k_ref, b_ref, v_ref))
            # State update, one sub-chunk at a time (whole-chunk operands cost shared memory).
            new_state_t = new_state_t + _dot(v_i, k_i * jnp.exp(b_last - b_i), trans_a=True)
            o_i = _dot(q_i * jnp.exp(b_i), state_t, trans_b=True)
            o_i = o_i + _dot(diagonal_block(start), v_i)
            b_n = rows(b_ref, start, 1)  # first row of the sub-chunk (Triton cannot slice values)
            q_t = q_i * jnp.exp(b_i - b_n)
            for j in range(i):  # earlier sub-chunks of the same chunk
                k_j, b_j, v_j = (rows(r, base + j * c, c) for r in (k_ref, b_ref, v_ref))
                a = _dot(q_t, k_j * jnp.exp(b_n - b_j), trans_b=True)
                o_i = o_i + _dot(a, v_j)
            o_ref[pl.ds(start, c), :] = (cfg.scale * o_i).astype(o_ref.dtype)
        return new_state_t

    # int32 bounds: with x64 on, Python-int bounds give an int64 index Mosaic cannot mix.
    n_chunks = jnp.int32(cfg.num_chunks)
    state_t = lax.fori_loop(jnp.int32(0), n_chunks, chunk, h0_ref[...].astype(acc))
    ht_ref[...] = state_t.astype(ht_ref.dtype)


DIAGONAL_KEY_TILE = 32  # key columns per elementwise [c, c, tile] product


def _value_tile(dv: int) -> int:
    # TPU lanes: a tile is the full value dim or a multiple of 128.
    return 128 if dv > 128 and dv % 128 == 0 else dv


def _forward(cfg: _Config, q, k, b, v, h0t):
    bh, tp, dk = q.shape
    dv = v.shape[-1]
    bv = cfg.value_tile
    seq = lambda e: pl.BlockSpec((None, tp, e), lambda i, j: (i, 0, 0))
    vtile = pl.BlockSpec((None, tp, bv), lambda i, j: (i, 0, j))
    stile = pl.BlockSpec((None, bv, dk), lambda i, j: (i, j, 0))
    flops = 2 * bh * tp * dv * (4 * dk + cfg.chunk * 2)
    return _compat.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(bh, dv // bv),
        num_stages=1,  # no software pipelining of the chunk loop: it doubles shared memory
        in_specs=[seq(dk), seq(dk), seq(dk), vtile, stile],
        out_specs=(vtile, stile),
        out_shape=(
            jax.ShapeDtypeStruct((bh, tp, dv), v.dtype),
            jax.ShapeDtypeStruct(h0t.shape, h0t.dtype),
        ),
        cost_estimate=pl.CostEstimate(
            flops=int(flops),
            transcendentals=int(bh * tp * dk * (cfg.sub + 2)),
            bytes_accessed=int(q.nbytes + k.nbytes + b.nbytes + v.nbytes * 2 + 2 * h0t.nbytes),
        ),
        name="gated_linear_attention_fwd",
    )(q, k, b, v, h0t)


def _kernel_forward(q, k, v, log_gates, initial_state, *, scale: float, chunk_size: int):
    """Public layout in and out; the kernel sees ``[B * H, T_pad, dim]`` and ``S^T``."""
    bsz, t, h, dk = q.shape
    dv = v.shape[-1]
    acc = initial_state.dtype
    n = -(-t // chunk_size)
    tp = n * chunk_size
    dk_p, dv_p = _compat.pad_dim_for_backend(dk), _compat.pad_dim_for_backend(dv)

    def layout(x, dim, dtype=None):
        x = x if dtype is None else x.astype(dtype)
        x = jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, dim - x.shape[-1])))
        return jnp.swapaxes(x, 1, 2).reshape(bsz * h, tp, dim)

    # Chunk-local cumulative log-gates, in the accumulation dtype (padding: gate 1).
    g = layout(log_gates, dk_p, acc).reshape(bsz * h, n, chunk_size, dk_p)
    b = jnp.cumsum(g, axis=2).reshape(bsz * h, tp, dk_p)
    h0t = jnp.pad(initial_state, ((0, 0), (0, 0), (0, dk_p - dk), (0, dv_p - dv)))
    h0t = jnp.swapaxes(h0t, 2, 3).reshape(bsz * h, dv_p, dk_p)
    cfg = _Config(
        scale=scale,
        chunk=chunk_size,
        sub=sub_chunk_size(chunk_size),
        num_chunks=n,
        value_tile=_value_tile(dv_p),
        key_dim=dk_p,
        key_tile=min(dk_p, DIAGONAL_KEY_TILE),
    )
    o, ht = _forward(cfg, layout(q, dk_p), layout(k, dk_p), b, layout(v, dv_p), h0t)
    o = jnp.swapaxes(o.reshape(bsz, h, tp, dv_p), 1, 2)[:, :t, :, :dv]
    ht = jnp.swapaxes(ht.reshape(bsz, h, dv_p, dk_p), 2, 3)[:, :, :dk, :dv]
    return o, ht


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _gla(q, k, v, log_gates, initial_state, scale, chunk_size):
    return _kernel_forward(q, k, v, log_gates, initial_state, scale=scale, chunk_size=chunk_size)


def _gla_fwd(q, k, v, log_gates, initial_state, scale, chunk_size):
    out = _kernel_forward(q, k, v, log_gates, initial_state, scale=scale, chunk_size=chunk_size)
    return out, (q, k, v, log_gates, initial_state)


def _gla_bwd(scale, chunk_size, residuals, cotangents):
    xla = functools.partial(gla_xla, scale=scale, chunk_size=chunk_size)
    return jax.vjp(xla, *residuals)[1](cotangents)


_gla.defvjp(_gla_fwd, _gla_bwd)


@functools.partial(jax.jit, static_argnames=("scale", "chunk_size"))
def gla_pallas(q, k, v, log_gates, initial_state, *, scale: float, chunk_size: int):
    """Chunkwise GLA through the Pallas kernel (inputs validated, state in accum dtype)."""
    return _gla(q, k, v, log_gates, initial_state, scale, chunk_size)
