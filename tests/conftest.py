"""Shared test configuration: float64 numerics, seeded PRNG keys, the 4-device mesh."""

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


@pytest.fixture(scope="module")
def mesh():
    """A 1-D mesh ``("x",)`` over 4 devices, for the tests marked ``multidevice``."""
    if jax.device_count() < 4:
        pytest.fail(
            "multi-device tests need 4 devices: run with "
            "XLA_FLAGS=--xla_force_host_platform_device_count=4 pytest -m multidevice"
        )
    return jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
