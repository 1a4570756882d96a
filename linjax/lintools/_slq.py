"""Stochastic Lanczos quadrature: spectral densities and traces of matrix functions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from linjax import _tree
from linjax.lintools._lanczos import lanczos, tridiagonal
from linjax.lintools._probes import check_probes, probe_map


class Quadrature(NamedTuple):
    r"""Gauss quadrature rules from Lanczos, one per probe.

    For a unit probe $v$, $v^\top f(A) v \approx \sum_j \tau_j f(\theta_j)$.

    Attributes:
        nodes: ``[..., num_steps]`` Ritz values $\theta_j$ (eigenvalues of $T$).
        weights: ``[..., num_steps]`` $\tau_j = (e_1^\top s_j)^2$, the squared *first*
            components of $T$'s eigenvectors; they sum to 1 per probe.
    """

    nodes: jax.Array
    weights: jax.Array


def gauss_quadrature(
    matvec: Callable[..., Any], v0: Any, num_steps: int, *params: Any, reortho: str = "full"
) -> Quadrature:
    r"""The ``num_steps``-node Gauss rule of the spectral measure of $A$ seen from ``v0``.

    With $q_1 = v_0/\|v_0\|$ and $T = S\Theta S^\top$ from :func:`lanczos`, the rule
    $\sum_j \tau_j p(\theta_j) = q_1^\top p(A) q_1$ is exact for every polynomial of degree
    at most $2k - 1$.

    Args:
        matvec: ``matvec(v, *params)``, symmetric.
        v0: the probe (nonzero pytree).
        num_steps: number of nodes ``k``.
        *params: operator data passed to ``matvec``.
        reortho: passed to :func:`lanczos`.

    Returns:
        :class:`Quadrature` with ``nodes`` and ``weights`` of shape ``[num_steps]``.

    References:
        Golub, Meurant, "Matrices, Moments and Quadrature with Applications" (2010), ch. 6.
    """
    res = lanczos(matvec, v0, num_steps, *params, reortho=reortho)
    theta, s = jnp.linalg.eigh(tridiagonal(res.alphas, res.betas))
    dtype = res.alphas.dtype
    return Quadrature(theta.astype(dtype), (s[0] ** 2).astype(dtype))


def slq(
    matvec: Callable[..., Any],
    like: Any,
    *params: Any,
    key: jax.Array,
    num_probes: int,
    num_steps: int,
    batch_size: int | None = None,
) -> Quadrature:
    r"""Stochastic Lanczos quadrature with Rademacher probes.

    Each probe $v_i$ gives a Gauss rule (:func:`gauss_quadrature`) for the spectral measure
    $\mu_{v_i} = \sum_l (u_l^\top v_i)^2/\|v_i\|^2\,\delta_{\lambda_l}$, whose average over
    probes is an unbiased estimate of the spectral density $\frac1n \sum_l
    \delta_{\lambda_l}$. Feed the result to :func:`spectral_density` or :func:`trace_f`.
    Probes run ``batch_size`` at a time (vmapped), batches sequentially.

    Args:
        matvec: ``matvec(v, *params)``, symmetric.
        like: pytree giving the vector structure and dtype.
        *params: operator data passed to ``matvec``.
        key: PRNG key for the probes.
        num_probes: number of probes.
        num_steps: Lanczos steps per probe (nodes per rule), ``<= n``.
        batch_size: probes per batch (default 8, capped at ``num_probes``); each holds a
            ``num_steps``-vector basis in memory.

    Returns:
        :class:`Quadrature` with ``nodes`` and ``weights`` of shape ``[num_probes, num_steps]``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import lintools as lt
        >>> A = jnp.diag(jnp.linspace(0.0, 1.0, 50))
        >>> quad = lt.slq(lt.dense(A), jnp.zeros(50), key=jax.random.key(0),
        ...               num_probes=4, num_steps=10)
        >>> quad.nodes.shape
        (4, 10)

    References:
        Ubaru, Chen, Saad (2017), "Fast estimation of tr(f(A)) via stochastic Lanczos
        quadrature", SIMAX 38(4). Ghorbani, Krishnan, Xiao (2019), "An investigation into
        neural net optimization via Hessian eigenvalue density", ICML.
    """
    _tree.check_floating(like, "like")
    num_probes, batch_size = check_probes(num_probes, batch_size)
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    num_steps = _tree.check_positive_int(num_steps, "num_steps")
    # Validate once, eagerly, rather than inside the traced per-probe function.
    _tree.check_operator(matvec, structs, params)
    if num_steps > _tree.tree_size(like):
        raise ValueError(f"{num_steps=} must be <= the dimension ({_tree.tree_size(like)})")

    def one(k):
        v = _tree.tree_random_like(k, structs, kind="rademacher")
        return gauss_quadrature(matvec, v, num_steps, *params)

    return probe_map(one, key, num_probes, batch_size)


def spectral_density(
    quad: Quadrature, grid: jax.typing.ArrayLike, sigma: float | jax.Array
) -> jax.Array:
    r"""Gaussian-smoothed spectral density from SLQ.

    $\phi(t) = \frac{1}{N}\sum_i \sum_j \tau_{ij}\,\mathcal N(t;\theta_{ij}, \sigma^2)$;
    it integrates to 1 over the real line (up to the part of the Gaussians outside
    ``grid``).

    Args:
        quad: :class:`Quadrature` from :func:`slq` (``[num_probes, num_steps]``) or from
            :func:`gauss_quadrature` (``[num_steps]``).
        grid: ``[G]`` points at which to evaluate the density.
        sigma: kernel width, > 0 (a common choice is ~1e-2 to 1e-3 of the spectral range).

    Returns:
        ``[G]`` density values.
    """
    grid = jnp.asarray(grid)
    if grid.ndim != 1:
        raise ValueError(f"grid must be 1-D, got shape {grid.shape}")
    if isinstance(sigma, (int, float)) and not sigma > 0:
        raise ValueError(f"{sigma=} must be > 0")
    nodes = quad.nodes.reshape(-1, quad.nodes.shape[-1])
    weights = quad.weights.reshape(nodes.shape)
    sigma = jnp.asarray(sigma, grid.dtype)

    def per_probe(nw):
        n, w = nw
        z = (grid[None, :] - n[:, None]) / sigma
        return jnp.sum(w[:, None] * jnp.exp(-0.5 * z**2), axis=0)

    # One probe at a time keeps memory at num_steps x G instead of num_probes x num_steps x G.
    densities = lax.map(per_probe, (nodes, weights))
    return jnp.mean(densities, axis=0) / (sigma * jnp.sqrt(2 * jnp.pi))


def trace_f(quad: Quadrature, f: Callable[[jax.Array], jax.Array], dim: int) -> jax.Array:
    r"""Estimate $\operatorname{tr} f(A) \approx \frac{n}{N}\sum_i \sum_j \tau_{ij} f(\theta_{ij})$.

    Rademacher probes have $\|v\|^2 = n$, hence the factor ``dim``. ``f`` is applied
    elementwise to the nodes (e.g. ``jnp.log`` for a log-determinant, ``lambda x: x`` for
    the trace).

    Args:
        quad: :class:`Quadrature` from :func:`slq`.
        f: elementwise function.
        dim: the dimension ``n`` of the operator.

    Returns:
        Scalar estimate.
    """
    dim = _tree.check_positive_int(dim, "dim")
    per_probe = jnp.sum(quad.weights * f(quad.nodes), axis=-1)
    return dim * jnp.mean(per_probe)
