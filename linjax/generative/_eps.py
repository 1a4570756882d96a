"""The noise-prediction contract shared by the samplers: ``eps_fn(x, t, cond) -> eps``.

A model enters every sampler only through ``eps_fn``. Plain callables are pure functions of
``(x, t, cond)``; a :class:`StatefulEpsFn` additionally threads a state through the sampling
loop (APG's momentum buffer), which only the forward samplers accept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from linjax import _tree


class StatefulEpsFn(NamedTuple):
    r"""A noise predictor that carries state along one sampling trajectory.

    :func:`ddim_sample` and :func:`edict_sample` accept it in place of a plain ``eps_fn``
    and carry the state in their ``lax.scan``; the state is created afresh by ``init`` at
    the start of every call, so it never leaks between trajectories. The inverters
    (:func:`ddim_invert`, :func:`edict_invert`) refuse it: inversion needs $\varepsilon$
    to be a function of ``(x, t, cond)`` alone.

    Attributes:
        init: ``init(x_T) -> state``, called once per trajectory with the starting sample.
        apply: ``apply(x, t, cond, state) -> (eps, state)``.
    """

    init: Callable[[Any], Any]
    apply: Callable[[Any, jax.Array, Any, Any], tuple[Any, Any]]


def _leaf_summary(tree: Any) -> str:
    return ", ".join(
        f"{tuple(leaf.shape)}/{jnp.dtype(leaf.dtype).name}" for leaf in jax.tree.leaves(tree)
    )


def check_like(out: Any, x: Any, signature: str, what: str) -> None:
    """Raise unless a model output ``out`` has the structure, shapes and dtypes of ``x``.

    ``ValueError`` for a structure or shape mismatch, ``TypeError`` for a dtype mismatch; the
    messages name ``signature`` and call the output ``what``.
    """
    sx, so = jax.tree.structure(x), jax.tree.structure(out)
    if sx != so:
        raise ValueError(f"{signature} returned structure {so}, but x has {sx}")
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(x), strict=True):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(
                f"{signature} returned shape {tuple(a.shape)}, but x has shape "
                f"{tuple(b.shape)}; {what} must have the shape of x"
            )
        if a.dtype != b.dtype:
            raise TypeError(
                f"{signature} returned dtype {jnp.dtype(a.dtype).name}, but x has dtype "
                f"{jnp.dtype(b.dtype).name}; cast {what} (or x) so that they agree"
            )


def as_stateful(
    eps_fn: Any, x: Any, cond: Any, *, allow_state: bool, caller: str
) -> tuple[Callable[[Any], Any], Callable[..., tuple[Any, Any]]]:
    """Validate ``eps_fn`` against ``x`` and return it as an ``(init, apply)`` pair.

    Raises ``TypeError`` for a non-callable, a stateful predictor where none is allowed, or
    an output dtype differing from ``x``'s, and ``ValueError`` for an output whose structure
    or shapes differ from ``x``'s.
    """
    if isinstance(eps_fn, StatefulEpsFn):
        if not allow_state:
            raise TypeError(
                f"{caller} needs a stateless eps_fn(x, t, cond): inversion must evaluate the "
                "same function of (x, t) as sampling, which a StatefulEpsFn (e.g. APG with "
                "momentum != 0) does not; use guided_eps_fn(..., momentum=0.0) or cfg"
            )
        init, apply = eps_fn
    elif callable(eps_fn):
        init = lambda x0: ()
        apply = lambda x_, t, c, s: (eps_fn(x_, t, c), s)
    else:
        raise TypeError(f"eps_fn must be callable as eps_fn(x, t, cond), got {type(eps_fn)}")

    t = jax.ShapeDtypeStruct((), jnp.int32)
    try:
        state = jax.eval_shape(init, x)
        out, new_state = jax.eval_shape(apply, x, t, cond, state)
    except Exception as e:  # re-raised with the shapes the predictor was given
        raise TypeError(
            f"eps_fn(x, t, cond) failed for x with leaves [{_leaf_summary(x)}], an int32 "
            f"scalar t and cond with structure {jax.tree.structure(cond)}: {e}"
        ) from e
    check_like(out, x, "eps_fn(x, t, cond)", "eps")
    if jax.tree.structure(new_state) != jax.tree.structure(state):
        raise ValueError(
            "StatefulEpsFn.apply must return a state with the structure init() gives: "
            f"{jax.tree.structure(new_state)} vs {jax.tree.structure(state)}"
        )
    return init, apply


def check_sample(x: Any, name: str) -> None:
    """Raise unless ``x`` is a non-empty pytree of real floating arrays."""
    _tree.check_floating(x, name)


def affine(a: jax.Array, x: Any, b: jax.Array, e: Any) -> Any:
    """``a * x + b * e`` leaf by leaf, with the scalars cast to each leaf's dtype."""
    return jax.tree.map(
        lambda xl, el: jnp.asarray(a, xl.dtype) * xl + jnp.asarray(b, xl.dtype) * el, x, e
    )
