"""The one place that knows about backends and Pallas API-version differences.

Kernels in this package are written once with ``pl.pallas_call`` and block specs that suit
both GPU (Triton: whole-sequence blocks are pointer arithmetic) and TPU (Mosaic: last two
block dims are full or multiples of ``(8, 128)``). What differs per backend (the compiler
parameters, the interpreter on CPU) is decided here, at lowering time, by
:func:`pallas_call`; head dims are padded to powers of two for Triton on every platform.
"""

from __future__ import annotations

import jax
from jax import lax
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


def _triton_params(num_warps: int, num_stages: int):
    # Asked for explicitly: since jax 0.10 ``pl.pallas_call`` on GPU defaults to Mosaic GPU,
    # which these kernels (``lax.fori_loop`` over dynamic slices of whole-sequence refs) are
    # not written for.
    from jax.experimental.pallas import triton as pl_triton

    return pl_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _tpu_params(num_grid_axes: int):
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams(dimension_semantics=("parallel",) * num_grid_axes)


def pallas_call(kernel, *, grid, num_warps: int = 4, num_stages: int = 2, **kwargs):
    """``pl.pallas_call`` for every platform at once, chosen when the program is lowered.

    Returns a function of the kernel's operands that stages out
    ``lax.platform_dependent(cpu=<interpreter>, cuda/rocm=<Triton>, tpu=<Mosaic>)``; only
    the branch of the platform being compiled for is lowered. So the same jitted program
    runs interpreted on CPU and compiles the real kernels on GPU/TPU, and a CPU-only
    machine can ``jax.export`` it for ``platforms=["tpu"]`` or ``["cuda"]`` (the
    cross-lowering check of reference/kernels.md §5.4). All grid axes are independent
    (``"parallel"``). ``kwargs`` go to ``pl.pallas_call`` (specs, ``out_shape``, ``name``,
    ``cost_estimate``).
    """

    def build(interpret: bool, params):
        return pl.pallas_call(
            kernel, grid=grid, interpret=interpret, compiler_params=params, **kwargs
        )

    def call(*args):
        triton = build(False, _triton_params(num_warps, num_stages))
        return lax.platform_dependent(
            *args,
            default=build(True, None),
            cuda=triton,
            rocm=triton,
            tpu=build(False, _tpu_params(len(grid))),
        )

    return call


def pad_dim_for_backend(n: int) -> int:
    """Head-dim size the kernels see: a power of two >= 16, as Triton needs.

    Decided independently of the backend because one traced program serves every platform
    (:func:`pallas_call`); zero-padded head dims do not change the results.
    """
    return max(16, pl.next_power_of_2(n))
