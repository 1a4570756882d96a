r"""The flow-model contracts shared by the flow samplers and the flow losses.

Flow models run in *flow time* $t \in [0, 1]$, from the base (noise) at $t = 0$ to the data at
$t = 1$, along the linear interpolant $I_t = (1 - t)\,x_0 + t\,x_1$ (the convention of Boffi
et al.'s flow-map code). Callables put the time(s) before the state, as the flow map
$X(\text{params}, s, t, x)$ does (and diffrax's vector fields ``f(t, y, args)``):

* losses take ``velocity_fn(params, t, x)`` / ``net_fn(params, s, t, x)`` and call them on
  **one sample** at a time (``jax.vmap`` over the leading batch axis of ``x0``/``x1``), with
  scalar times;
* samplers take ``velocity_fn(t, x)`` (``functools.partial(velocity_fn, params)`` of a trained
  model) or ``velocity_fn(t, x, cond)`` and call it on the sample **as given** (one sample or
  a batch) with a scalar ``t``; ``jax.vmap`` the sampler to run a per-sample model on a batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from linjax import _tree
from linjax.generative._eps import _leaf_summary, check_like


def check_callable(fn: Any, name: str, signature: str) -> None:
    """Raise ``TypeError`` unless ``fn`` is callable (the message shows the signature)."""
    if not callable(fn):
        raise TypeError(f"{name} must be callable as {signature}, got {type(fn)}")


def check_output(fn: Callable, args: tuple, like: Any, signature: str) -> None:
    """Check statically that ``fn(*args)`` returns a pytree structured, shaped, typed like ``like``.

    Raises ``TypeError`` if the call fails or a dtype differs, ``ValueError`` if the structure
    or a shape differs; the messages name ``signature``.
    """
    try:
        out = jax.eval_shape(fn, *args)
    except Exception as e:  # re-raised with the shapes the model was given
        raise TypeError(f"{signature} failed for x with leaves [{_leaf_summary(like)}]: {e}") from e
    check_like(out, like, signature, "the output")


def check_pair_batch(x0: Any, x1: Any) -> int:
    """Validate a batch of base/data pairs; return the batch size (leading axis of every leaf)."""
    _tree.check_floating(x0, "x0")
    _tree.check_floating(x1, "x1")
    _tree.check_same_structure(x0, x1, "x0", "x1")
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(x0)}
    if None in sizes or len(sizes) != 1 or 0 in sizes:
        raise ValueError(
            "x0 and x1 must be batches: every leaf needs the same leading batch axis of size "
            f">= 1, got leaf shapes {[tuple(leaf.shape) for leaf in jax.tree.leaves(x0)]}"
        )
    return sizes.pop()


def one_sample(x: Any) -> Any:
    """Shape-dtype structs of one sample of the batch ``x`` (its leaves without axis 0)."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), x)


def time_dtype(x: Any) -> Any:
    """The dtype in which times are drawn and grids are built: the samples' common dtype."""
    return _tree.tree_dtype(x)


def lerp(t: jax.Array, x0: Any, x1: Any) -> Any:
    r"""The linear interpolant $I_t = (1 - t)\,x_0 + t\,x_1$, leaf by leaf."""
    return jax.tree.map(
        lambda a, b: (1 - jnp.asarray(t, a.dtype)) * a + jnp.asarray(t, a.dtype) * b, x0, x1
    )


def sq_norm(x: Any) -> jax.Array:
    """Squared Euclidean norm of a pytree (one sample) as one vector."""
    parts = [jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(x)]
    return sum(parts[1:], parts[0])


def uniform_grid(num_steps: int, dtype: Any) -> jax.Array:
    """``[k / num_steps for k = 0..num_steps]`` in ``dtype`` (exact endpoints 0 and 1)."""
    return jnp.arange(num_steps + 1, dtype=dtype) / jnp.asarray(num_steps, dtype)
