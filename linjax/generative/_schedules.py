r"""Variance-preserving noise schedules and the DDIM timestep grid.

A schedule is the table $\bar\alpha_t = \prod_{i \le t} (1 - \beta_i)$ over the training
steps $t = 0, \dots, T-1$, with $x_t = \sqrt{\bar\alpha_t}\, x_0 + \sqrt{1 - \bar\alpha_t}\,
\varepsilon$. Samplers pick ``num_steps`` of the ``T`` training steps with
:func:`ddim_timesteps`.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linjax import _tree


class Schedule(NamedTuple):
    r"""A variance-preserving noise schedule: the cumulative products $\bar\alpha_t$.

    Attributes:
        alphas_cumprod: ``[num_train_steps]`` floating array,
            $\bar\alpha_t = \prod_{i \le t}(1 - \beta_i)$ for training steps
            $t = 0, \dots, T-1$; every entry must lie in $(0, 1)$ (so that both
            $\sqrt{\bar\alpha_t}$ and $\sqrt{1 - \bar\alpha_t}$ are nonzero).
    """

    alphas_cumprod: jax.Array

    @property
    def num_train_steps(self) -> int:
        """Number of training steps ``T`` (static)."""
        return int(self.alphas_cumprod.shape[-1])


def _float_dtype() -> Any:
    # float64 when x64 is enabled, float32 otherwise.
    return jax.dtypes.canonicalize_dtype(jnp.float64)


def _from_betas(betas: np.ndarray) -> Schedule:
    # The cumulative product is taken in float64 numpy and stored in the widest enabled dtype.
    return Schedule(jnp.asarray(np.cumprod(1.0 - betas), dtype=_float_dtype()))


def _check_beta(value: Any, name: str) -> float:
    _tree.check_positive_scalar(value, name)
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete number (schedules are built eagerly)")
    if not value < 1:
        raise ValueError(f"{name}={value!r} must lie in (0, 1)")
    return float(value)


def linear_schedule(
    num_train_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 2e-2
) -> Schedule:
    r"""The linear-$\beta$ schedule of DDPM.

    $\beta_t$ runs linearly from ``beta_start`` to ``beta_end`` over the training steps
    $t = 0, \dots, T-1$ and $\bar\alpha_t = \prod_{i \le t}(1 - \beta_i)$, accumulated in
    float64 and stored in float64 when x64 is enabled (float32 otherwise).

    Args:
        num_train_steps: number of training steps ``T >= 2``.
        beta_start: $\beta_0 \in (0, 1)$.
        beta_end: $\beta_{T-1} \in (0, 1)$.

    Returns:
        :class:`Schedule` with ``alphas_cumprod`` of shape ``[num_train_steps]``.

    Examples:
        >>> from linjax import generative as gen
        >>> s = gen.linear_schedule(1000)
        >>> s.num_train_steps, round(float(s.alphas_cumprod[0]), 6)
        (1000, 0.9999)

    References:
        Ho, Jain, Abbeel (2020), "Denoising Diffusion Probabilistic Models",
        https://arxiv.org/abs/2006.11239
    """
    num_train_steps = _tree.check_positive_int(num_train_steps, "num_train_steps", minimum=2)
    start = _check_beta(beta_start, "beta_start")
    end = _check_beta(beta_end, "beta_end")
    return _from_betas(np.linspace(start, end, num_train_steps, dtype=np.float64))


def scaled_linear_schedule(
    num_train_steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> Schedule:
    r"""The "scaled linear" schedule of Stable Diffusion (linear in $\sqrt\beta$).

    $\beta_t = \big(\sqrt{\beta_\text{start}} + \tfrac{t}{T-1}(\sqrt{\beta_\text{end}} -
    \sqrt{\beta_\text{start}})\big)^2$; the defaults are Stable Diffusion 1.x/2.x's, the
    schedule EDICT was published with.

    Args:
        num_train_steps: number of training steps ``T >= 2``.
        beta_start: $\beta_0 \in (0, 1)$.
        beta_end: $\beta_{T-1} \in (0, 1)$.

    Returns:
        :class:`Schedule` with ``alphas_cumprod`` of shape ``[num_train_steps]``.

    Examples:
        >>> from linjax import generative as gen
        >>> round(float(gen.scaled_linear_schedule().alphas_cumprod[0]), 5)
        0.99915

    References:
        Rombach et al. (2022), "High-Resolution Image Synthesis with Latent Diffusion
        Models", https://arxiv.org/abs/2112.10752
    """
    num_train_steps = _tree.check_positive_int(num_train_steps, "num_train_steps", minimum=2)
    start = _check_beta(beta_start, "beta_start")
    end = _check_beta(beta_end, "beta_end")
    sqrt_betas = np.linspace(math.sqrt(start), math.sqrt(end), num_train_steps, dtype=np.float64)
    return _from_betas(sqrt_betas**2)


def cosine_schedule(num_train_steps: int = 1000) -> Schedule:
    r"""The cosine schedule of Nichol & Dhariwal, with their clipping of $\beta$ at 0.999.

    With $f(u) = \cos^2\!\big(\tfrac{u + s}{1 + s}\,\tfrac{\pi}{2}\big)$ and $s = 0.008$,
    $\beta_t = \min\big(1 - f(\tfrac{t+1}{T}) / f(\tfrac{t}{T}),\ 0.999\big)$ and
    $\bar\alpha_t = \prod_{i \le t}(1 - \beta_i)$. Without clipping
    $\bar\alpha_t = f(\tfrac{t+1}{T}) / f(0)$; the clipping only bites at the last steps,
    where $f \to 0$ would otherwise give $\bar\alpha_{T-1} = 0$ (for ``T = 1000`` only the
    last $\beta$ is clipped).

    Args:
        num_train_steps: number of training steps ``T >= 2``.

    Returns:
        :class:`Schedule` with ``alphas_cumprod`` of shape ``[num_train_steps]``.

    Examples:
        >>> from linjax import generative as gen
        >>> s = gen.cosine_schedule(1000)
        >>> bool(s.alphas_cumprod[-1] > 0)
        True

    References:
        Nichol, Dhariwal (2021), "Improved Denoising Diffusion Probabilistic Models",
        https://arxiv.org/abs/2102.09672 (Eq. 17)
    """
    num_train_steps = _tree.check_positive_int(num_train_steps, "num_train_steps", minimum=2)
    s = 0.008
    u = np.arange(num_train_steps + 1, dtype=np.float64) / num_train_steps
    f = np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    betas = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    return _from_betas(betas)


def ddim_timesteps(num_train_steps: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    r"""The ``num_steps`` training steps a DDIM-type sampler visits, and the step after each.

    The grid is "leading" spacing with offset 1 and a final $\bar\alpha$ of
    $\bar\alpha_0$, i.e. diffusers' ``DDIMScheduler`` with the Stable Diffusion
    configuration (``timestep_spacing="leading"``, ``steps_offset=1``,
    ``set_alpha_to_one=False``), which is also what the EDICT reference code runs:
    with $\Delta = \lfloor T / N \rfloor$,

    $$t_i = (N - 1 - i)\,\Delta + 1, \qquad t'_i = t_i - \Delta, \qquad i = 0, \dots, N-1,$$

    visited from high to low noise. A negative $t'$ (only the last step's) stands for the
    clean end of the chain and uses $\bar\alpha_0$, not 1. The offset is dropped (0) when
    ``num_steps == num_train_steps``, where it would index past the schedule.
    For ``T = 1000, N = 50`` the grid is ``981, 961, ..., 1`` with ``t' = 961, ..., 1, -19``.
    Like diffusers' "leading" spacing, the grid starts at $T - \Delta + 1$ only when
    ``N`` divides ``T``; otherwise it starts lower (``T = 1000, N = 400`` starts at 799,
    not at the noisiest step), so prefer step counts that divide ``T``.

    Args:
        num_train_steps: ``T``, the length of the schedule.
        num_steps: ``N``, ``1 <= N <= T``.

    Returns:
        ``(t, t_prev)``: two ``[num_steps]`` int32 numpy arrays, ``t`` descending.

    Examples:
        >>> from linjax import generative as gen
        >>> t, t_prev = gen.ddim_timesteps(1000, 4)
        >>> t.tolist(), t_prev.tolist()
        ([751, 501, 251, 1], [501, 251, 1, -249])
    """
    num_train_steps = _tree.check_positive_int(num_train_steps, "num_train_steps", minimum=2)
    num_steps = check_num_steps(num_steps, num_train_steps)
    delta = num_train_steps // num_steps
    offset = 1 if (num_steps - 1) * delta + 1 <= num_train_steps - 1 else 0
    t = (np.arange(num_steps)[::-1] * delta + offset).astype(np.int32)
    return t, (t - delta).astype(np.int32)


def check_num_steps(num_steps: Any, num_train_steps: int) -> int:
    """Validate ``1 <= num_steps <= num_train_steps`` (a static int)."""
    num_steps = _tree.check_positive_int(num_steps, "num_steps")
    if num_steps > num_train_steps:
        raise ValueError(f"{num_steps=} must be <= the schedule's {num_train_steps=}")
    return num_steps


def check_schedule(schedule: Any) -> Schedule:
    """Validate a :class:`Schedule`: 1-D floating, and (when concrete) entries in (0, 1)."""
    ac = getattr(schedule, "alphas_cumprod", None)
    if ac is None:
        raise TypeError(
            f"schedule must be a Schedule(alphas_cumprod), got {type(schedule).__name__}; "
            "build one with linear_schedule() or cosine_schedule()"
        )
    dtype = getattr(ac, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"schedule.alphas_cumprod must be a floating array, got dtype {dtype}")
    if ac.ndim != 1 or ac.shape[0] < 2:
        raise ValueError(
            f"schedule.alphas_cumprod must have shape [num_train_steps >= 2], got {ac.shape}"
        )
    if not isinstance(ac, jax.core.Tracer):
        a = np.asarray(ac)
        if not np.all((a > 0) & (a < 1)):
            bad = a[~((a > 0) & (a < 1))][:3]
            raise ValueError(
                f"schedule.alphas_cumprod entries must lie in (0, 1) (0 or 1 would divide by "
                f"zero in the DDIM update), got e.g. {bad.tolist()}"
            )
    return Schedule(ac)


def ddim_grid(schedule: Schedule, num_steps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    r"""Timesteps and the affine DDIM coefficients of every step, high noise first.

    One deterministic DDIM step is $x_{t'} = a\,x_t + b\,\varepsilon(x_t, t)$ with
    $a = \sqrt{\bar\alpha_{t'}/\bar\alpha_t}$ and
    $b = \sqrt{1-\bar\alpha_{t'}} - \sqrt{\bar\alpha_{t'}(1-\bar\alpha_t)/\bar\alpha_t}$.

    Returns:
        ``(t, a, b)``, each ``[num_steps]``: int32 timesteps and the coefficients in the
        schedule's dtype.
    """
    t, t_prev = ddim_timesteps(schedule.num_train_steps, num_steps)
    ac = schedule.alphas_cumprod
    ac_t = ac[t]
    ac_prev = ac[np.maximum(t_prev, 0)]  # t' < 0: the final alpha-bar is alphas_cumprod[0]
    a = jnp.sqrt(ac_prev / ac_t)
    b = jnp.sqrt(1 - ac_prev) - jnp.sqrt(ac_prev * (1 - ac_t) / ac_t)
    return jnp.asarray(t), a, b


def eps_to_x0(x: Any, eps: Any, alpha_cumprod: jax.typing.ArrayLike) -> Any:
    r"""The denoised prediction $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\hat\varepsilon) /
    \sqrt{\bar\alpha_t}$ from a noise prediction.

    Args:
        x: the noisy sample $x_t$ (pytree).
        eps: the noise prediction, a pytree like ``x``.
        alpha_cumprod: $\bar\alpha_t \in (0, 1]$, a scalar (or broadcastable array).

    Returns:
        $\hat x_0$, a pytree like ``x``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> gen.eps_to_x0(jnp.ones(2), jnp.zeros(2), 0.25)
        Array([2., 2.], dtype=float32)
    """
    return jax.tree.map(
        lambda xl, el: (
            (xl - jnp.sqrt(1 - jnp.asarray(alpha_cumprod, xl.dtype)) * el)
            / jnp.sqrt(jnp.asarray(alpha_cumprod, xl.dtype))
        ),
        x,
        eps,
    )


def x0_to_eps(x: Any, x0: Any, alpha_cumprod: jax.typing.ArrayLike) -> Any:
    r"""The noise prediction $\hat\varepsilon = (x_t - \sqrt{\bar\alpha_t}\,\hat x_0) /
    \sqrt{1-\bar\alpha_t}$ from a denoised prediction (inverse of :func:`eps_to_x0`).

    Args:
        x: the noisy sample $x_t$ (pytree).
        x0: the denoised prediction, a pytree like ``x``.
        alpha_cumprod: $\bar\alpha_t \in [0, 1)$; $\bar\alpha_t = 1$ divides by zero.

    Returns:
        $\hat\varepsilon$, a pytree like ``x``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> gen.x0_to_eps(jnp.ones(2), 2 * jnp.ones(2), 0.25)
        Array([0., 0.], dtype=float32)
    """
    return jax.tree.map(
        lambda xl, dl: (
            (xl - jnp.sqrt(jnp.asarray(alpha_cumprod, xl.dtype)) * dl)
            / jnp.sqrt(1 - jnp.asarray(alpha_cumprod, xl.dtype))
        ),
        x,
        x0,
    )
