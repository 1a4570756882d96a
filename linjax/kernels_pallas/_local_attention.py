r"""1-D local (sliding-window) attention: public entry point, validation and the dense oracle."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from linjax.kernels_pallas import _checks, _compat
from linjax.kernels_pallas._local_attention_pallas import local_attention_pallas
from linjax.kernels_pallas._local_attention_xla import local_attention_xla


def local_attention_mask(seq_len: int, window: int, causal: bool) -> jax.Array:
    """Boolean ``[seq_len, seq_len]`` mask ``visible[i, j]`` of the window convention."""
    i = lax.broadcasted_iota(jnp.int32, (seq_len, seq_len), 0)
    j = lax.broadcasted_iota(jnp.int32, (seq_len, seq_len), 1)
    if causal:
        return (i - j >= 0) & (i - j < window)
    return jnp.abs(i - j) < window


def local_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    causal: bool = True,
    scale: float | None = None,
) -> jax.Array:
    r"""Dense masked softmax attention: the pure-jnp oracle for :func:`local_attention`.

    Builds the full ``[seq, seq]`` score matrix (memory $O(T^2)$), masks it with the exact
    window predicate and normalises, in float32 (float64 for float64 inputs) at highest
    matmul precision. Use it for tests and small sequences only.

    Args:
        q: queries ``[batch, seq, heads, head_dim]``.
        k: keys ``[batch, seq, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
        v: values ``[batch, seq, kv_heads, value_dim]``.
        window: number of visible keys including the query itself (static, ``>= 1``).
        causal: causal window ``0 <= i - j < window``, else ``|i - j| < window``.
        scale: logit scale, default ``head_dim ** -0.5``.

    Returns:
        ``[batch, seq, heads, value_dim]`` in ``q``'s dtype.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import kernels_pallas as kp
        >>> x = jnp.ones((1, 4, 2, 8))
        >>> kp.local_attention_reference(x, x, x, window=2).shape
        (1, 4, 2, 8)
    """
    _checks.check_qkv(q, k, v)
    window = _checks.check_window(window)
    scale = _checks.check_scale(scale, q.shape[-1])
    acc = _checks.accum_dtype(q.dtype)
    b, t, h, d = q.shape
    hk = k.shape[2]
    qg = q.astype(acc).reshape(b, t, hk, h // hk, d)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(acc), precision=lax.Precision.HIGHEST)
    # Every row keeps its own key (window >= 1), so no row is all -inf.
    s = jnp.where(local_attention_mask(t, window, causal), s * scale, -jnp.inf)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhgts,bshe->bthge", p, v.astype(acc), precision=lax.Precision.HIGHEST)
    return o.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


def local_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int,
    causal: bool = True,
    scale: float | None = None,
    impl: str = "auto",
    block_size: int | None = None,
) -> jax.Array:
    r"""Sliding-window softmax attention in $O(T \cdot \text{window})$ time and memory.

    Query $i$ attends to key $j$ iff $0 \le i - j < w$ (``causal=True``) or
    $|i - j| < w$ (``causal=False``), where $w$ = ``window`` counts the visible keys
    *including the query itself* (flash-attn ``window_size=(w - 1, 0)``, splash
    ``LocalMask((w - 1, 0))``; Hugging Face models that pass ``sliding_window=w`` to
    flash-attn see $w + 1$ keys, so use ``window=w + 1`` to reproduce them):

    $$o_i = \sum_{j \text{ visible}} \mathrm{softmax}_j(s\, q_i \cdot k_j)\, v_j .$$

    ``window >= seq`` is full causal (or bidirectional) attention. Grouped-query attention
    is supported: ``k``/``v`` may have fewer heads, each shared by ``heads // kv_heads``
    consecutive query heads (``jax.nn.dot_product_attention``'s convention).

    Implementations (``impl``):

    * ``"xla"``: queries in blocks against the few neighbouring key blocks (batched
      matmuls, never a ``[seq, seq]`` matrix), float32 softmax, groups of blocks one
      after another so scratch memory stays a few MiB at any length; differentiated by
      autodiff (checkpointed per group). The default on CPU.
    * ``"pallas"``: a flash-attention kernel whose key loop visits only the blocks that
      intersect the window, online softmax in float32, with a ``custom_vjp`` whose backward
      is two Pallas kernels (``dq``; ``dk, dv``) that recompute probabilities from the saved
      log-sum-exp. The default on GPU (Triton backend) and TPU; interpreted on CPU.
    * ``"reference"``: :func:`local_attention_reference`.

    Args:
        q: queries ``[batch, seq, heads, head_dim]``, float32/bfloat16 (float64 runs too).
        k: keys ``[batch, seq, kv_heads, head_dim]``, same dtype; ``heads % kv_heads == 0``.
        v: values ``[batch, seq, kv_heads, value_dim]``, same dtype.
        window: number of visible keys including the query itself (static int ``>= 1``).
        causal: causal (left-only) window, or symmetric if ``False``.
        scale: logit scale, default ``head_dim ** -0.5``.
        impl: ``"auto"`` | ``"pallas"`` | ``"xla"`` | ``"reference"``.
        block_size: query/key tile length (static, a multiple of 8). Default: 128 for
            Pallas (less for short sequences), about ``window / 4`` for XLA. Sequences are
            zero-padded to a multiple of it.

    Returns:
        ``[batch, seq, heads, value_dim]`` in the input dtype.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import kernels_pallas as kp
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 256, 4, 32))
        >>> o = kp.local_attention(q, k, v, window=64)
        >>> ref = kp.local_attention_reference(q, k, v, window=64)
        >>> bool(jnp.allclose(o, ref, atol=1e-5))
        True

    References:
        Beltagy, Peters, Cohan (2020), "Longformer: The Long-Document Transformer",
        https://arxiv.org/abs/2004.05150;
        Dao (2023), "FlashAttention-2", https://arxiv.org/abs/2307.08691
    """
    _checks.check_qkv(q, k, v)
    window = _checks.check_window(window)
    scale = _checks.check_scale(scale, q.shape[-1])
    if block_size is not None:
        block_size = _checks.check_block_size(block_size)
    impl = _compat.resolve_impl(impl)
    if impl == "reference":
        return local_attention_reference(q, k, v, window=window, causal=causal, scale=scale)
    fn = local_attention_pallas if impl == "pallas" else local_attention_xla
    return fn(q, k, v, window=window, causal=bool(causal), scale=scale, block_size=block_size)
