"""Hutchinson's stochastic estimators of the trace and the diagonal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from linjax import _tree
from linjax.lintools._probes import check_probes, probe_mean


def hutchinson_trace(
    matvec: Callable[..., Any],
    like: Any,
    *params: Any,
    key: jax.Array,
    num_probes: int,
    batch_size: int | None = None,
) -> jax.Array:
    r"""Estimate $\operatorname{tr} A \approx \frac1N \sum_i v_i^\top A v_i$.

    The probes $v_i$ are Rademacher ($\pm 1$), which minimises the variance among i.i.d.
    probes: $\operatorname{Var}[v^\top A v] = 2(\|A\|_F^2 - \sum_i A_{ii}^2)$, so the
    estimate is exact for diagonal $A$. Probes are drawn and applied ``batch_size`` at a
    time (vmapped into one batched matvec) inside a ``lax.scan``, so memory holds one batch
    of probes, never all ``num_probes``.

    Args:
        matvec: ``matvec(v, *params)``, a square linear operator (need not be symmetric).
        like: pytree (arrays or ``ShapeDtypeStruct``) giving the vector structure and dtype.
        *params: operator data passed to ``matvec``.
        key: PRNG key for the probes.
        num_probes: number of probes $N \ge 1$.
        batch_size: probes per batched matvec (default 8, capped at ``num_probes``).

    Returns:
        Scalar estimate of the trace, in the dtype of ``like``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import lintools as lt
        >>> D = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
        >>> lt.hutchinson_trace(lt.dense(D), jnp.zeros(3), key=jax.random.key(0), num_probes=4)
        Array(6., dtype=float32)

    References:
        Hutchinson (1989), "A stochastic estimator of the trace of the influence matrix for
        Laplacian smoothing splines". Avron, Toledo (2011), JACM 58(2).
    """
    op, num_probes, batch_size = _setup(matvec, like, params, num_probes, batch_size)

    def one(k):
        v = _tree.tree_random_like(k, like, kind="rademacher")
        return _tree.tree_dot(v, op(v, *params))

    return probe_mean(one, key, num_probes, batch_size)


def hutchinson_diagonal(
    matvec: Callable[..., Any],
    like: Any,
    *params: Any,
    key: jax.Array,
    num_probes: int,
    batch_size: int | None = None,
) -> Any:
    r"""Estimate $\operatorname{diag} A \approx \frac1N \sum_i v_i \odot A v_i$.

    Rademacher probes make $v \odot A v = \operatorname{diag} A + \sum_{j\ne i} A_{ij} v_i
    v_j$, exact for diagonal $A$; the error of entry $i$ has variance
    $\sum_{j \ne i} A_{ij}^2 / N$. Probes are processed in batches as in
    :func:`hutchinson_trace`, with a running sum of the pytree estimate.

    Args:
        matvec: ``matvec(v, *params)``, a square linear operator.
        like: pytree giving the vector structure and dtype.
        *params: operator data passed to ``matvec``.
        key: PRNG key for the probes.
        num_probes: number of probes $N \ge 1$.
        batch_size: probes per batched matvec (default 8, capped at ``num_probes``).

    Returns:
        A pytree like ``like`` estimating the diagonal.

    References:
        Bekas, Kokiopoulou, Saad (2007), "An estimator for the diagonal of a matrix".
    """
    op, num_probes, batch_size = _setup(matvec, like, params, num_probes, batch_size)

    def one(k):
        v = _tree.tree_random_like(k, like, kind="rademacher")
        return jax.tree.map(lambda a, b: a * b, v, op(v, *params))

    return probe_mean(one, key, num_probes, batch_size)


def _setup(matvec, like, params, num_probes, batch_size):
    _tree.check_floating(like, "like")
    num_probes, batch_size = check_probes(num_probes, batch_size)
    op = _tree.check_operator(matvec, _structs(like), params)
    return op, num_probes, batch_size


def _structs(like):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
