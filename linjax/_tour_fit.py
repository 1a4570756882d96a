"""The optimisation loop the tour sections share: an optax optimiser in one jitted ``lax.scan``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.random as jr
import numpy as np
import optax


def fit(
    loss_fn: Callable, params: Any, opt: optax.GradientTransformation, *, steps: int, key: jax.Array
) -> tuple[Any, np.ndarray]:
    """``steps`` updates of ``params`` by ``opt`` on ``loss_fn(params, key_t)``.

    Each step gets its own key (``jr.split(key, steps)``). Returns the trained params and
    the ``[steps]`` losses.
    """

    @jax.jit
    def run(params, key):
        def step(carry, k):
            params, state = carry
            loss, g = jax.value_and_grad(loss_fn)(params, k)
            updates, state = opt.update(g, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jr.split(key, steps))
        return params, losses

    params, losses = run(params, key)
    return params, np.asarray(losses)
