r"""M-FAC: exact inverse-Fisher-vector products over a window of gradients.

The matrix is the damped empirical Fisher of the last $m$ gradients $g_1, \dots, g_m$,

$$F = \lambda I_d + \tfrac{1}{n} G^\top G, \qquad G = [g_1; \dots; g_m] \in \mathbb{R}^{m\times d}$$

with $n = \min(\text{count}, m)$ the number of gradients actually in the window (warm-up:
rows not yet written are zero and do not count). Everything is computed from the
Woodbury identity in its Cholesky form,

$$F^{-1} = \lambda^{-1}[I - G^\top S^{-1} G], \qquad S = n\lambda I_m + G G^\top = L L^\top$$

so the $O(d)$ work of a product is two passes over the window ($G x$, then $G^\top c$) and
the rest is $m \times m$ algebra on the Gram matrix $K = G G^\top$, which the ring-buffer
update keeps current with one pass $G g$. This is the dynamic algorithm of Frantar,
Kurtic and Alistarh (2021) in the form of the reference note (curvature.md §3.3): their
$D$ / $B$ coefficient matrices are a row-oriented Cholesky whitening of $G$,
$\operatorname{diag}(\rho)^{-1/2} V = \lambda^{-1/2} L^{-1} G$.

Layout (why one flat buffer): the window is one ``[m, d]`` array in the dtype of the
gradients, so each pass is a single GEMV/GEMM that streams $G$ once, and sharding $G$ along
$d$ (``PartitionSpec(None, "x")``) splits the passes across devices with an all-reduce of
$m$ numbers. Vectors and gradients are pytrees at the boundary and are raveled leaf by leaf
into that layout (leaf order of ``jax.tree.leaves``).

The $m \times m$ algebra (Gram matrix, Cholesky factor, damping) is held in float64 when
x64 is enabled and in float32 otherwise; the passes over $G$ run with
``lax.Precision.HIGHEST`` and accumulate in at least float32 (a bfloat16 window is
accumulated in float32).

Damping floor: with float32 algebra, a numerically singular window (repeated or collinear
gradients) and a damping below the rounding error of $S$, the Cholesky factorisation
would fail. The damping is then raised by $m\,\epsilon \max_i S_{ii} / n$ (the resolution
of $S$ in its dtype) and the raised value recorded in ``MFACState.damping``, so the state
still describes one exact matrix $F$. Later :func:`mfac_update` calls keep the raised
value (reset it with ``state._replace(damping=...)``); the :func:`mfac` transform restores
its configured damping at every step. With x64 enabled this does not happen in practice.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from linjax import _tree

PyTree = Any

_HIGHEST = lax.Precision.HIGHEST
_INT32_MAX = np.iinfo(np.int32).max


class MFACState(NamedTuple):
    """State of the M-FAC window: arrays only, so it jits, shards and checkpoints as is.

    Attributes:
        grads: ``[m, d]`` the gradient window $G$ as one flat ring buffer, in the dtype of
            the gradients (the promotion of the leaf dtypes). Rows not yet written are zero.
        gram: ``[m, m]`` the Gram matrix $K = G G^\\top$ (small dtype: float64 with x64,
            else float32).
        chol: ``[m, m]`` lower Cholesky factor $L$ of $S = n\\lambda I + K$, small dtype.
        damping: ``[]`` the damping $\\lambda$ that ``chol`` was built with, small dtype.
            It is state because the pure functions (:func:`mfac_ihvp`, ...) have no closure
            to read it from; :func:`mfac` overwrites it with its own configured damping at
            every update, so for the optax transform the closure stays authoritative. It
            exceeds the configured value only if the factorisation needed a floor (float32
            algebra, numerically singular window, damping below rounding; module docs).
        count: ``[]`` int32, number of gradients pushed (saturates at ``2**31 - 1``).
        position: ``[]`` int32, the row the next gradient overwrites (the oldest one once
            the window is full).
        like: pytree of boolean arrays shaped like one gradient (all ``False``): the
            structure and leaf shapes that vectors must have. It is arrays (not shapes)
            so the state stays a plain pytree of arrays for ``jit`` and orbax; it costs
            ``d`` bytes, ``1 / (4m)`` of a float32 window.
    """

    grads: jax.Array
    gram: jax.Array
    chol: jax.Array
    damping: jax.Array
    count: jax.Array
    position: jax.Array
    like: PyTree


# ---------------------------------------------------------------------------------------------
# Small helpers: dtypes, validation, flattening
# ---------------------------------------------------------------------------------------------


def _small_dtype() -> jnp.dtype:
    return jnp.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))


def _acc_dtype(*dtypes: Any) -> jnp.dtype:
    """Accumulation dtype of a pass over G: the promotion, and at least float32."""
    return jnp.dtype(jnp.result_type(jnp.float32, *dtypes))


def _check_damping(damping: Any) -> None:
    _tree.check_positive_scalar(damping, "damping")


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(np.shape(leaf)) if not hasattr(leaf, "shape") else tuple(leaf.shape)


def _leading_shape(v: PyTree, like: PyTree, name: str, *, allow_batch: bool) -> tuple[int, ...]:
    """Check ``v`` against the state's template; return its batch shape, ``()`` or ``(B,)``.

    A leaf of ``v`` is a single vector's leaf when its shape equals the template leaf's,
    and a batch when it has exactly one more (leading) axis; all leaves must agree.
    """
    _tree.check_floating(v, name)
    sv, sl = jax.tree.structure(v), jax.tree.structure(like)
    if sv != sl:
        raise ValueError(
            f"{name} has a different pytree structure from the M-FAC state's gradients: "
            f"{sv} vs {sl}"
        )
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
    leads = set()
    for path, a, t in zip(paths, jax.tree.leaves(v), jax.tree.leaves(like), strict=True):
        sa, st = _shape(a), _shape(t)
        if sa == st:
            leads.add(())
        elif allow_batch and len(sa) == len(st) + 1 and sa[1:] == st:
            leads.add(sa[:1])
        else:
            allowed = f"{st} or (batch, *{st})" if allow_batch else f"{st}"
            raise ValueError(
                f"{name}{path} has shape {sa} but the M-FAC state's gradients have shape "
                f"{allowed} at that leaf"
            )
    if len(leads) != 1:
        raise ValueError(
            f"{name} mixes leaves with and without a leading batch axis (batch shapes "
            f"{sorted(leads)}); every leaf must carry the same leading axis, or none"
        )
    return leads.pop()


def _flatten(v: PyTree, lead: tuple[int, ...]) -> jax.Array:
    """Ravel every leaf after the leading ``lead`` axes and concatenate: ``[*lead, d]``.

    The same layout as :func:`linjax._tree.ravel` (which has no batch axis), leaf order of
    ``jax.tree.leaves``, dtype the promotion of the leaf dtypes.
    """
    parts = [jnp.reshape(a, lead + (-1,)) for a in jax.tree.leaves(v)]
    if len(parts) == 1:
        return parts[0]
    return jnp.concatenate(parts, axis=-1)


def _unflatten(flat: jax.Array, like: PyTree, dtypes: list | None = None) -> PyTree:
    """Inverse of :func:`_flatten`: leaf shapes from ``like``, leaf dtypes from ``dtypes``."""
    leaves, treedef = jax.tree.flatten(like)
    dts = [flat.dtype] * len(leaves) if dtypes is None else dtypes
    lead = flat.shape[:-1]
    sizes = [math.prod(_shape(t)) for t in leaves]
    splits = np.cumsum(sizes)[:-1].tolist()
    parts = jnp.split(flat, splits, axis=-1) if splits else [flat]
    out = [
        jnp.reshape(p, lead + _shape(t)).astype(dt)
        for p, t, dt in zip(parts, leaves, dts, strict=True)
    ]
    return jax.tree.unflatten(treedef, out)


def _leaf_dtypes(v: PyTree) -> list:
    return [a.dtype for a in jax.tree.leaves(v)]


# ---------------------------------------------------------------------------------------------
# The two passes and the m x m algebra
# ---------------------------------------------------------------------------------------------


def _g_times(G: jax.Array, x: jax.Array) -> jax.Array:
    """``G x``: ``[d] -> [m]`` or ``[B, d] -> [m, B]``, one pass over ``G``."""
    return jnp.tensordot(
        G,
        x,
        axes=((1,), (x.ndim - 1,)),
        precision=_HIGHEST,
        preferred_element_type=_acc_dtype(G.dtype, x.dtype),
    )


def _gt_times(G: jax.Array, c: jax.Array) -> jax.Array:
    """``G^T c``: ``[m] -> [d]`` or ``[m, B] -> [B, d]``, one pass over ``G``."""
    c = c.astype(_acc_dtype(G.dtype))
    return jnp.tensordot(
        c, G, axes=((0,), (0,)), precision=_HIGHEST, preferred_element_type=c.dtype
    )


def _num_rows(count: jax.Array, m: int, dtype: Any) -> jax.Array:
    """$n = \\min(\\text{count}, m)$, floored at 1 so an empty window gives $F = \\lambda I$."""
    return jnp.clip(count, 1, m).astype(dtype)


def _factor(gram: jax.Array, n: jax.Array, damping: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Lower Cholesky factor of ``S = n * damping * I + gram``; returns ``(L, damping)``.

    ``S`` is positive definite for ``damping > 0``, but when ``gram`` is numerically
    singular and ``n * damping`` is below its rounding error (float32 algebra, i.e. x64
    off, with a tiny damping) ``cholesky`` returns NaN. Only then the damping is raised
    to ``damping + m * eps * max(diag S) / n``, the resolution of ``S`` in its dtype, and
    the factor recomputed; the raised damping is returned so that every later use of the
    factor describes the same, slightly more damped, matrix. The state reports it in
    ``damping``. A window holding non-finite gradients stays non-finite.
    """
    m = gram.shape[0]
    eye = jnp.eye(m, dtype=gram.dtype)
    S = gram + (n * damping) * eye
    L = jnp.linalg.cholesky(S)

    def floored():
        shift = m * jnp.finfo(gram.dtype).eps * jnp.max(jnp.diagonal(S))
        return jnp.linalg.cholesky(S + shift * eye), damping + shift / n

    return lax.cond(jnp.all(jnp.isfinite(L)), lambda: (L, damping), floored)


def _solve_s(chol: jax.Array, r: jax.Array) -> jax.Array:
    """``S^{-1} r`` for ``r`` ``[m]`` or ``[m, B]`` with the Cholesky factor ``L`` of ``S``."""
    return jax.scipy.linalg.cho_solve((chol, True), r.astype(chol.dtype))


def _apply_inverse(state: MFACState, x: jax.Array, gx: jax.Array) -> jax.Array:
    """$F^{-1} x = (x - G^\\top S^{-1} G x) / \\lambda$ given the first pass ``gx = G x``."""
    c = _solve_s(state.chol, gx)
    out_dtype = jnp.result_type(x.dtype, _acc_dtype(state.grads.dtype))
    y = x.astype(out_dtype) - _gt_times(state.grads, c).astype(out_dtype)
    return y / state.damping.astype(out_dtype)


def _apply_fisher(state: MFACState, y: jax.Array, gy: jax.Array) -> jax.Array:
    """$F y = \\lambda y + G^\\top (G y) / n$ given ``gy = G y``."""
    n = _num_rows(state.count, state.grads.shape[0], state.chol.dtype)
    lam = state.damping.astype(y.dtype)
    return lam * y + _gt_times(state.grads, gy.astype(state.chol.dtype) / n).astype(y.dtype)


def _ihvp_flat(state: MFACState, x: jax.Array, gx: jax.Array | None, refine: int) -> jax.Array:
    """$F^{-1} x$ on raveled vectors, plus ``refine`` steps of iterative refinement.

    Each refinement step computes the true residual $r = x - F y$ and adds $F^{-1} r$
    (four passes over ``G``): it removes the cancellation error of $x - G^\\top c$ that
    float32 suffers when $x$ lies in the span of the window and $\\lambda$ is small
    (curvature.md §3.5).
    """
    G = state.grads
    y = _apply_inverse(state, x, _g_times(G, x) if gx is None else gx)
    for _ in range(refine):
        r = x.astype(y.dtype) - _apply_fisher(state, y, _g_times(G, y))
        y = y + _apply_inverse(state, r, _g_times(G, r))
    return y


def _push(state: MFACState, g: jax.Array) -> tuple[MFACState, jax.Array]:
    """Write ``g`` over the oldest row; return the new state and ``t = G_new g`` (``[m]``).

    ``t`` is both the new row/column of the Gram matrix (its entry ``position`` is
    ``g . g``) and the first pass of $F^{-1} g$ on the new window. The row is written
    *before* the pass reads the window: reading first and writing after would make XLA
    copy the whole window to protect the read, even when the state is donated.
    """
    G, small = state.grads, state.gram.dtype
    m = G.shape[0]
    pos = state.position
    G = lax.dynamic_update_slice(G, g.astype(G.dtype)[None, :], (pos, jnp.zeros_like(pos)))
    t = _g_times(G, g.astype(G.dtype)).astype(small)
    gram = state.gram.at[pos, :].set(t).at[:, pos].set(t)
    count = state.count + (state.count < _INT32_MAX).astype(state.count.dtype)
    position = (pos + 1) % m
    chol, damping = _factor(gram, _num_rows(count, m, small), state.damping)
    new = MFACState(G, gram, chol, damping, count, position, state.like)
    return new, t


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def mfac_init(like: PyTree, num_grads: int, damping: float | jax.Array) -> MFACState:
    r"""An empty M-FAC window of ``num_grads`` gradients shaped like ``like``.

    The empty window represents $F = \lambda I$. Gradients pushed with
    :func:`mfac_update` fill rows ``0, 1, ...``; until ``num_grads`` have been seen the
    curvature is averaged over the rows written so far (see the module docstring):

    $$F = \lambda I + \frac{1}{\min(\text{count}, m)} \sum_{i \le \min(\text{count}, m)}
    g_i g_i^\top .$$

    Args:
        like: pytree of floating arrays (or ``jax.ShapeDtypeStruct``) giving the structure,
            shapes and dtype of one gradient, usually the parameters. The window has their
            promoted dtype.
        num_grads: window size $m \ge 1$ (static).
        damping: $\lambda > 0$; a concrete value is checked eagerly, a traced one is not.

    Returns:
        :class:`MFACState` with ``grads`` ``[m, d]`` zeros and ``count == 0``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> state = cv.mfac_init({"w": jnp.zeros((2, 3))}, num_grads=4, damping=0.5)
        >>> state.grads.shape, int(state.count)
        ((4, 6), 0)
        >>> cv.mfac_ihvp(state, {"w": jnp.ones((2, 3))})["w"][0]   # F = 0.5 I
        Array([2., 2., 2.], dtype=float32)

    References:
        Frantar, Kurtic, Alistarh (2021), "M-FAC: Efficient Matrix-Free Approximations of
        Second-Order Information", NeurIPS. arXiv:2107.03356.
    """
    _tree.check_floating(like, "like")
    m = _tree.check_positive_int(num_grads, "num_grads")
    _check_damping(damping)
    leaves = jax.tree.leaves(like)
    dtype = jnp.result_type(*[leaf.dtype for leaf in leaves])
    d = _tree.tree_size(like)
    small = _small_dtype()
    damping = jnp.asarray(damping, small)
    return MFACState(
        grads=jnp.zeros((m, d), dtype),
        gram=jnp.zeros((m, m), small),
        chol=jnp.sqrt(damping) * jnp.eye(m, dtype=small),
        damping=damping,
        count=jnp.zeros((), jnp.int32),
        position=jnp.zeros((), jnp.int32),
        like=jax.tree.map(lambda a: jnp.zeros(_shape(a), jnp.bool_), like),
    )


def mfac_update(state: MFACState, grad: PyTree) -> MFACState:
    r"""Push ``grad`` into the window, replacing the oldest gradient once it is full.

    Cost: one pass $t = G g$ over the window ($O(md)$), the write of one row, the
    refresh of one row and column of $K = G G^\top$ ($O(m)$) and a fresh Cholesky factor
    of $S$ ($O(m^3)$, small next to $md$ for $d \gg m^2$). Rows are kept in ring order,
    which is exact because $F$ does not depend on the order of the rows. Under ``jit``,
    donate the state (``donate_argnums``) so the window is updated in place instead of
    copied (a copy costs two more passes over the window). A gradient with NaN or inf
    makes every product non-finite until it has left the window, ``m`` updates later:
    skip such steps before pushing (e.g. ``optax.apply_if_finite`` around the chain).

    Args:
        state: :class:`MFACState`.
        grad: one gradient, a pytree with the structure and leaf shapes of the state's
            ``like`` (no batch axis).

    Returns:
        The updated :class:`MFACState` (``count + 1``, ``position + 1 mod m``).

    Raises:
        ValueError: if ``grad``'s structure or a leaf shape differs from the state's.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> state = cv.mfac_init(jnp.zeros(2), num_grads=2, damping=1.0)
        >>> state = cv.mfac_update(state, jnp.array([3.0, 0.0]))   # F = diag(10, 1)
        >>> cv.mfac_ihvp(state, jnp.array([10.0, 1.0])).round(4)
        Array([1., 1.], dtype=float32)

    References:
        Frantar, Kurtic, Alistarh (2021), arXiv:2107.03356, §3 (dynamic algorithm).
    """
    _leading_shape(grad, state.like, "grad", allow_batch=False)
    new, _ = _push(state, _flatten(grad, ()))
    return new


def mfac_ihvp(state: MFACState, v: PyTree, *, refine: int = 0) -> PyTree:
    r"""Inverse-Fisher-vector product $F^{-1} v$ with the M-FAC window.

    $$F^{-1} v = \lambda^{-1}\left(v - G^\top c\right), \qquad c = S^{-1} G v,
    \qquad S = n\lambda I + G G^\top = L L^\top,$$

    two passes over the ``[m, d]`` window plus two triangular solves of size $m$.

    **Batches.** ``v`` is either one vector (every leaf shaped like the state's ``like``) or
    a batch of ``B`` vectors (every leaf with one extra leading axis of the same size
    ``B``); the rule compares each leaf's shape with the template, so it is unambiguous.
    A batch costs the same two passes, as GEMMs ``G V^T`` and ``C^T G``: extra right-hand
    sides are nearly free when the product is bandwidth-bound.

    **Refinement.** In float32 with small $\lambda$ and $v$ in the span of the window
    (the optimizer's case), $v - G^\top c$ cancels and loses about three digits.
    ``refine=k`` adds ``k`` steps $y \leftarrow y + F^{-1}(v - F y)$ at four passes each;
    one step recovers float32 accuracy (curvature.md §3.5).

    Args:
        state: :class:`MFACState`.
        v: vector pytree shaped like the state's ``like``, optionally with a leading batch
            axis on every leaf.
        refine: number of iterative-refinement steps, >= 0 (static).

    Returns:
        $F^{-1} v$ with the structure, shapes (batch axis included) and leaf dtypes of ``v``.

    Raises:
        ValueError: if ``v``'s structure or a leaf shape does not match the state's.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> grads = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}   # two gradients
        >>> state = cv.mfac_from_grads(grads, damping=1.0)        # F = diag(1.5, 3)
        >>> cv.mfac_ihvp(state, {"w": jnp.array([1.0, 1.0])})["w"].round(4)
        Array([0.6667, 0.3333], dtype=float32)
        >>> batch = {"w": jnp.eye(2)}                             # two vectors at once
        >>> cv.mfac_ihvp(state, batch)["w"].round(4)
        Array([[0.6667, 0.    ],
               [0.    , 0.3333]], dtype=float32)

    References:
        Frantar, Kurtic, Alistarh (2021), arXiv:2107.03356. Woodbury (1950), "Inverting
        modified matrices".
    """
    refine = _tree.check_positive_int(refine, "refine", minimum=0)
    lead = _leading_shape(v, state.like, "v", allow_batch=True)
    y = _ihvp_flat(state, _flatten(v, lead), None, refine)
    return _unflatten(y, state.like, _leaf_dtypes(v))


def mfac_from_grads(grads: PyTree, damping: float | jax.Array) -> MFACState:
    r"""The M-FAC state of a full window given at once (the static algorithm).

    ``grads`` holds $m$ gradients stacked on a leading axis. The Gram matrix is one GEMM,
    $K = G G^\top$ ($2m^2 d$ flops, BLAS-3), and $S = m\lambda I + K$ is factored once; this
    replaces the paper's $m$ sequential Sherman-Morrison passes (BLAS-2) with the same
    result. The returned state is a full window (``count == m``) and accepts
    :func:`mfac_update` like any other; the next update overwrites ``grads[0]``.

    Args:
        grads: pytree of floating arrays, every leaf ``[m, ...]`` with the same ``m >= 1``.
        damping: $\lambda > 0$.

    Returns:
        :class:`MFACState` with ``count == m`` and ``position == 0``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> state = cv.mfac_from_grads(jnp.array([[0.5, 0.0]]), damping=0.25)
        >>> cv.mfac_inverse_diagonal(state).round(4)   # F = diag(0.5, 0.25)
        Array([2., 4.], dtype=float32)

    References:
        Frantar, Kurtic, Alistarh (2021), arXiv:2107.03356, §3 (static algorithm).
    """
    _tree.check_floating(grads, "grads")
    _check_damping(damping)
    leaves = jax.tree.leaves(grads)
    leads = {_shape(a)[:1] for a in leaves}
    if len(leads) != 1 or () in leads or leads == {(0,)}:
        raise ValueError(
            "grads must carry the same leading window axis m >= 1 on every leaf, got "
            f"leaf shapes {[_shape(a) for a in leaves]}"
        )
    (m,) = leads.pop()
    dtype = jnp.result_type(*[a.dtype for a in leaves])
    G = _flatten(grads, (m,)).astype(dtype)
    small = _small_dtype()
    gram = jnp.matmul(G, G.T, precision=_HIGHEST, preferred_element_type=_acc_dtype(dtype)).astype(
        small
    )
    gram = 0.5 * (gram + gram.T)
    chol, damping = _factor(gram, jnp.asarray(m, small), jnp.asarray(damping, small))
    return MFACState(
        grads=G,
        gram=gram,
        chol=chol,
        damping=damping,
        count=jnp.asarray(m, jnp.int32),
        position=jnp.zeros((), jnp.int32),
        like=jax.tree.map(lambda a: jnp.zeros(_shape(a)[1:], jnp.bool_), grads),
    )


def inverse_diagonal_flat(state: MFACState) -> jax.Array:
    """``diag(F^{-1})`` as a flat ``[d]`` array (see :func:`mfac_inverse_diagonal`)."""
    G, L = state.grads, state.chol
    acc = _acc_dtype(G.dtype)
    # W = L^{-1} G as a GEMM with the m x m inverse (partitions along d like the passes).
    l_inv = jax.scipy.linalg.solve_triangular(L, jnp.eye(L.shape[0], dtype=L.dtype), lower=True)
    W = jnp.matmul(l_inv.astype(acc), G, precision=_HIGHEST, preferred_element_type=acc)
    lam = state.damping.astype(acc)
    diag = (1 - jnp.sum(W * W, axis=0)) / lam
    # (F^{-1})_jj >= 1 / F_jj for any SPD F: a floor that only removes cancellation error
    # (1 - ||W_j||^2 can round to <= 0 when the window dominates the damping).
    n = _num_rows(state.count, G.shape[0], acc)
    f_jj = lam + jnp.sum(jnp.square(G.astype(acc)), axis=0) / n
    return jnp.maximum(diag, 1 / f_jj)


def mfac_inverse_diagonal(state: MFACState) -> PyTree:
    r"""The diagonal of $F^{-1}$, shaped like one gradient (for OBS pruning).

    With $W = L^{-1} G$ ($L$ the Cholesky factor of $S = n\lambda I + G G^\top$, which
    carries the $1/n$ scaling),

    $$[F^{-1}]_{jj} = \lambda^{-1}\left(1 - \lVert W_{:,j} \rVert^2\right),$$

    one $m \times m$ triangular inverse and one GEMM ($2m^2 d$ flops), with an ``[m, d]``
    temporary. Values are floored at $1/F_{jj}$, a lower bound that holds for every SPD
    matrix, so float32 cancellation can never give a zero or negative entry.

    Args:
        state: :class:`MFACState`.

    Returns:
        Pytree shaped like the state's ``like``, in the window's dtype.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> state = cv.mfac_from_grads({"w": jnp.array([[0.0, 0.5]])}, damping=0.25)
        >>> cv.mfac_inverse_diagonal(state)["w"].round(4)   # F = diag(0.25, 0.5)
        Array([4., 2.], dtype=float32)

    References:
        Frantar, Kurtic, Alistarh (2021), arXiv:2107.03356, §3.1 (O(m) per inverse entry).
        Hassibi, Stork (1993), "Second order derivatives for network pruning: Optimal Brain
        Surgeon", NeurIPS.
    """
    diag = inverse_diagonal_flat(state)
    return _unflatten(diag.astype(state.grads.dtype), state.like)


def mfac(
    num_grads: int = 1024, damping: float | jax.Array = 1e-5, *, refine: int = 0
) -> optax.GradientTransformation:
    r"""M-FAC preconditioner as an optax transform: updates become $F^{-1} g$.

    Each ``update`` pushes the incoming gradient $g$ into the window (dropping the oldest
    once $m$ have been seen) and returns $F^{-1} g$ for the new window. The two are fused:
    the pass $t = G g$ that refreshes the Gram matrix is also the first pass of the
    product, so one step streams the window twice (the minimum, curvature.md §7). During
    warm-up the curvature is averaged over the gradients seen so far,
    $\min(\text{count}, m)$ (the reference code divides by $m$ from the start, which
    under-scales it). Compose with a learning rate, and with momentum or weight decay
    before it if wanted::

        optax.chain(mfac(num_grads=64, damping=1e-4), optax.scale(-lr))

    The state is :class:`MFACState` (the window, Gram matrix and factor), so checkpoints
    keep the curvature window. The configured ``damping`` is written into the state at
    every update, so it wins over whatever a restored state carries. Jit the training
    step with the optimizer state donated (``jax.jit(step, donate_argnums=...)``): the
    window is then written in place; otherwise XLA copies it every step. Non-finite
    gradients poison the window for ``m`` steps (see :func:`mfac_update`).

    Args:
        num_grads: window size $m \ge 1$ (static).
        damping: $\lambda > 0$.
        refine: iterative-refinement steps per update (see :func:`mfac_ihvp`), >= 0; each
            costs four more passes over the window.

    Returns:
        ``optax.GradientTransformation``; ``update(updates, state, params=None)`` ignores
        ``params`` and returns updates with the dtypes of ``updates``.

    Examples:
        >>> import jax.numpy as jnp, optax
        >>> from linjax import curvature as cv
        >>> params = {"w": jnp.array([1.0, -2.0])}
        >>> opt = optax.chain(cv.mfac(num_grads=8, damping=1.0), optax.scale(-0.5))
        >>> state = opt.init(params)
        >>> grads = {"w": jnp.array([1.0, 0.0])}                 # F = diag(2, 1)
        >>> updates, state = opt.update(grads, state)
        >>> updates["w"]
        Array([-0.25, -0.  ], dtype=float32)

    References:
        Frantar, Kurtic, Alistarh (2021), arXiv:2107.03356 (M-FAC optimizer).
    """
    m = _tree.check_positive_int(num_grads, "num_grads")
    _check_damping(damping)
    refine = _tree.check_positive_int(refine, "refine", minimum=0)

    def init_fn(params: PyTree) -> MFACState:
        return mfac_init(params, m, damping)

    def update_fn(updates: PyTree, state: MFACState, params: PyTree = None):
        del params
        _leading_shape(updates, state.like, "updates", allow_batch=False)
        state = state._replace(damping=jnp.asarray(damping, state.damping.dtype))
        g = _flatten(updates, ())
        state, t = _push(state, g)
        y = _ihvp_flat(state, g, t, refine)
        return _unflatten(y, state.like, _leaf_dtypes(updates)), state

    return optax.GradientTransformation(init_fn, update_fn)
