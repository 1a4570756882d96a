r"""Local Lipschitz constants from Jacobian bounds, and the naive product of layer norms."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import primitives as prims

from linjax.verify import _derivative_rules, _graph
from linjax.verify._box import Box, check_box
from linjax.verify._crown import _two_sided, concretize, propagate
from linjax.verify._jacobian import check_fn_on_box, jacobian_bounds, jacobian_fn


def _check_norm(norm: Any) -> str:
    if isinstance(norm, str):
        key = norm.lower()
    elif isinstance(norm, bool):
        key = None
    elif isinstance(norm, (int, float)):
        key = "inf" if math.isinf(norm) and norm > 0 else str(int(norm)) if norm in (1, 2) else None
    else:
        key = None
    if key not in ("inf", "1", "2"):
        raise ValueError(f"norm={norm!r} must be one of 'inf' (or math.inf), 2 or 1")
    return key


def _dual_norm(a: jax.Array, key: str) -> jax.Array:
    """Dual norm over the last axis of a nonnegative array."""
    if key == "inf":
        return jnp.sum(a, axis=-1)
    if key == "2":
        return jnp.sqrt(jnp.sum(jnp.square(a), axis=-1))
    return jnp.max(a, axis=-1)


def local_lipschitz(
    fn: Callable[[jax.Array], jax.Array],
    box: Box,
    *,
    norm: Any = "inf",
    method: str = "crown-ibp",
) -> jax.Array:
    r"""Per-output upper bounds on the local Lipschitz constant of ``fn`` over ``box``.

    For every output $i$ and all $x, y$ in the box,
    $|f_i(x) - f_i(y)| \le L_i \, \|x - y\|_p$ with
    $L_i = \max_{G \in \mathcal{J}} \|G_{i,:}\|_{q}$, $1/p + 1/q = 1$, where
    $\mathcal{J} = [\underline J, \overline J]$ are the elementwise Jacobian bounds of
    :func:`jacobian_bounds` (which contain the Clarke Jacobian at every point of the
    box). With $A = \max(|\underline J|, |\overline J|)$ the maximum over the box of
    Jacobians is exact:

    * ``norm="inf"`` (input perturbations in $\ell_\infty$): $L_i = \sum_j A_{ij}$ (dual $\ell_1$);
    * ``norm=2``: $L_i = (\sum_j A_{ij}^2)^{1/2}$;
    * ``norm=1``: $L_i = \max_j A_{ij}$ (dual $\ell_\infty$).

    These bounds follow the weights through the network symbolically, so for ReLU and
    tanh MLPs the $\ell_\infty$ and $\ell_1$ bounds are never above the naive product of
    layer operator norms (:func:`naive_lipschitz`) and usually far below it. For
    ``norm=2`` that is not guaranteed when many neurons are unstable (a box of
    Jacobians is not a spectral-norm ball), but it holds on small boxes.

    Args:
        fn: a function from one array shaped like ``box.lower`` to one real floating array.
        box: input set, :class:`Box` with ``lower <= upper``.
        norm: the input norm $p$: ``"inf"`` (default; also ``math.inf``), ``2`` or ``1``.
        method: passed to :func:`jacobian_bounds`. With ``"crown"`` (slowest, tightest)
            the norm $\|\,|J(x)_{i,:}|\,\|_q$ is also bounded directly by CROWN, which
            keeps the dependence between entries that a box of Jacobians forgets (the
            GradNorm construction of Shi et al.); the smaller bound is returned.

    Returns:
        Array of ``fn``'s output shape: $L_i$ for every output (a scalar for a scalar
        ``fn``).

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> W = jnp.array([[1.0, -2.0], [0.5, 1.0]])
        >>> L = vf.local_lipschitz(lambda x: jax.nn.relu(W @ x), vf.Box.from_eps(jnp.ones(2), 0.1))
        >>> L + 0.0  # unit 0 is off on the box, unit 1 on: |0.5| + |1|
        Array([0. , 1.5], dtype=float32)

    References:
        Shi et al. (2022), "Efficiently computing local Lipschitz constants of neural
        networks via bound propagation", https://arxiv.org/abs/2210.07394.
    """
    key = _check_norm(norm)
    if method == "crown":
        return _crown_lipschitz(fn, box, key)
    jb = jacobian_bounds(fn, box, method=method)
    return _from_jacobian(jb, jnp.ndim(box.lower), key)


def _from_jacobian(jb: Box, in_ndim: int, key: str) -> jax.Array:
    out_shape = jb.lower.shape[: jb.lower.ndim - in_ndim]
    a = jnp.maximum(jnp.abs(jb.lower), jnp.abs(jb.upper)).reshape(out_shape + (-1,))
    return _dual_norm(a, key)


def _crown_lipschitz(fn: Callable, box: Box, key: str) -> jax.Array:
    r"""``method="crown"``: also bound the dual norm itself by CROWN (Shi et al.).

    One propagation through the graph of $x \mapsto \|\,|J(x)_{i,:}|\,\|_q$ gives
    CROWN bounds on every Jacobian entry (the inputs of ``abs``) and a linear upper
    bound of the norm that keeps the entries' dependence on $x$; the smaller of that
    and the dual norm of the Jacobian box is returned.
    """
    box = check_box(box)
    out = check_fn_on_box(fn, box)
    in_shape = tuple(jnp.shape(box.lower))
    like = jax.ShapeDtypeStruct(in_shape, box.lower.dtype)
    jac = jacobian_fn(fn, like)
    out_shape = tuple(out.shape)

    def norm_fn(x):
        a = jnp.abs(jac(x)).reshape(out_shape + (-1,))
        if key == "2":
            return jnp.sqrt(jnp.sum(a * a, axis=-1))
        return jnp.sum(a, axis=-1) if key == "inf" else jnp.max(a, axis=-1)

    with jax.default_matmul_precision("highest"):
        graph = _graph.trace(norm_fn, like)
        abs_nodes = [n for n in graph.nodes if n.primitive is prims.abs_p]
        if not _graph.is_bounded(graph.output) or not abs_nodes:  # constant Jacobian
            return _from_jacobian(jacobian_bounds(fn, box, method="crown"), len(in_shape), key)
        graph = _derivative_rules.hull_selects(graph)
        prop = propagate(graph, box, intermediate="crown")
        jb = prop.bounds[abs_nodes[-1].inputs[0]]
        jb = Box(jb.lower.reshape(out_shape + in_shape), jb.upper.reshape(out_shape + in_shape))
        from_box = _from_jacobian(jb, len(in_shape), key)
        size = int(np.prod(out_shape, dtype=np.int64))
        eye = jnp.eye(size, dtype=out.dtype).reshape((size,) + out_shape)
        _, _, uA, ub = _two_sided(prop, box, graph.output, eye, start_key="output")
        upper = -concretize(-uA, -ub, box).reshape(out_shape)
    return jnp.minimum(from_box, upper)


def _operator_norm(w: jax.Array, key: str) -> jax.Array:
    if key == "inf":
        return jnp.max(jnp.sum(jnp.abs(w), axis=1))
    if key == "1":
        return jnp.max(jnp.sum(jnp.abs(w), axis=0))
    return jnp.linalg.norm(w, 2)


def naive_lipschitz(
    weights: Sequence[jax.typing.ArrayLike],
    *,
    norm: Any = "inf",
    activation_lipschitz: float = 1.0,
) -> jax.Array:
    r"""The naive global bound: product of layer operator norms of an MLP.

    For $f(x) = W_L\,\sigma(W_{L-1} \cdots \sigma(W_1 x + b_1) \cdots) + b_L$ with a
    $c$-Lipschitz activation, output $i$ has Lipschitz constant (input norm $p$) at most
    $\|W_{L,i}\|_q \prod_{k<L} c\,\|W_k\|_{p \to p}$: the reference that
    :func:`local_lipschitz` improves on.

    Args:
        weights: the matrices ``W_1, ..., W_L``, each ``[out, in]`` (``W @ x``).
        norm: ``"inf"``, ``2`` or ``1`` as in :func:`local_lipschitz`.
        activation_lipschitz: $c$ (1 for ReLU, leaky ReLU and tanh; 1/4 for sigmoid).

    Returns:
        ``[out]`` array: the bound per output.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> W1, W2 = jnp.array([[1.0, -2.0], [0.5, 1.0]]), jnp.array([[1.0, 1.0]])
        >>> vf.naive_lipschitz([W1, W2])  # ||W2||_1 * max row sum of |W1|
        Array([6.], dtype=float32)
    """
    key = _check_norm(norm)
    ws = [jnp.asarray(w) for w in weights]
    if not ws or any(w.ndim != 2 for w in ws):
        raise ValueError(
            f"weights must be a non-empty sequence of 2-D matrices, got shapes "
            f"{[tuple(w.shape) for w in ws]}"
        )
    for a, b in zip(ws[:-1], ws[1:], strict=False):
        if b.shape[1] != a.shape[0]:
            raise ValueError(
                f"weights do not chain: a [{a.shape[0]}, {a.shape[1]}] layer is followed by "
                f"[{b.shape[0]}, {b.shape[1]}] (need W_k+1.shape[1] == W_k.shape[0])"
            )
    scale = jnp.asarray(1.0, ws[-1].dtype)
    for w in ws[:-1]:
        scale = scale * activation_lipschitz * _operator_norm(w, key)
    return _dual_norm(jnp.abs(ws[-1]), key) * scale
