r"""Gated linear attention: public entry points, validation, naive-scan oracle, decode step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from linjax import _tree
from linjax.kernels_pallas import _checks, _compat
from linjax.kernels_pallas._gla_pallas import gla_pallas
from linjax.kernels_pallas._gla_xla import SUB_CHUNK, gla_xla

_SEQ = "[batch, seq, heads, dim]"
_STEP = "[batch, heads, dim] (one token) or [batch, 1, heads, dim]"


def _check_inputs(q, k, v, log_gates, state, *, rank: int, layout: str) -> None:
    for name, x in (("q", q), ("k", k), ("v", v), ("log_gates", log_gates)):
        _checks.check_array(x, name, rank, layout)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != q.shape or log_gates.shape != q.shape:
        raise ValueError(
            f"q, k and log_gates must have the same shape {layout}, got q.shape={q.shape}, "
            f"k.shape={k.shape}, log_gates.shape={log_gates.shape}"
        )
    if v.shape[:-1] != q.shape[:-1]:
        what = "batch, seq and heads" if rank == 4 else "batch and heads"
        raise ValueError(f"v must agree with q on {what}: q.shape={q.shape}, v.shape={v.shape}")
    if rank == 4 and q.shape[1] < 1:
        raise ValueError(f"sequence length must be >= 1, got q.shape={q.shape}")
    if state is not None:
        expected = (q.shape[0], q.shape[-2], q.shape[-1], v.shape[-1])
        name = "initial_state" if rank == 4 else "state"
        _checks.check_array(state, name, 4, "[batch, heads, key_dim, value_dim]")
        if state.shape != expected:
            raise ValueError(
                f"{name} must have shape [batch, heads, key_dim, value_dim] = {expected}, got "
                f"{state.shape}"
            )
    _checks.check_log_gates(log_gates)


def check_chunk_size(chunk_size: Any) -> int:
    """``chunk_size`` is a static power of two, so that it splits into equal sub-chunks."""
    chunk_size = _tree.check_positive_int(chunk_size, "chunk_size")
    if chunk_size & (chunk_size - 1):
        raise ValueError(
            f"{chunk_size=} must be a power of two (e.g. 16, 32 or 64): chunks are split into "
            f"sub-chunks of {SUB_CHUNK} tokens (8 in the XLA path) that must divide them"
        )
    return chunk_size


def _gla_step(state, q, k, v, g, scale):
    """One recurrence step in the state's dtype: ``S <- e^g S + k^T v``; ``o = s q S``."""
    acc = state.dtype
    q, k, v, g = (x.astype(acc) for x in (q, k, v, g))
    state = jnp.exp(g)[..., None] * state + k[..., None] * v[..., None, :]
    o = scale * jnp.einsum("bhk,bhkv->bhv", q, state, precision=lax.Precision.HIGHEST)
    return state, o


def _naive_scan(q, k, v, log_gates, state, scale):
    def step(state, xs):
        return _gla_step(state, *xs, scale)

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_gates))
    state, o = lax.scan(step, state, xs)
    return jnp.moveaxis(o, 0, 1).astype(v.dtype), state


def _initial_state(initial_state, q, v, log_gates):
    acc = _checks.accum_dtype(q.dtype, log_gates.dtype)
    if initial_state is None:
        return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[-1]), acc)
    return initial_state.astype(acc)


def gated_linear_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_gates: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""The naive recurrence as one ``lax.scan`` over time: the oracle for GLA.

    $S_t = \mathrm{diag}(e^{g_t}) S_{t-1} + k_t^\top v_t$, $o_t = s\, q_t S_t$, one token per
    step, state in float32 (float64 for float64 inputs). ``O(T)`` sequential steps; use for
    tests and short sequences.

    Args:
        q: ``[batch, seq, heads, key_dim]``.
        k: ``[batch, seq, heads, key_dim]``.
        v: ``[batch, seq, heads, value_dim]``.
        log_gates: ``[batch, seq, heads, key_dim]``, ``<= 0``.
        initial_state: ``[batch, heads, key_dim, value_dim]`` or ``None`` (zeros).
        scale: output scale ``s``, default ``key_dim ** -0.5``.

    Returns:
        ``(o, final_state)``: ``o`` ``[batch, seq, heads, value_dim]`` in ``v``'s dtype and
        the state after the last token, ``[batch, heads, key_dim, value_dim]``, float32 (or
        float64).

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import kernels_pallas as kp
        >>> x = jnp.ones((1, 3, 2, 4))
        >>> o, state = kp.gated_linear_attention_reference(x, x, x, -x)
        >>> o.shape, state.shape
        ((1, 3, 2, 4), (1, 2, 4, 4))
    """
    _check_inputs(q, k, v, log_gates, initial_state, rank=4, layout=_SEQ)
    scale = _checks.check_scale(scale, q.shape[-1])
    return _naive_scan(q, k, v, log_gates, _initial_state(initial_state, q, v, log_gates), scale)


def gla_decode_step(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_gates: jax.Array,
    state: jax.Array,
    *,
    scale: float | None = None,
) -> tuple[jax.Array, jax.Array]:
    r"""One token of gated linear attention: the decode (generation) step.

    $S \leftarrow \mathrm{diag}(e^{g}) S + k^\top v$, $o = s\, q S$. The step is a few fused
    elementwise ops that stream the ``[key_dim, value_dim]`` state once, which is what a
    decode kernel would do (it is bandwidth-bound), so it is plain jnp on every backend and
    differentiable by autodiff. Chaining it over a sequence reproduces
    :func:`gated_linear_attention` with ``initial_state=state``.

    Args:
        q: ``[batch, heads, key_dim]`` (one token), or ``[batch, 1, heads, key_dim]``.
        k: same shape as ``q``.
        v: ``[batch, heads, value_dim]``, or ``[batch, 1, heads, value_dim]``.
        log_gates: same shape as ``q``, ``<= 0``.
        state: ``[batch, heads, key_dim, value_dim]``; float32 recommended.
        scale: output scale ``s``, default ``key_dim ** -0.5``.

    Returns:
        ``(o, state)``: ``o`` shaped like ``v`` in ``v``'s dtype and the updated state in
        ``state``'s dtype (computed in at least float32), so the step can be scanned.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import kernels_pallas as kp
        >>> x, state = jnp.ones((1, 2, 4)), jnp.zeros((1, 2, 4, 4))
        >>> o, state = kp.gla_decode_step(x, x, x, -x, state)
        >>> o.shape, state.shape
        ((1, 2, 4), (1, 2, 4, 4))
    """
    squeeze = getattr(q, "ndim", 0) == 4
    if squeeze:
        for name, x in (("q", q), ("k", k), ("v", v), ("log_gates", log_gates)):
            if x.ndim != 4 or x.shape[1] != 1:
                raise ValueError(
                    f"{name} must be {_STEP}; with 4 dims the seq axis must have length 1, "
                    f"got {name}.shape={x.shape}"
                )
        q, k, v, log_gates = (x[:, 0] for x in (q, k, v, log_gates))
    _check_inputs(q, k, v, log_gates, state, rank=3, layout=_STEP)
    scale = _checks.check_scale(scale, q.shape[-1])
    acc = _checks.accum_dtype(state.dtype, q.dtype, log_gates.dtype)
    new_state, o = _gla_step(state.astype(acc), q, k, v, log_gates, scale)
    o = o.astype(v.dtype)
    return (o[:, None] if squeeze else o), new_state.astype(state.dtype)


def _auto_impl(impl: str) -> str:
    """``resolve_impl``, except that ``"auto"`` keeps the XLA implementation on GPUs.

    Measured on an H100 (``benchmarks/kernels_gpu.py``, B=1, T=8192, H=32, K=V=128, bf16):
    the fused-chunk Pallas kernel, sequential over chunks with a float32 ``[V, K]`` state
    per program, takes 168 ms forward against 3.7 ms for the chunkwise XLA implementation,
    so ``impl="pallas"`` must be asked for explicitly there. TPUs use the kernel.
    """
    resolved = _compat.resolve_impl(impl)
    if impl == "auto" and _compat.backend() == "gpu":
        return "xla"
    return resolved


def gated_linear_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_gates: jax.Array,
    *,
    initial_state: jax.Array | None = None,
    chunk_size: int = 64,
    scale: float | None = None,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array]:
    r"""Gated linear attention (GLA) with per-channel forget gates, chunkwise-parallel.

    Per head, with log forget gates $g_t \le 0$ (gates $\alpha_t = e^{g_t} \in (0, 1]$):

    $$S_t = \mathrm{diag}(e^{g_t})\, S_{t-1} + k_t^\top v_t, \qquad o_t = s\, q_t S_t,
    \qquad S_0 = \text{initial\_state}.$$

    The sequence is processed in chunks of ``chunk_size`` tokens: a state recurrence
    across chunks plus causal attention-like products inside each chunk, with sub-chunks
    of 16 tokens. Every exponential has a non-positive argument (gate differences are
    taken in log space and masked before ``exp``), so gates anywhere in ``(0, 1]`` —
    including ``log_gates = 0`` (plain linear attention) and very strong decay
    (``log_gates = -20`` per step) — give finite outputs and gradients. State and
    accumulation are float32 (float64 for float64 inputs); ``o`` has the input dtype.
    Sequences of any length are supported (zero padding at the end is exact). The result
    does not depend on ``chunk_size`` beyond rounding: it trades parallel work
    ``O(T * chunk_size)`` against ``T / chunk_size`` sequential steps.

    Implementations (``impl``):

    * ``"xla"``: the chunkwise form as batched einsums and a ``lax.scan`` over chunks,
      run in blocks of chunks one after another (scratch memory independent of ``T``);
      differentiated by autodiff (checkpointed per block). The default on CPU.
    * ``"pallas"``: a fused kernel sequential over chunks that keeps the state on-chip, with
      a ``custom_vjp`` whose backward pass recomputes with the XLA chunkwise form. The
      default on GPU/TPU; interpreted on CPU.
    * ``"reference"``: :func:`gated_linear_attention_reference` (naive scan).

    Positive log-gates are rejected when ``log_gates`` is concrete; under ``jit`` they are
    not checked and can overflow.

    Args:
        q: queries ``[batch, seq, heads, key_dim]``, float32/bfloat16 (float64 runs too).
        k: keys ``[batch, seq, heads, key_dim]``, same dtype as ``q``.
        v: values ``[batch, seq, heads, value_dim]``, same dtype as ``q``.
        log_gates: ``[batch, seq, heads, key_dim]``, ``<= 0`` (e.g.
            ``jax.nn.log_sigmoid(x) / 16`` as in GLA/Liger); any float dtype.
        initial_state: ``[batch, heads, key_dim, value_dim]`` or ``None`` (zeros).
        chunk_size: tokens per chunk (static), a power of two; the XLA path caps it at 64.
        scale: output scale ``s``, default ``key_dim ** -0.5`` (Liger uses 1).
        impl: ``"auto"`` | ``"pallas"`` | ``"xla"`` | ``"reference"``. ``"auto"`` is the
            Pallas kernel on TPU and the chunkwise XLA implementation on CPU and GPU (on an
            H100 the XLA path is 45x faster than the current Pallas kernel).

    Returns:
        ``(o, final_state)``: ``o`` ``[batch, seq, heads, value_dim]`` in ``v``'s dtype and
        ``final_state`` ``[batch, heads, key_dim, value_dim]`` in float32 (float64 for
        float64 inputs), ready to pass as ``initial_state`` or to :func:`gla_decode_step`.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import kernels_pallas as kp
        >>> q, k, v, x = jax.random.normal(jax.random.key(0), (4, 1, 100, 2, 16))
        >>> g = jax.nn.log_sigmoid(x) / 16
        >>> o, state = kp.gated_linear_attention(q, k, v, g, chunk_size=32)
        >>> o_ref, state_ref = kp.gated_linear_attention_reference(q, k, v, g)
        >>> bool(jnp.allclose(o, o_ref, atol=1e-5)), state.shape
        (True, (1, 2, 16, 16))

    References:
        Yang, Wang, Shen, Panda, Kim (2024), "Gated Linear Attention Transformers with
        Hardware-Efficient Training", https://arxiv.org/abs/2312.06635
    """
    _check_inputs(q, k, v, log_gates, initial_state, rank=4, layout=_SEQ)
    chunk_size = check_chunk_size(chunk_size)
    scale = _checks.check_scale(scale, q.shape[-1])
    impl = _auto_impl(impl)
    state = _initial_state(initial_state, q, v, log_gates)
    if impl == "reference":
        return _naive_scan(q, k, v, log_gates, state, scale)
    fn = gla_pallas if impl == "pallas" else gla_xla
    return fn(q, k, v, log_gates, state, scale=scale, chunk_size=chunk_size)
