r"""Chunkwise gated linear attention in XLA: exact inter-chunk recurrence, matmul intra-chunk.

Notation (reference/kernels.md §4.1): per head, $S_t = \mathrm{diag}(e^{g_t}) S_{t-1} +
k_t^\top v_t$ and $o_t = s\, q_t S_t$. Split the sequence into chunks of ``C`` tokens; with
$b$ the chunk-local inclusive cumulative sum of the log-gates and $S_{[n]}$ the state
entering chunk $n$:

* inter-chunk: $o_i \mathrel{+}= s\,(q_i \odot e^{b_i}) S_{[n]}$;
* state: $S_{[n+1]} = \mathrm{diag}(e^{b_{C-1}}) S_{[n]} + (k \odot e^{b_{C-1} - b})^\top V$
  (one ``lax.scan`` over chunks);
* intra-chunk: $o_i \mathrel{+}= s \sum_{j \le i} A_{ij} v_j$ with
  $A_{ij} = \sum_k q_{ik} k_{jk} e^{b_{ik} - b_{jk}}$.

Every log-decay is formed as a sum of non-positive terms (sub-chunk cumsums plus sums of
sub-chunk totals), never as a difference of two large cumulative sums, so the inter-chunk
factors are exact to rounding for any gates.

``A`` is built with matmuls only, which is what XLA runs fast on CPU (an elementwise
``[c, c, K]`` exponential for the diagonal sub-blocks, as fla does on GPU, costs ``c * K``
exponentials per token and was 30x slower here). With sub-chunks of ``c = 8`` tokens:

* sub-chunks ``J < I``: one ``[C, C]`` matmul of $q_i e^{\beta_i + \hat G_I - r}$ and
  $k_j e^{\tau_j + r - \hat G_{J+1}}$ ($\beta$: decay from the start of the sub-chunk to
  $i$, $\tau$: decay after $j$ to the end of its sub-chunk, $\hat G$: sum of the earlier
  sub-chunk totals, each clipped at $-L$, $r$: the chunk's midpoint of $\hat G$);
* sub-chunk ``J = I``: $q_i e^{\tilde\beta_i - m}$ times $k_j e^{m - \tilde\beta_j}$ with
  $\tilde\beta$ cumulated from the gates clipped at $-L$ and $m$ the sub-chunk midpoint.

Clipping keeps every exponent within $\pm 7L/2$ ($L = 16$ in float32: $\pm 56$, far from
overflow in the forward and backward passes; $L = 100$ in float64) and is exact to below
rounding: a pair whose decay crosses a clipped gate or total has a true factor below
$e^{-L}$ ($10^{-7}$ in float32, against the factor 1 of the pair $i = j$) and a computed
factor below it too. Entries above the diagonal can overflow and are masked before use.
To keep the clip bound, the chunks used here are at most 64 tokens (the result does not
depend on the chunk size).

Long sequences run as blocks of chunks, one block after another in a ``lax.scan`` whose
body is checkpointed (why: :mod:`._sequential`): a block holds about
``_BLOCK_TOKEN_HEADS`` = 2,048 token-heads, so temporary memory is one block's whatever
``T`` (4.6 MiB at B=1, H=2, K=V=64, for T = 4,096 as for 65,536), and autodiff saves only
the ``[B, H, K, V]`` state entering each block. On the 2-core CPU at T = 16,384 this took
the forward from 58 to 31 ms and forward + backward from 162 to 118 ms (blocks of 8,192
token-heads: 31 and 142 ms).

Everything accumulates in float32 (float64 for float64 inputs); no ``[T, T]`` array.
Gradients (and JVPs) come from autodiff of this function.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from linjax.kernels_pallas import _checks, _sequential

SUB_CHUNK = 16  # sub-chunk of the Pallas kernel
XLA_SUB_CHUNK = 8
XLA_MAX_CHUNK = 64  # 8 sub-chunks of 8: the clip bound (n - 1) * L / 2 holds
_HI = lax.Precision.HIGHEST
_BLOCK_TOKEN_HEADS = 2048  # per sequential block: temporaries of a few MiB (cache-sized)


def sub_chunk_size(chunk_size: int) -> int:
    """Sub-chunk length of the Pallas kernel for a (power of two) chunk size."""
    return min(SUB_CHUNK, chunk_size)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _clip_for(dtype) -> float:
    # Largest |exponent| used below is (n - 1) * L / 2 for n = 8 clipped terms: 56 in float32
    # (exp overflows at 88, and the backward pass multiplies two such factors' partners),
    # 350 in float64 (709). The clip error e^{-L} is 1e-7 (f32) and 4e-44 (f64).
    return 16.0 if jnp.dtype(dtype).itemsize <= 4 else 100.0


def _cumsum(x, axis: int, *, reverse: bool = False, exclusive: bool = False):
    """Cumulative sum over a short axis; the exclusive form shifts (no subtraction)."""
    y = lax.cumsum(x, axis, reverse=reverse)
    if not exclusive:
        return y
    n = x.shape[axis]
    zero = jnp.zeros_like(lax.slice_in_dim(x, 0, 1, axis=axis))
    if reverse:
        return jnp.concatenate([lax.slice_in_dim(y, 1, n, axis=axis), zero], axis)
    return jnp.concatenate([zero, lax.slice_in_dim(y, 0, n - 1, axis=axis)], axis)


def _midpoint(x, axis: int):
    """Half-way between the first and last entries along ``axis`` (a monotone sequence)."""
    first = lax.index_in_dim(x, 0, axis)
    last = lax.index_in_dim(x, x.shape[axis] - 1, axis)
    return lax.stop_gradient(0.5 * (first + last))  # the factorisations cancel it exactly


def gla_xla(q, k, v, log_gates, initial_state, *, scale: float, chunk_size: int):
    """Chunkwise GLA (inputs validated; ``initial_state`` already ``[B, H, K, V]``).

    Returns ``(o [B, T, H, V] in v's dtype, final_state [B, H, K, V] in the accumulation
    dtype)``.
    """
    bsz, t, h, _ = q.shape
    dv = v.shape[-1]
    acc = _checks.accum_dtype(q.dtype, log_gates.dtype)
    big_c = min(chunk_size, XLA_MAX_CHUNK)
    sub = min(XLA_SUB_CHUNK, big_c)
    n = _cdiv(t, big_c)
    per_block = _chunks_per_block(bsz * h, big_c, n)
    nb = _cdiv(n, per_block)

    tp = nb * per_block * big_c
    pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    inputs = tuple(pad(x) for x in (q, k, v, log_gates))

    def chunks(x):  # [B, L, H, E] -> [n, B, H, ns, c, E]; zero padding is exact
        x = x.astype(acc).reshape(bsz, per_block, big_c // sub, sub, h, x.shape[-1])
        return x.transpose(1, 0, 4, 2, 3, 5)

    def block(state, i):
        xs = (
            chunks(lax.dynamic_slice_in_dim(x, i * per_block * big_c, per_block * big_c, 1))
            for x in inputs
        )
        state, o = _block(state, tuple(xs), scale=scale, clip=_clip_for(acc))
        o = o.transpose(1, 0, 3, 2, 4).reshape(bsz, per_block * big_c, h, dv)
        return state, o.astype(v.dtype)

    final, o = _sequential.sequential_scan(block, initial_state.astype(acc), nb)
    return jnp.moveaxis(o, 0, 1).reshape(bsz, tp, h, dv)[:, :t], final


def _chunks_per_block(heads: int, chunk: int, n: int) -> int:
    """Chunks per sequential block: about ``_BLOCK_TOKEN_HEADS`` token-heads, at least one."""
    per_block = max(1, _BLOCK_TOKEN_HEADS // (heads * chunk))
    return min(per_block, n)


def _block(state, xs, *, scale: float, clip: float):
    """Chunkwise GLA over one block of chunks ``[n, B, H, ns, c, E]``: ``(state, o chunks)``."""
    q, k, v, g = xs
    n, bsz, h, ns, sub, _ = q.shape
    big_c = ns * sub

    # Log-decays as sums of non-positive terms (never differences of large numbers):
    # beta_i within the sub-chunk up to i, tail_j after j within the sub-chunk, and the
    # sub-chunk totals before / after a sub-chunk inside the chunk.
    beta = _cumsum(g, 4)
    tail = _cumsum(g, 4, reverse=True, exclusive=True)
    total = beta[:, :, :, :, -1]  # [N, B, H, ns, K]
    before = _cumsum(total, 3, exclusive=True)
    after = _cumsum(total, 3, reverse=True, exclusive=True)
    b = before[:, :, :, :, None] + beta  # chunk-local inclusive cumsum b_i
    to_end = tail + after[:, :, :, :, None]  # b_{C-1} - b_j

    # Inter-chunk: sequential state recurrence over chunks; every exponent <= 0.
    flat = lambda x: x.reshape(n, bsz, h, big_c, x.shape[-1])
    update = jnp.einsum("nbhck,nbhcv->nbhkv", flat(k * jnp.exp(to_end)), flat(v), precision=_HI)

    def step(state, inputs):
        d, u = inputs
        return d[..., None] * state + u, state

    decay = jnp.exp(before[:, :, :, -1] + total[:, :, :, -1])  # e^{b_{C-1}}
    final, entering = lax.scan(step, state, (decay, update))
    o = jnp.einsum("nbhck,nbhkv->nbhcv", flat(q * jnp.exp(b)), entering, precision=_HI)

    # Intra-chunk, earlier sub-chunks J < I: one [C, C] matmul. The decay of the sub-chunks
    # strictly between J and I is factorised around the chunk's midpoint after clipping
    # each sub-chunk total at -L (pairs across a clipped total are below e^{-L} anyway).
    g_hat = _cumsum(jnp.maximum(total, -clip), 3, exclusive=True)  # before sub-chunk I
    g_next = g_hat + jnp.maximum(total, -clip)  # after sub-chunk J
    r = _midpoint(g_hat, 3)[:, :, :, :, None]
    q_off = q * jnp.exp(beta + (g_hat[:, :, :, :, None] - r))
    k_off = k * jnp.exp(tail + (r - g_next[:, :, :, :, None]))
    a_off = jnp.einsum("nbhik,nbhjk->nbhij", flat(q_off), flat(k_off), precision=_HI)

    pos = jnp.arange(big_c)
    earlier = (pos[:, None] // sub) > (pos[None, :] // sub)
    o = o + jnp.einsum("nbhij,nbhjv->nbhiv", jnp.where(earlier, a_off, 0.0), flat(v), precision=_HI)

    # Same sub-chunk J = I: per-gate clip at -L and a sub-chunk midpoint reference, as
    # small [c, c] products per sub-chunk (entries above the diagonal may overflow and are
    # masked before use).
    beta_c = _cumsum(jnp.maximum(g, -clip), 4)
    m = _midpoint(beta_c, 4)
    q_d, k_d = q * jnp.exp(beta_c - m), k * jnp.exp(m - beta_c)
    a_diag = jnp.einsum("nbhsik,nbhsjk->nbhsij", q_d, k_d, precision=_HI)
    causal = pos[:sub, None] >= pos[None, :sub]
    o_diag = jnp.einsum("nbhsij,nbhsjv->nbhsiv", jnp.where(causal, a_diag, 0.0), v, precision=_HI)
    o = o + flat(o_diag)

    return final, scale * o
