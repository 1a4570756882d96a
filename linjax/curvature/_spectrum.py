r"""Hessian spectra and sharpness monitors, built on :mod:`linjax.lintools`.

Every function here linearises the gradient once (:func:`~linjax.curvature.hvp`) and then
runs a matrix-free method on it, so each is a pure function of arrays that can be called
inside a jitted training step (sizes are static keyword arguments; the loops are
``lax.scan``/``lax.map``, so compile time does not grow with the number of matvecs).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.random as jr

from linjax import _tree
from linjax import lintools as lt
from linjax.curvature._products import hvp


class SharpnessReport(NamedTuple):
    """Outcome of :func:`sharpness`.

    Attributes:
        lambda_max: largest (algebraic) Hessian eigenvalue, a Lanczos Ritz value; it
            approaches the true $\\lambda_{\\max}$ from below as ``num_steps`` grows.
        trace: Hutchinson estimate of $\\operatorname{tr} \\nabla^2 L$ (unbiased).
    """

    lambda_max: jax.Array
    trace: jax.Array


def hessian_eigs(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    *args: Any,
    k: int,
    key: jax.Array,
    num_steps: int | None = None,
    which: str = "largest",
) -> tuple[jax.Array, Any]:
    r"""The ``k`` extreme eigenpairs of the Hessian $\nabla^2_\theta L$ by Lanczos.

    :func:`linjax.lintools.eigsh` (partial reorthogonalisation, a Gaussian start vector) on the
    Hessian-vector product of ``loss_fn`` at ``params``: ``num_steps`` HVPs in all. Extreme,
    well-separated eigenvalues converge first; for the bulk use :func:`hessian_density`.

    Args:
        loss_fn: ``loss_fn(params, *args) -> scalar``.
        params: the point $\theta$, a pytree of floating arrays.
        *args: further arguments of ``loss_fn`` (a batch).
        k: number of eigenpairs, ``1 <= k <= d``.
        key: PRNG key for the Lanczos start vector.
        num_steps: Lanczos steps, ``k <= num_steps <= d``; default ``min(d, 2k + 40)``.
        which: ``"largest"`` (descending) or ``"smallest"`` (ascending), algebraically.

    Returns:
        ``(eigvals [k], eigvecs)``; ``eigvecs`` is a pytree like ``params`` with a leading axis
        ``k`` of unit vectors.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> loss = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 6.0) * w**2)
        >>> vals, _ = cv.hessian_eigs(loss, jnp.zeros(5), k=2, key=jax.random.key(0))
        >>> vals.round(4)
        Array([5., 4.], dtype=float32)

    References:
        Ghorbani, Krishnan, Xiao (2019), "An investigation into neural net optimization via
        Hessian eigenvalue density", ICML. Lanczos (1950).
    """
    matvec = hvp(loss_fn, params, *args)
    return lt.eigsh(matvec, params, k, key=key, num_steps=num_steps, which=which)


def hessian_density(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    *args: Any,
    key: jax.Array,
    num_probes: int,
    num_steps: int,
    batch_size: int | None = None,
) -> lt.Quadrature:
    r"""Stochastic Lanczos quadrature of the Hessian's spectral density.

    :func:`linjax.lintools.slq` on the Hessian-vector product: ``num_probes`` Rademacher
    probes, ``num_steps`` Lanczos steps each, giving Gauss rules whose average estimates the
    spectral measure $\frac1d \sum_l \delta_{\lambda_l}$. Smooth it with
    :func:`linjax.lintools.spectral_density` or integrate with
    :func:`linjax.lintools.trace_f` (``dim`` = number of parameters).

    Args:
        loss_fn: ``loss_fn(params, *args) -> scalar``.
        params: the point $\theta$, a pytree of floating arrays.
        *args: further arguments of ``loss_fn``.
        key: PRNG key for the probes.
        num_probes: number of probes (>= 1).
        num_steps: Lanczos steps per probe, ``1 <= num_steps <= d`` (80-100 is typical).
        batch_size: probes run vmapped this many at a time (default 8).

    Returns:
        :class:`linjax.lintools.Quadrature` with ``nodes``/``weights`` ``[num_probes,
        num_steps]``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> loss = lambda w: 0.5 * jnp.sum(jnp.linspace(0.0, 1.0, 30) * w**2)
        >>> quad = cv.hessian_density(loss, jnp.zeros(30), key=jax.random.key(0),
        ...                           num_probes=2, num_steps=10)
        >>> quad.nodes.shape
        (2, 10)

    References:
        Ghorbani, Krishnan, Xiao (2019), ICML. Ubaru, Chen, Saad (2017), SIMAX 38(4).
        Papyan (2020), "Traces of class/cross-class structure pervade deep learning spectra",
        JMLR 21.
    """
    matvec = hvp(loss_fn, params, *args)
    return lt.slq(
        matvec,
        params,
        key=key,
        num_probes=num_probes,
        num_steps=num_steps,
        batch_size=batch_size,
    )


def sharpness(
    loss_fn: Callable[..., jax.Array],
    params: Any,
    *args: Any,
    key: jax.Array,
    num_steps: int = 20,
    num_probes: int = 10,
) -> SharpnessReport:
    r"""$\lambda_{\max}$ and trace of the Hessian: a cheap monitor for a training loop.

    $\lambda_{\max}$ comes from ``num_steps`` Lanczos steps (a Ritz value, a lower bound that
    converges quickly for an isolated top eigenvalue), the trace from ``num_probes`` Rademacher
    Hutchinson probes; ``num_steps + num_probes`` HVPs in all, sharing one linearisation. Under
    gradient descent with learning rate $\eta$, $\lambda_{\max}$ hovering at $2/\eta$ is the
    edge of stability.

    Args:
        loss_fn: ``loss_fn(params, *args) -> scalar``.
        params: the point $\theta$, a pytree of floating arrays.
        *args: further arguments of ``loss_fn``.
        key: PRNG key (split between Lanczos and Hutchinson).
        num_steps: Lanczos steps for $\lambda_{\max}$ (capped at the dimension $d$).
        num_probes: Hutchinson probes for the trace.

    Returns:
        :class:`SharpnessReport` ``(lambda_max, trace)``, scalars in the dtype of ``params``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 2.0, 3.0]) * w**2)
        >>> rep = cv.sharpness(loss, jnp.zeros(3), key=jax.random.key(0))
        >>> round(float(rep.lambda_max), 4), round(float(rep.trace), 4)
        (3.0, 6.0)

    References:
        Cohen, Kaur, Li, Kolter, Talwalkar (2021), "Gradient descent on neural networks
        typically occurs at the edge of stability", ICLR. Hutchinson (1989).
    """
    num_steps = _tree.check_positive_int(num_steps, "num_steps")
    num_probes = _tree.check_positive_int(num_probes, "num_probes")
    _tree.check_floating(params, "params")
    num_steps = min(num_steps, _tree.tree_size(params))
    key_eig, key_trace = jr.split(key)
    matvec = hvp(loss_fn, params, *args)
    vals, _ = lt.eigsh(matvec, params, 1, key=key_eig, num_steps=num_steps)
    trace = lt.hutchinson_trace(matvec, params, key=key_trace, num_probes=num_probes)
    return SharpnessReport(lambda_max=vals[0], trace=trace)
