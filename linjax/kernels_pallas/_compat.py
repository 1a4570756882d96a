"""The one place that knows about backends and Pallas API-version differences.

Kernels in this package are written once with ``pl.pallas_call`` and block specs that suit
both GPU (Triton: whole-sequence blocks are pointer arithmetic) and TPU (Mosaic: last two
block dims are full or multiples of ``(8, 128)``). What differs per backend (the compiler
parameters, the interpreter on CPU, padding head dims to powers of two for Triton) is
decided here.
"""

from __future__ import annotations

import jax
from jax.experimental import pallas as pl

IMPLS = ("auto", "pallas", "xla", "reference")


def backend() -> str:
    """The default backend's platform name: ``"cpu"``, ``"gpu"`` or ``"tpu"``."""
    return jax.default_backend()


def resolve_impl(impl: str) -> str:
    """Validate ``impl`` and turn ``"auto"`` into ``"pallas"`` (GPU/TPU) or ``"xla"`` (CPU)."""
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {IMPLS}")
    if impl == "auto":
        return "pallas" if backend() in ("gpu", "tpu") else "xla"
    return impl


def interpret() -> bool:
    """Run Pallas kernels through the interpreter when there is no accelerator."""
    return backend() not in ("gpu", "tpu")


def compiler_params(num_grid_axes: int, *, num_warps: int = 4, num_stages: int = 2):
    """Backend compiler parameters for a grid whose axes are all independent.

    On GPU the Triton backend is asked for explicitly: since jax 0.10 ``pl.pallas_call``
    defaults to Mosaic GPU, which these kernels (``lax.fori_loop`` over dynamic slices of
    whole-sequence refs) are not written for.
    """
    platform = backend()
    if platform == "gpu":
        from jax.experimental.pallas import triton as pl_triton

        return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_grid_axes)
    return None


def pad_dim_for_backend(n: int) -> int:
    """Head-dim size a kernel should see: Triton needs powers of two >= 16, others as is."""
    if backend() == "gpu":
        return max(16, pl.next_power_of_2(n))
    return n
