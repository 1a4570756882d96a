"""Run a blocked XLA computation one group of blocks at a time.

XLA:CPU gives a program one scratch allocation for all its temporaries. Measured on the
2-core CI machine (glibc malloc), once that allocation is past about 32 MiB every call
page-faults all of it in again (page faults per call = scratch bytes / 4 KiB), and the
faults cost more than the arithmetic: the GLA forward at T = 16,384 spent about half of
its 58 ms on them, the 1-D local attention at window 256 about 75 of its 133 ms.

Looping over groups of blocks (:func:`sequential_map`, or :func:`sequential_scan` where a
carry such as a recurrent state passes between groups) keeps the temporaries at one
group's (a few MiB, which also stay in cache) and checkpoints the body, so that autodiff
saves only the loop index and the carries and recomputes each group in the backward
pass. It is not a free lunch everywhere: convolutions inside an XLA:CPU loop body ran
2.5x slower than the same work batched (the CNN CROWN bounds of ``linjax.verify``), so
it is used where it was measured to win.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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


def sequential_scan(fn: Callable, init: Any, num_steps: int) -> tuple[Any, Any]:
    """``lax.scan(fn, init, arange(num_steps))`` with a checkpointed body (one call if 1 step).

    ``fn(carry, i) -> (carry, y)``; returns the last carry and the ``y`` stacked over steps.
    """
    if num_steps == 1:
        carry, y = fn(init, jnp.int32(0))
        return carry, jax.tree.map(lambda x: x[None], y)
    return lax.scan(jax.checkpoint(fn), init, jnp.arange(num_steps, dtype=jnp.int32))


def sequential_map(fn: Callable[[jax.Array], Any], num_steps: int) -> Any:
    """``stack([fn(i) for i in range(num_steps)])`` as one checkpointed loop."""
    return sequential_scan(lambda carry, i: (carry, fn(i)), None, num_steps)[1]
