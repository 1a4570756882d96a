"""Batched Monte-Carlo loops over random probes (shared by SLQ and Hutchinson)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
from jax import lax

from linjax import _tree

DEFAULT_BATCH_SIZE = 8


def check_probes(num_probes: int, batch_size: int | None) -> tuple[int, int]:
    """Validate ``num_probes`` and ``batch_size``; returns them, ``batch_size`` defaulted."""
    num_probes = _tree.check_positive_int(num_probes, "num_probes")
    if batch_size is None:
        batch_size = DEFAULT_BATCH_SIZE
    batch_size = _tree.check_positive_int(batch_size, "batch_size")
    return num_probes, min(batch_size, num_probes)


def probe_map(fn: Callable[[jax.Array], Any], key: jax.Array, num_probes: int, batch_size: int):
    """``[fn(k_i)]_i`` stacked over ``num_probes`` keys, ``batch_size`` probes vmapped at a time.

    Use for small per-probe outputs (quadrature nodes); see :func:`probe_mean` for vectors.
    """
    return lax.map(fn, jr.split(key, num_probes), batch_size=batch_size)


def probe_mean(fn: Callable[[jax.Array], Any], key: jax.Array, num_probes: int, batch_size: int):
    """``mean_i fn(k_i)`` with a running sum: memory is one batch, never all probes at once."""
    keys = jr.split(key, num_probes)
    num_batches, rem = divmod(num_probes, batch_size)

    def batch_sum(ks):
        return jax.tree.map(lambda x: jnp.sum(x, axis=0), jax.vmap(fn)(ks))

    total = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, keys[0]))
    if num_batches:
        batched = keys[: num_batches * batch_size].reshape(num_batches, batch_size)
        total, _ = lax.scan(
            lambda acc, ks: (_tree.tree_add(acc, batch_sum(ks)), None), total, batched
        )
    if rem:
        total = _tree.tree_add(total, batch_sum(keys[num_batches * batch_size :]))
    return _tree.tree_scale(1 / num_probes, total)
