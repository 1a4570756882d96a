"""Shared test configuration: float64 numerics and seeded PRNG keys."""

import itertools

import jax
import jax.random as jr
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture
def getkey():
    """A callable returning a fresh, deterministic PRNG key on every call."""
    counter = itertools.count()
    base = jr.key(0)
    return lambda: jr.fold_in(base, next(counter))
