r"""Deterministic DDIM sampling ($\eta = 0$) and its approximate inversion, as one ``lax.scan``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jax import lax

from linjax.generative._eps import StatefulEpsFn, affine, as_stateful, check_sample
from linjax.generative._schedules import Schedule, check_num_steps, check_schedule, ddim_grid

EpsFn = Callable[[Any, Any, Any], Any] | StatefulEpsFn


def ddim_sample(
    eps_fn: EpsFn, x_T: Any, schedule: Schedule, *, num_steps: int, cond: Any = None
) -> Any:
    r"""Denoise ``x_T`` with ``num_steps`` deterministic DDIM steps ($\eta = 0$).

    On the grid of :func:`ddim_timesteps` (high noise first), each step is

    $$x_{t'} = a_t\, x_t + b_t\, \varepsilon(x_t, t), \quad
    a_t = \sqrt{\bar\alpha_{t'}/\bar\alpha_t}, \quad
    b_t = \sqrt{1-\bar\alpha_{t'}} - \sqrt{\bar\alpha_{t'}(1-\bar\alpha_t)/\bar\alpha_t},$$

    i.e. predict $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}$
    and re-noise it to level $t'$ with the same $\varepsilon$. It is the first-order
    (exponential-Euler) discretisation of the probability-flow ODE, so its error falls
    like ``1/num_steps`` for a smooth model. The last step lands on $\bar\alpha_0$ (the
    Stable Diffusion convention), not on $\bar\alpha = 1$.

    The loop is one ``lax.scan``: compile time does not grow with ``num_steps``. One model
    evaluation per step. Coefficients are computed in the schedule's dtype (float64 when
    x64 is on) and cast to the sample's dtype; the output has ``x_T``'s dtype.

    Args:
        eps_fn: ``eps_fn(x, t, cond) -> eps`` with ``eps`` shaped and typed like ``x``;
            ``t`` is an int32 scalar training step. A :class:`StatefulEpsFn` (APG with
            momentum, from :func:`guided_eps_fn`) has its state carried through the loop.
        x_T: starting noise, any pytree of floating arrays (e.g. ``[batch, ...]``).
        schedule: the :class:`Schedule` the model was trained with.
        num_steps: number of steps ``N``, ``1 <= N <= schedule.num_train_steps`` (static).
        cond: passed unchanged to every ``eps_fn`` call (any pytree, or ``None``).

    Returns:
        The denoised sample, a pytree like ``x_T``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> eps_fn = lambda x, t, cond: 0.1 * x
        >>> x0 = gen.ddim_sample(eps_fn, jnp.ones(3), gen.linear_schedule(), num_steps=10)
        >>> x0.shape
        (3,)

    References:
        Song, Meng, Ermon (2021), "Denoising Diffusion Implicit Models",
        https://arxiv.org/abs/2010.02502
    """
    check_sample(x_T, "x_T")
    schedule = check_schedule(schedule)
    num_steps = check_num_steps(num_steps, schedule.num_train_steps)
    init, apply = as_stateful(eps_fn, x_T, cond, allow_state=True, caller="ddim_sample")
    t, a, b = ddim_grid(schedule, num_steps)

    def step(carry, xs):
        x, state = carry
        t_i, a_i, b_i = xs
        eps, state = apply(x, t_i, cond, state)
        return (affine(a_i, x, b_i, eps), state), None

    (x, _), _ = lax.scan(step, (x_T, init(x_T)), (t, a, b))
    return x


def ddim_invert(
    eps_fn: Callable[[Any, Any, Any], Any],
    x0: Any,
    schedule: Schedule,
    *,
    num_steps: int,
    cond: Any = None,
) -> Any:
    r"""Map a clean sample to DDIM noise: the usual approximate inversion of :func:`ddim_sample`.

    Visits the DDIM grid from low to high noise and solves each step for the noisier
    sample with the model evaluated at the *less* noisy one, labelled with the target
    timestep $t$ (diffusers' ``DDIMInverseScheduler``):

    $$x_t = \big(x_{t'} - b_t\, \varepsilon(x_{t'}, t)\big) / a_t.$$

    Because $\varepsilon(x_{t'}, t) \ne \varepsilon(x_t, t)$, sampling back from the
    result does not return ``x0`` exactly: the round-trip error is first order, falling
    like ``1/num_steps`` for a smooth model and growing with the guidance scale. Use
    :func:`edict_invert` for an exact inversion.

    Args:
        eps_fn: ``eps_fn(x, t, cond) -> eps``, a pure function (a :class:`StatefulEpsFn`
            is refused).
        x0: the clean sample (at noise level $\bar\alpha_0$), any pytree of floating arrays.
        schedule: the :class:`Schedule`.
        num_steps: number of steps ``N``, ``1 <= N <= schedule.num_train_steps`` (static).
        cond: passed unchanged to every ``eps_fn`` call (any pytree, or ``None``).

    Returns:
        The inverted noise $x_T$ at the first (noisiest) grid step, a pytree like ``x0``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> s, eps_fn = gen.linear_schedule(), lambda x, t, cond: 0.1 * x
        >>> xT = gen.ddim_invert(eps_fn, jnp.ones(3), s, num_steps=100)
        >>> x0 = gen.ddim_sample(eps_fn, xT, s, num_steps=100)
        >>> bool(jnp.allclose(x0, 1.0, atol=0.05))  # approximate: error ~ 1 / num_steps
        True

    References:
        Song, Meng, Ermon (2021), "Denoising Diffusion Implicit Models",
        https://arxiv.org/abs/2010.02502; Dhariwal, Nichol (2021), "Diffusion Models Beat
        GANs on Image Synthesis", https://arxiv.org/abs/2105.05233 (Appendix F).
    """
    check_sample(x0, "x0")
    schedule = check_schedule(schedule)
    num_steps = check_num_steps(num_steps, schedule.num_train_steps)
    _, apply = as_stateful(eps_fn, x0, cond, allow_state=False, caller="ddim_invert")
    t, a, b = ddim_grid(schedule, num_steps)

    def step(x, xs):
        t_i, a_i, b_i = xs
        eps, _ = apply(x, t_i, cond, ())
        return affine(1 / a_i, x, -b_i / a_i, eps), None

    x, _ = lax.scan(step, x0, (t, a, b), reverse=True)
    return x
