"""Interval bound propagation (IBP) through the traced graph of any function."""

from __future__ import annotations

from collections.abc import Callable

import jax

from linjax.verify import _graph
from linjax.verify._box import Box, check_box
from linjax.verify._rules import get_rule


def node_args(node: _graph.Node, env: dict[int, Box]) -> list:
    """The node's arguments: the current :class:`Box` of bounded ones, constants as is."""
    return [env[r] if _graph.is_bounded(r) else r.value for r in node.inputs]


def ibp_node(node: _graph.Node, args: list) -> list[Box]:
    """Apply the IBP rule of ``node`` and return one :class:`Box` per output."""
    out = get_rule(node.primitive).ibp(*args, **node.params)
    outs = list(out) if node.primitive.multiple_results else [out]
    if len(outs) != len(node.outputs) or not all(isinstance(b, Box) for b in outs):
        raise TypeError(
            f"the IBP rule of '{node.primitive.name}' must return "
            f"{'a list of ' if node.primitive.multiple_results else ''}Box, got {out!r:.200}"
        )
    return outs


def output_box(graph: _graph.Graph, env: dict[int, Box]) -> Box:
    """The output's box (a zero-width box for a constant output)."""
    if _graph.is_bounded(graph.output):
        return env[graph.output]
    value = jax.numpy.asarray(graph.output.value)
    return Box(value, value)


def ibp(fn: Callable[[jax.Array], jax.Array], box: Box) -> Box:
    r"""Interval bounds on ``fn(x)`` for all ``x`` in ``box`` (interval bound propagation).

    ``fn`` is traced with ``jax.make_jaxpr`` and interpreted primitive by primitive: an
    affine op $y = Wx + b$ maps the centre $c$ and radius $r$ of its input box to
    $Wc + b$ and $|W|r$; monotone ops map the end points; every other primitive has its
    own rule (see :func:`register_rule`). Parts of ``fn`` that do not depend on ``x``
    (weights, constants) are evaluated exactly. The bounds are sound (up to
    floating-point rounding) and cost about two forward passes, but they grow quickly
    with depth; :func:`crown` is usually much tighter.

    Works for any JAX function of one array (flax nnx / equinox models called through a
    plain function, residual graphs, convolutions): nested ``jit``, ``custom_jvp``,
    ``custom_vjp`` and ``checkpoint`` calls are inlined. Loops and conditionals
    (``scan``, ``while``, ``cond``) on bounded values are not supported. It is pure and
    traceable: ``jit``, ``grad`` (with respect to closed-over parameters) and ``vmap``
    over a batch of boxes all work; matrix products run at the highest precision.

    Args:
        fn: a function from one array shaped like ``box.lower`` to one real floating array.
        box: the input set, :class:`Box` with ``lower <= upper``.

    Returns:
        :class:`Box` of the shape and dtype of ``fn``'s output.

    Raises:
        NotImplementedError: if ``fn`` applies a primitive with no rule to a value that
            depends on the input; the message names the primitive and how to register one.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> W = jnp.array([[1.0, -1.0], [2.0, 1.0]])
        >>> out = vf.ibp(lambda x: jax.nn.relu(W @ x), vf.Box.from_eps(jnp.zeros(2), 1.0))
        >>> out.lower, out.upper
        (Array([0., 0.], dtype=float32), Array([2., 3.], dtype=float32))

    References:
        Gowal et al. (2018), "On the effectiveness of interval bound propagation for
        training verifiably robust models", https://arxiv.org/abs/1810.12715.
    """
    box = check_box(box)
    with jax.default_matmul_precision("highest"):
        graph = _graph.trace(fn, jax.ShapeDtypeStruct(box.lower.shape, box.lower.dtype))
        env = {0: box}
        for node in graph.nodes:
            for v, b in zip(node.outputs, ibp_node(node, node_args(node, env)), strict=True):
                env[v] = b
        return output_box(graph, env)
