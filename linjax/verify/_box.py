"""The bound carriers: :class:`Box` (an axis-aligned interval) and :class:`LinearBounds`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Box(NamedTuple):
    r"""An axis-aligned box $\{x : \text{lower} \le x \le \text{upper}\}$ (elementwise).

    The input set of :func:`ibp` / :func:`crown` and the form of every bound they return.
    ``Box`` is a pytree (a ``NamedTuple``), so batches of boxes go through ``jax.vmap``
    and ``jax.jit`` like any other pair of arrays. Construction does not validate (that
    would break pytree unflattening under ``vmap``); the functions that consume a box
    check it, and :meth:`from_eps` validates its arguments.

    Attributes:
        lower: array of any shape, real floating dtype.
        upper: array of the same shape and dtype, ``lower <= upper``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> box = vf.Box.from_eps(jnp.array([0.0, 1.0]), 0.5)
        >>> box.lower, box.upper
        (Array([-0.5,  0.5], dtype=float32), Array([0.5, 1.5], dtype=float32))
        >>> box.center, box.radius
        (Array([0., 1.], dtype=float32), Array([0.5, 0.5], dtype=float32))
    """

    lower: Any
    upper: Any

    @classmethod
    def from_eps(cls, x: jax.typing.ArrayLike, eps: jax.typing.ArrayLike) -> Box:
        r"""The $\ell_\infty$ ball $\{x' : \|x' - x\|_\infty \le \epsilon\}$ as a box.

        Args:
            x: centre, a real floating array of any shape.
            eps: radius, a scalar or an array broadcastable to ``x.shape`` (per-coordinate
                radii); must be ``>= 0`` (checked when concrete).

        Returns:
            ``Box(x - eps, x + eps)`` with the shape and dtype of ``x``.
        """
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x must be a real floating array, got dtype {x.dtype}")
        eps = jnp.asarray(eps, x.dtype) if not isinstance(eps, jax.core.Tracer) else eps
        try:
            shape = jnp.broadcast_shapes(jnp.shape(eps), x.shape)
        except ValueError as e:
            raise ValueError(
                f"eps with shape {jnp.shape(eps)} does not broadcast to x.shape={x.shape}"
            ) from e
        if shape != x.shape:
            raise ValueError(f"eps with shape {jnp.shape(eps)} would broadcast x to {shape}")
        if not isinstance(eps, jax.core.Tracer):
            e = np.asarray(eps)
            if not np.all(e >= 0):  # also rejects NaN
                raise ValueError(f"eps must be >= 0 and not NaN, got min(eps)={np.min(e)}")
        eps = eps.astype(x.dtype)
        return cls(x - eps, x + eps)

    @property
    def center(self) -> jax.Array:
        """Midpoint ``(lower + upper) / 2``."""
        return (self.lower + self.upper) / 2

    @property
    def radius(self) -> jax.Array:
        """Half-width ``(upper - lower) / 2``."""
        return (self.upper - self.lower) / 2


class LinearBounds(NamedTuple):
    r"""Linear functions of the input that sandwich ``spec @ fn(x)`` on a box.

    For every $x$ in the box, $\text{lA}\,x + \text{lb} \le C f(x) \le \text{uA}\,x +
    \text{ub}$, where $\text{lA}\,x$ contracts all input axes. Minimising the left side
    over the box ($\text{lA}\,c - |\text{lA}|\,r + \text{lb}$ with centre $c$ and radius
    $r$) gives :func:`crown`'s lower bound, maximising the right side its upper bound.

    Attributes:
        lA: ``[S, *in_shape]`` lower coefficients (``[*out_shape, *in_shape]`` when no
            spec was given).
        lb: ``[S]`` lower offsets (``[*out_shape]`` without spec).
        uA: upper coefficients, shaped like ``lA``.
        ub: upper offsets, shaped like ``lb``.
    """

    lA: Any
    lb: Any
    uA: Any
    ub: Any


def check_box(box: Any, name: str = "box") -> Box:
    """Validate a user box statically; returns it as a :class:`Box` of arrays.

    Shapes and dtypes are always checked; ``lower <= upper`` only when the values are
    concrete (not traced), since a traced box cannot be inspected without a sync.
    """
    if not (isinstance(box, tuple) and len(box) == 2):
        raise TypeError(f"{name} must be a Box(lower, upper), got {type(box).__name__}")
    lower, upper = box
    lower = lower if isinstance(lower, jax.core.Tracer) else jnp.asarray(lower)
    upper = upper if isinstance(upper, jax.core.Tracer) else jnp.asarray(upper)
    for side, v in (("lower", lower), ("upper", upper)):
        if not jnp.issubdtype(v.dtype, jnp.floating):
            raise TypeError(f"{name}.{side} must be a real floating array, got dtype {v.dtype}")
    if lower.shape != upper.shape or lower.dtype != upper.dtype:
        raise ValueError(
            f"{name}.lower and {name}.upper must have the same shape and dtype, got "
            f"{lower.shape}/{lower.dtype} and {upper.shape}/{upper.dtype}"
        )
    if not isinstance(lower, jax.core.Tracer) and not isinstance(upper, jax.core.Tracer):
        lo, hi = np.asarray(lower), np.asarray(upper)
        bad = ~(lo <= hi)  # NaN on either side also fails
        if np.any(bad):
            idx = tuple(int(i) for i in np.argwhere(bad)[0])
            raise ValueError(
                f"{name} must satisfy lower <= upper elementwise (no NaN); at index {idx} "
                f"lower={lo[idx]} and upper={hi[idx]}"
            )
    return Box(lower, upper)
