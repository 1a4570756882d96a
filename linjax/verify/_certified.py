r"""Certified training losses: robust cross-entropy on worst-case margins (IBP, CROWN-IBP)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from linjax.verify._box import Box
from linjax.verify._crown import crown
from linjax.verify._ibp import ibp

_METHODS = ("ibp", "crown-ibp")


def _concrete(v: Any) -> bool:
    return not isinstance(v, jax.core.Tracer)


def _check_clip(clip: Any) -> tuple[Any, Any] | None:
    if clip is None:
        return None
    if not (isinstance(clip, (tuple, list)) and len(clip) == 2):
        raise ValueError(f"clip={clip!r} must be None or a pair (low, high), e.g. (0.0, 1.0)")
    low, high = clip
    if _concrete(low) and _concrete(high):
        lo, hi = np.asarray(low), np.asarray(high)
        if not np.all(lo <= hi):
            raise ValueError(f"clip={clip!r} must satisfy low <= high")
    return low, high


def margin_lower_bounds(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    label: jax.Array,
    eps: Any,
    *,
    method: str,
    beta: Any,
    clip: tuple[Any, Any] | None,
    num_classes: int,
) -> jax.Array:
    r"""``[K]`` lower bounds of the margins $f_y - f_j$ over the box of one example.

    The entry of the true class is exactly 0.
    """
    lower, upper = x - eps, x + eps
    if clip is not None:
        lower, upper = jnp.clip(lower, *clip), jnp.clip(upper, *clip)
    box = Box(lower, upper)
    onehot = jax.nn.one_hot(label, num_classes, dtype=x.dtype)
    out = ibp(fn, box)
    # IBP: f_y - f_j >= l_y - u_j (j != y).
    lb = jnp.where(onehot > 0, 0.0, jnp.sum(onehot * out.lower) - out.upper)
    if method == "ibp":
        return lb
    spec = onehot[None, :] - jnp.eye(num_classes, dtype=x.dtype)  # rows e_y - e_j
    lb_crown = crown(fn, box, spec=spec, intermediate="ibp").lower
    lb_crown = jnp.where(onehot > 0, 0.0, lb_crown)
    return beta * lb_crown + (1 - beta) * lb


def certified_loss(
    fn: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    labels: jax.Array,
    eps: Any,
    *,
    method: str = "ibp",
    beta: Any = None,
    clip: tuple[Any, Any] | None = None,
) -> jax.Array:
    r"""Robust cross-entropy of ``fn`` on $\ell_\infty$ boxes around a batch (IBP / CROWN-IBP).

    For an example $(x, y)$ and the box $B = [x - \epsilon, x + \epsilon]$ (intersected
    with ``clip``), let $\underline m_j \le \min_{x' \in B} f_y(x') - f_j(x')$ be lower
    bounds of the margins ($\underline m_y = 0$). The loss is the cross-entropy of the
    worst-case logits $-\underline m$,

    $$\ell(x, y) = \log \sum_j e^{-\underline m_j} \;\ge\; \max_{x' \in B}
    \mathrm{CE}(f(x'), y),$$

    an upper bound of the cross-entropy at every point of the box (since
    $\mathrm{CE}(f, y) = \log\sum_j e^{-(f_y - f_j)}$ is increasing in each $-m_j$), equal
    to the standard cross-entropy at $\epsilon = 0$. The result is the mean over the batch.

    * ``method="ibp"`` (Gowal et al. 2018): $\underline m_j = l_y - u_j$ from the IBP
      bounds $[l, u]$ of the logits.
    * ``method="crown-ibp"`` (Zhang et al. 2020): $\underline m = \beta\,\underline
      m^{\text{CROWN-IBP}} + (1 - \beta)\,\underline m^{\text{IBP}}$, where the first
      term is a CROWN backward pass with the specification rows $e_y - e_j$ and IBP
      intermediate bounds. Both terms are sound, so any $\beta \in [0, 1]$ is; CROWN-IBP
      training ramps $\beta$ from 1 to 0 while $\epsilon$ grows.

    Pure and differentiable: use it inside a jitted ``optax`` step with ``jax.grad``
    taken through the model parameters ``fn`` closes over; ``eps`` and ``beta`` may be
    traced (schedules). Examples are processed with ``vmap``.

    Args:
        fn: the model on **one** example: an array shaped like ``x[0]`` to logits ``[K]``.
        x: ``[B, *in_shape]`` batch of inputs.
        labels: ``[B]`` integer labels in ``0..K-1``.
        eps: radius $\epsilon \ge 0$: a scalar or an array broadcastable to ``in_shape``.
        method: ``"ibp"`` (default) or ``"crown-ibp"``.
        beta: CROWN-IBP mixing weight in ``[0, 1]`` (default 1, pure CROWN-IBP); only for
            ``method="crown-ibp"``.
        clip: optional ``(low, high)`` valid input range (e.g. ``(0.0, 1.0)`` for images);
            the box is clipped to it.

    Returns:
        Scalar: the mean robust cross-entropy over the batch.

    Raises:
        ValueError: for an unknown ``method``, a ``beta`` outside ``[0, 1]`` or given with
            IBP, negative ``eps``, malformed ``clip``, or shapes of ``x``/``labels``/``fn``
            that do not fit.
        TypeError: for non-integer labels or non-floating ``x``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> W = jnp.array([[1.0, 0.0], [0.0, 1.0]])
        >>> x, y = jnp.array([[2.0, 0.0]]), jnp.array([0])
        >>> round(float(vf.certified_loss(lambda v: W @ v, x, y, 0.0)), 4)  # log(1 + e^-2)
        0.1269
        >>> round(float(vf.certified_loss(lambda v: W @ v, x, y, 0.5)), 4)  # margin 2 - 1
        0.3133

    References:
        Gowal et al. (2018), "On the effectiveness of interval bound propagation for
        training verifiably robust models", https://arxiv.org/abs/1810.12715.
        Zhang et al. (2020), "Towards stable and efficient training of verifiably robust
        neural networks" (CROWN-IBP), https://arxiv.org/abs/1906.06316.
    """
    if method not in _METHODS:
        raise ValueError(f"{method=} must be one of {_METHODS}")
    if method == "ibp" and beta is not None:
        raise ValueError(f"beta={beta!r} only applies to method='crown-ibp'")
    if beta is None:
        beta = 1.0
    if _concrete(beta) and not 0.0 <= float(np.asarray(beta)) <= 1.0:
        raise ValueError(f"beta={beta!r} must be in [0, 1]")
    clip = _check_clip(clip)
    x = x if isinstance(x, jax.core.Tracer) else jnp.asarray(x)
    labels = labels if isinstance(labels, jax.core.Tracer) else jnp.asarray(labels)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a real floating array, got dtype {x.dtype}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}")
    if x.ndim < 1 or labels.shape != x.shape[:1]:
        raise ValueError(
            f"x must be [B, *in_shape] and labels [B]; got x.shape={x.shape}, "
            f"labels.shape={labels.shape}"
        )
    eps = eps if isinstance(eps, jax.core.Tracer) else jnp.asarray(eps, x.dtype)
    if jnp.broadcast_shapes(jnp.shape(eps), x.shape[1:]) != x.shape[1:]:
        raise ValueError(f"eps with shape {jnp.shape(eps)} must broadcast to {x.shape[1:]}")
    if _concrete(eps) and not np.all(np.asarray(eps) >= 0):
        raise ValueError(f"eps must be >= 0 (and not NaN), got min {np.min(np.asarray(eps))}")
    try:
        out = jax.eval_shape(fn, jax.ShapeDtypeStruct(x.shape[1:], x.dtype))
    except (TypeError, ValueError) as e:
        raise ValueError(f"fn cannot be applied to one example of shape {x.shape[1:]}: {e}") from e
    if not isinstance(out, jax.ShapeDtypeStruct) or out.ndim != 1:
        raise ValueError(f"fn must map one example to logits [K], got {out}")
    num_classes = out.shape[0]
    if _concrete(labels) and labels.size:
        lab = np.asarray(labels)
        if not (0 <= lab.min() and lab.max() < num_classes):
            raise ValueError(
                f"labels must be in 0..{num_classes - 1}, got min {lab.min()} max {lab.max()}"
            )
    eps = eps.astype(x.dtype)

    def one(xi, yi):
        lb = margin_lower_bounds(
            fn, xi, yi, eps, method=method, beta=beta, clip=clip, num_classes=num_classes
        )
        return jax.nn.logsumexp(-lb)

    return jnp.mean(jax.vmap(one)(x, labels))
