r"""EDICT: exactly invertible DDIM by coupled transformations (Wallace, Gokul, Naik 2023).

Denoising step ``i`` (``i = 0`` is the noisiest, on the grid of :func:`ddim_timesteps`),
with the DDIM coefficients $(a, b)$ of its timestep $t$ and mixing weight $p$:

$$\begin{aligned}
x^{\text{inter}} &= a\,x + b\,\varepsilon(y, t), &
y^{\text{inter}} &= a\,y + b\,\varepsilon(x^{\text{inter}}, t), \\
x' &= p\,x^{\text{inter}} + (1-p)\,y^{\text{inter}}, &
y' &= p\,y^{\text{inter}} + (1-p)\,x'.
\end{aligned}$$

Leapfrog: on odd ``i`` the two coupled updates swap roles (``y`` is updated first, from
``x``); the mixing layer is never swapped. Every line is an affine map of one sequence
given the other, so each can be undone exactly; the inverse of step ``i`` undoes the
mixing, then the update made second *in that denoising step*, then the one made first.
The parity is carried with the timesteps in the scan inputs, so inversion keys it on the
denoising index ``i`` for any number of steps, odd or even. (The diffusers community
``EDICTPipeline`` keys it on the inversion loop counter, which agrees only when the number
of steps run is even; with an odd count its round trip is off by about 1e-2.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linjax import _tree
from linjax.generative._ddim import EpsFn
from linjax.generative._eps import affine, as_stateful, check_sample
from linjax.generative._schedules import Schedule, check_num_steps, check_schedule, ddim_grid


class EDICTState(NamedTuple):
    """The coupled pair of sequences EDICT carries (same structure, shapes and dtypes).

    Attributes:
        x: first sequence, a pytree like the sample.
        y: second sequence, a pytree like ``x``. Start generation from
            ``EDICTState(noise, noise)``; after :func:`edict_invert` of real data the two
            differ (``x_T != y_T``) and both are needed to reconstruct.
    """

    x: Any
    y: Any


def _check_mix(mix: Any) -> None:
    _tree.check_positive_scalar(mix, "mix")
    if not isinstance(mix, jax.core.Tracer) and not float(mix) <= 1:
        raise ValueError(f"{mix=} must lie in (0, 1]")


def _swap(odd: jax.Array, x: Any, y: Any) -> tuple[Any, Any]:
    # (x, y) on even denoising steps, (y, x) on odd ones: a select, so both model calls are
    # traced once per step (a lax.cond would trace each of them twice).
    first = jax.tree.map(lambda a, b: jnp.where(odd, b, a), x, y)
    second = jax.tree.map(lambda a, b: jnp.where(odd, a, b), x, y)
    return first, second


def _grid(schedule: Schedule, num_steps: int) -> tuple[jax.Array, ...]:
    t, a, b = ddim_grid(schedule, num_steps)
    odd = jnp.asarray(np.arange(num_steps) % 2 == 1)  # parity of the denoising index i
    return t, a, b, odd


def _mix_weights(mix: Any, like: Any) -> tuple[jax.Array, jax.Array]:
    dtype = _tree.tree_dtype(like)
    p = jnp.asarray(mix, jax.dtypes.canonicalize_dtype(jnp.float64))
    return p.astype(dtype), (1 - p).astype(dtype)


def _check_state(state: Any) -> EDICTState:
    if not isinstance(state, tuple) or len(state) != 2:
        raise TypeError(f"state must be an EDICTState(x, y), got {type(state).__name__}")
    x, y = state
    check_sample(x, "state.x")
    check_sample(y, "state.y")
    _tree.check_same_structure(x, y, "state.x", "state.y")
    return EDICTState(x, y)


def edict_sample(
    eps_fn: EpsFn,
    state: EDICTState,
    schedule: Schedule,
    *,
    num_steps: int,
    mix: float = 0.93,
    cond: Any = None,
) -> EDICTState:
    r"""Denoise an EDICT pair with ``num_steps`` coupled DDIM steps (see the module maths).

    ``edict_sample(eps_fn, edict_invert(eps_fn, x0, ...), ...)`` returns ``x0`` in both
    sequences up to rounding, for any deterministic ``eps_fn`` (a CFG-combined one
    included). In float64 the relative round-trip error is 1e-15 to 1e-14 for up to 50
    steps. Inversion multiplies the gap between ``x`` and ``y`` by $1/p^2$ per step (and
    rounding errors by the model's Lipschitz constant, which grows with a guidance
    scale), so the error grows with ``num_steps``: about 1e-13 at 100 steps, and the
    round trip breaks down past a few hundred steps even in float64. Float32 round trips
    are only approximately exact (about 1e-5 at 50 steps; noise -> data -> noise reaches
    1e-2 at 100 steps). With ``mix=1`` the steps are still exactly invertible but ``x``
    and ``y`` are not pulled together.

    Two model evaluations per step (twice DDIM), in one ``lax.scan``. A
    :class:`StatefulEpsFn` (APG with momentum) has its state updated at each of the two
    evaluations; the result is then not exactly invertible by :func:`edict_invert`.

    Args:
        eps_fn: ``eps_fn(x, t, cond) -> eps`` with ``eps`` shaped and typed like ``x``,
            ``t`` an int32 scalar training step; or a :class:`StatefulEpsFn`.
        state: :class:`EDICTState` ``(x_T, y_T)``: from :func:`edict_invert`, or
            ``EDICTState(noise, noise)`` to generate.
        schedule: the :class:`Schedule` the model was trained with.
        num_steps: number of steps ``N``, ``1 <= N <= schedule.num_train_steps`` (static).
        mix: mixing weight $p \in (0, 1]$ (0.93 in the paper).
        cond: passed unchanged to every ``eps_fn`` call (any pytree, or ``None``).

    Returns:
        :class:`EDICTState` ``(x_0, y_0)``; ``x`` is the usual output (``y`` is close).

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> s, eps_fn = gen.linear_schedule(), lambda x, t, cond: jnp.tanh(x)
        >>> x0 = jnp.linspace(-1.0, 1.0, 4)
        >>> st = gen.edict_invert(eps_fn, x0, s, num_steps=5)
        >>> back = gen.edict_sample(eps_fn, st, s, num_steps=5)
        >>> bool(jnp.allclose(back.x, x0, atol=1e-4))
        True

    References:
        Wallace, Gokul, Naik (2023), "EDICT: Exact Diffusion Inversion via Coupled
        Transformations", CVPR, https://arxiv.org/abs/2211.12446
    """
    state = _check_state(state)
    schedule = check_schedule(schedule)
    num_steps = check_num_steps(num_steps, schedule.num_train_steps)
    _check_mix(mix)
    init, apply = as_stateful(eps_fn, state.x, cond, allow_state=True, caller="edict_sample")
    p, q = _mix_weights(mix, state.x)

    def step(carry, xs):
        x, y, s = carry
        t, a, b, odd = xs
        u, v = _swap(odd, x, y)  # u is updated first (x on even steps)
        eps, s = apply(v, t, cond, s)
        u = affine(a, u, b, eps)
        eps, s = apply(u, t, cond, s)
        v = affine(a, v, b, eps)
        x, y = _swap(odd, u, v)
        x = affine(p, x, q, y)
        y = affine(p, y, q, x)
        return (x, y, s), None

    (x, y, _), _ = lax.scan(step, (state.x, state.y, init(state.x)), _grid(schedule, num_steps))
    return EDICTState(x, y)


def edict_invert(
    eps_fn: Callable[[Any, Any, Any], Any],
    x0: Any,
    schedule: Schedule,
    *,
    num_steps: int,
    mix: float = 0.93,
    cond: Any = None,
) -> EDICTState:
    r"""Map a clean sample to the EDICT noise pair that :func:`edict_sample` maps back to it.

    Starts from ``x = y = x0`` (or from a given pair) and applies the exact inverse of each
    denoising step of :func:`edict_sample`, from the least to the most noisy timestep:

    $$\begin{aligned}
    y^{\text{inter}} &= (y' - (1-p)\,x') / p, &
    x^{\text{inter}} &= (x' - (1-p)\,y^{\text{inter}}) / p, \\
    y &= (y^{\text{inter}} - b\,\varepsilon(x^{\text{inter}}, t)) / a, &
    x &= (x^{\text{inter}} - b\,\varepsilon(y, t)) / a
    \end{aligned}$$

    (with ``x`` and ``y`` exchanged in the last two lines on odd denoising steps). It costs
    two model evaluations per step. Use float64 (``jax_enable_x64``) when the round trip
    must be exact to many digits; see :func:`edict_sample` for the error growth.

    Args:
        eps_fn: ``eps_fn(x, t, cond) -> eps``, a pure function of its arguments (a
            :class:`StatefulEpsFn` is refused; CFG and APG without momentum are fine).
        x0: the clean sample (at noise level $\bar\alpha_0$), any pytree of floating
            arrays; the inversion starts from ``x = y = x0``. An :class:`EDICTState` pair
            (e.g. the output of :func:`edict_sample`) is inverted as it is, so that
            noise -> data -> noise round trips are exact too.
        schedule: the :class:`Schedule`.
        num_steps: number of steps ``N``, ``1 <= N <= schedule.num_train_steps`` (static);
            :func:`edict_sample` must use the same ``N``, ``mix`` and ``cond``.
        mix: mixing weight $p \in (0, 1]$ (0.93 in the paper); smaller values amplify
            rounding errors more (by $p^{-2}$ per step).
        cond: passed unchanged to every ``eps_fn`` call (any pytree, or ``None``).

    Returns:
        :class:`EDICTState` ``(x_T, y_T)``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> st = gen.edict_invert(lambda x, t, c: x, jnp.ones(2), gen.linear_schedule(),
        ...                       num_steps=3)
        >>> st.x.shape, st.y.shape
        ((2,), (2,))

    References:
        Wallace, Gokul, Naik (2023), "EDICT: Exact Diffusion Inversion via Coupled
        Transformations", CVPR, https://arxiv.org/abs/2211.12446
    """
    if isinstance(x0, EDICTState):
        start = _check_state(x0)
    else:
        check_sample(x0, "x0")
        start = EDICTState(x0, x0)
    schedule = check_schedule(schedule)
    num_steps = check_num_steps(num_steps, schedule.num_train_steps)
    _check_mix(mix)
    _, apply = as_stateful(eps_fn, start.x, cond, allow_state=False, caller="edict_invert")
    p, q = _mix_weights(mix, start.x)
    inv_p = 1 / p

    def step(carry, xs):
        x, y = carry
        t, a, b, odd = xs
        y = affine(inv_p, y, -q * inv_p, x)  # undo the mixing layer, last line first
        x = affine(inv_p, x, -q * inv_p, y)
        u, v = _swap(odd, x, y)  # u was updated first in this denoising step
        eps, _ = apply(u, t, cond, ())
        v = affine(1 / a, v, -b / a, eps)
        eps, _ = apply(v, t, cond, ())
        u = affine(1 / a, u, -b / a, eps)
        return _swap(odd, u, v), None

    (x, y), _ = lax.scan(step, tuple(start), _grid(schedule, num_steps), reverse=True)
    return EDICTState(x, y)
