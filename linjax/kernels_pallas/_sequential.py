"""Run a blocked XLA computation one group of blocks at a time.

XLA:CPU gives a program one scratch allocation for all its temporaries. Past a few tens
of MiB that allocation is mapped fresh on every call, and page-faulting it in cost more
than the arithmetic on the 2-core CI machine (the GLA forward at T = 16,384 spent 29 of
its 58 ms there). Mapping :func:`sequential_map` over groups of blocks keeps the
temporaries at one group's (a few MiB, which also stay in cache) and checkpoints the body,
so that autodiff saves only the loop index and recomputes the group in the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

STEP_ELEMENTS = 1 << 19  # float32 elements of the largest per-step temporary: 2 MiB


def blocks_per_step(elements_per_block: int, num_blocks: int) -> int:
    """Blocks per step so that one step's largest array holds about ``STEP_ELEMENTS``.

    A divisor of ``num_blocks`` within a factor of two below that is preferred, so that no
    step computes padding blocks.
    """
    target = max(1, min(num_blocks, STEP_ELEMENTS // max(1, elements_per_block)))
    for per in range(target, target // 2, -1):
        if num_blocks % per == 0:
            return per
    return target


def sequential_map(fn: Callable[[jax.Array], jax.Array], num_steps: int) -> jax.Array:
    """``stack([fn(i) for i in range(num_steps)])`` as one checkpointed loop (``lax.map``)."""
    if num_steps == 1:
        return fn(jnp.int32(0))[None]
    return lax.map(jax.checkpoint(fn), jnp.arange(num_steps, dtype=jnp.int32))
