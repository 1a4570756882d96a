r"""Bounds on the Jacobian of any function over a box, by bound propagation through its
derivative graph (Shi et al. 2022)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from linjax.verify import _derivative_rules, _graph, _smooth
from linjax.verify._box import Box, check_box
from linjax.verify._crown import _two_sided, concretize, propagate
from linjax.verify._ibp import ibp_node, node_args

_METHODS = ("ibp", "crown-ibp", "crown")


def check_fn_on_box(fn: Callable, box: Box) -> jax.ShapeDtypeStruct:
    """``fn``'s output shape at the box's shape, with a clear error if it does not apply."""
    if not callable(fn):
        raise TypeError(f"fn must be a callable array -> array, got {type(fn).__name__}")
    like = jax.ShapeDtypeStruct(jnp.shape(box.lower), box.lower.dtype)
    try:
        out = jax.eval_shape(fn, like)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"fn cannot be applied to an input of the box's shape {like.shape} "
            f"(dtype {like.dtype}): {e}"
        ) from e
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(
            "fn must return a single array; got a pytree with structure "
            f"{jax.tree.structure(out)} (wrap fn to return one array)"
        )
    if not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"fn must return a real floating array, got dtype {out.dtype}")
    return out


def jacobian_fn(fn: Callable, like: jax.ShapeDtypeStruct) -> Callable:
    """``jax.jacrev(fn)`` with smooth activations differentiating to single nodes."""
    return jax.jacrev(_smooth.with_derivative_nodes(fn, like))


def jacobian_bounds(
    fn: Callable[[jax.Array], jax.Array], box: Box, *, method: str = "crown-ibp"
) -> Box:
    r"""Elementwise bounds on the Jacobian $\partial f / \partial x$ of ``fn`` over ``box``.

    The reverse-mode Jacobian of ``fn`` (``jax.jacrev``) is itself a JAX function of
    $x$: a forward pass that fixes the pre-activations $z_k(x)$, then a backward pass
    $g_{k} = W_k^\top (\sigma'(z_k) \odot g_{k+1})$. That function is traced and bounded
    like any other by the bound-propagation interpreter (the approach of Shi et al. 2022,
    who append the gradient graph to the network and bound every node):

    * pre-activation bounds come from IBP (and CROWN for ``method="crown"``), so a
      stable ReLU contributes exactly 0 or 1 and an unstable one the Clarke interval
      $[0, 1]$ (the derivative ``select(z > 0, g, 0)`` is relaxed by the hull of its
      two branches, linearly in $g$: $\tfrac{-l}{u-l}(g-u) \le \text{relu}'(z) g \le
      \tfrac{u}{u-l}(g-l)$ for $g\in[l,u]$);
    * the derivatives of ``tanh``, ``logistic`` (sigmoid), ``erf``, ``erfc`` and
      ``atan`` are single nodes bounded by their exact range on the pre-activation
      interval, and so are composite elementwise activations such as GELU
      $z\,\Phi(z)$ (exact or tanh form), SiLU, softplus and ELU, whose derivative is
      bounded on 64 sub-intervals (``fn`` is re-traced with these activations in a
      ``custom_jvp``); anything else (layer norm, ...) is bounded through its own derivative
      graph, products of bounded values by interval arithmetic / McCormick planes
      (sound, looser on wide pre-activation intervals);
    * products with the weights are exact (centre/radius) in IBP and kept symbolic in
      CROWN's backward pass, which is what makes the bounds tighter than a product of
      layer norms.

    The result is the intersection of the IBP bounds and (unless ``method="ibp"``) the
    CROWN bounds of the Jacobian graph. It contains the Jacobian JAX computes at every
    point of the box, hence the derivative wherever ``fn`` is differentiable and the
    Clarke generalised Jacobian at every interior point (limits and convex hulls of
    derivatives stay in a box). At a zero-width box of a smooth ``fn`` it is the exact
    Jacobian.

    Supported: whatever the rule table supports in the derivative graph (dense and conv
    layers, residual graphs, ReLU, leaky ReLU, abs, tanh, sigmoid, exact and tanh GELU,
    softplus, ...). A primitive without a rule (in ``fn`` or in its derivative) raises
    ``NotImplementedError`` naming it (see :func:`register_rule`). Pure and traceable:
    works under ``jit``, and under ``vmap`` over a batch of boxes.

    Cost: ``"crown-ibp"`` (default) is one backward pass with one row per Jacobian
    entry (``2 * out_size * in_size`` rows); ``"crown"`` adds a backward pass for every
    intermediate node of the derivative graph (tightest, much slower); ``"ibp"`` costs
    about two Jacobian evaluations.

    Args:
        fn: a function from one array shaped like ``box.lower`` to one real floating array.
        box: input set, :class:`Box` with ``lower <= upper``.
        method: ``"crown-ibp"`` (default), ``"crown"`` or ``"ibp"``.

    Returns:
        :class:`Box` with arrays of shape ``fn(x).shape + x.shape`` (the layout of
        ``jax.jacrev(fn)(x)``): ``lower[i..., j...] <= d fn(x)[i...] / d x[j...] <=
        upper[i..., j...]`` for every ``x`` in the box.

    Raises:
        ValueError: for a malformed box, a ``fn`` that does not apply to the box's shape,
            or an unknown ``method``.
        TypeError: for a ``fn`` that does not return one real floating array.
        NotImplementedError: for a primitive with no bound rule.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> W = jnp.array([[1.0, -2.0], [0.5, 1.0]])
        >>> jb = vf.jacobian_bounds(lambda x: jax.nn.relu(W @ x), vf.Box.from_eps(jnp.ones(2), 0.1))
        >>> jb.lower + 0.0  # unit 0 is off (W[0] @ x < 0), unit 1 is on: exactly W[1]
        Array([[0. , 0. ],
               [0.5, 1. ]], dtype=float32)

    References:
        Shi et al. (2022), "Efficiently computing local Lipschitz constants of neural
        networks via bound propagation", https://arxiv.org/abs/2210.07394.
        Weng et al. (2018), "Towards fast computation of certified robustness for ReLU
        networks" (Fast-Lip), https://arxiv.org/abs/1804.09699.
    """
    box = check_box(box)
    if method not in _METHODS:
        raise ValueError(f"{method=} must be one of {_METHODS}")
    out = check_fn_on_box(fn, box)
    in_shape = tuple(jnp.shape(box.lower))
    jac_shape = tuple(out.shape) + in_shape
    like = jax.ShapeDtypeStruct(in_shape, box.lower.dtype)
    with jax.default_matmul_precision("highest"):
        graph = _graph.trace(jacobian_fn(fn, like), like)
        if not _graph.is_bounded(graph.output):  # affine fn: a constant Jacobian
            value = jnp.broadcast_to(jnp.asarray(graph.output.value, out.dtype), jac_shape)
            return Box(value, value)
        graph = _derivative_rules.hull_selects(graph)
        if method == "ibp":
            env = {0: box}
            for node in graph.nodes:
                for v, b in zip(node.outputs, ibp_node(node, node_args(node, env)), strict=True):
                    env[v] = b
            return env[graph.output]
        intermediate = "crown" if method == "crown" else "ibp"
        prop = propagate(graph, box, intermediate=intermediate)
        ibp_box = prop.bounds[graph.output]
        size = int(np.prod(jac_shape, dtype=np.int64))
        eye = jnp.eye(size, dtype=out.dtype).reshape((size,) + jac_shape)
        lA, lb, uA, ub = _two_sided(prop, box, graph.output, eye, start_key="output")
        low = concretize(lA, lb, box).reshape(jac_shape)
        high = -concretize(-uA, -ub, box).reshape(jac_shape)
        low = jnp.maximum(low, ibp_box.lower.reshape(jac_shape))
        high = jnp.minimum(high, ibp_box.upper.reshape(jac_shape))
    # Both sides are sound, so they can only cross by rounding (exactly known entries).
    return Box(jnp.minimum(low, high), jnp.maximum(low, high))
