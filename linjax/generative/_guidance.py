r"""Classifier-free guidance (CFG) and adaptive projected guidance (APG).

Both combine a conditional and an unconditional prediction of the same model at the same
$(x_t, t)$. CFG is affine in the predictions, so it gives the same sampler whether applied
to noise ($\varepsilon$), denoised ($\hat x_0$) or velocity predictions. APG is not: the
paper applies it to the denoised prediction $\hat x_0$, which is what :func:`guided_eps_fn`
does by default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from linjax import _tree
from linjax.generative._eps import StatefulEpsFn
from linjax.generative._schedules import Schedule, check_schedule, eps_to_x0, x0_to_eps

_METHODS = ("cfg", "apg")
_SPACES = ("x0", "eps")


def _check_pair(pred_cond: Any, pred_uncond: Any) -> None:
    _tree.check_floating(pred_cond, "pred_cond")
    _tree.check_floating(pred_uncond, "pred_uncond")
    _tree.check_same_structure(pred_cond, pred_uncond, "pred_cond", "pred_uncond")


def cfg(pred_cond: Any, pred_uncond: Any, scale: jax.typing.ArrayLike) -> Any:
    r"""Classifier-free guidance: $\hat p = p_u + w\,(p_c - p_u)$.

    ``scale`` $w = 1$ returns the conditional prediction, $w = 0$ the unconditional one.
    (diffusers' ``use_original_formulation`` form $p_c + w'(p_c - p_u)$ has $w = w' + 1$.)

    Args:
        pred_cond: conditional prediction $p_c$ (pytree of floating arrays).
        pred_uncond: unconditional prediction $p_u$, structured, shaped and typed like
            ``pred_cond``.
        scale: guidance scale $w$, a scalar (or an array broadcasting against the leaves).

    Returns:
        The guided prediction, a pytree like ``pred_cond``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> gen.cfg(jnp.array([1.0, 2.0]), jnp.array([0.0, 1.0]), 3.0)
        Array([3., 4.], dtype=float32)

    References:
        Ho, Salimans (2022), "Classifier-Free Diffusion Guidance",
        https://arxiv.org/abs/2207.12598
    """
    _check_pair(pred_cond, pred_uncond)
    return jax.tree.map(
        lambda c, u: u + jnp.asarray(scale, c.dtype) * (c - u), pred_cond, pred_uncond
    )


class APGState(NamedTuple):
    """State of :func:`apg` along one sampling trajectory.

    Attributes:
        momentum: the running average $m$ of the guidance directions, a pytree like the
            predictions (zeros at the start of each trajectory; see :func:`apg_init`).
    """

    momentum: Any


def apg_init(like: Any) -> APGState:
    """A fresh :class:`APGState` (zero momentum) for predictions shaped like ``like``.

    Call it at the start of every trajectory: the momentum must not carry over.

    Args:
        like: a prediction (pytree of floating arrays), or ``jax.ShapeDtypeStruct``s.

    Returns:
        :class:`APGState` with zero momentum.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> gen.apg_init(jnp.ones((2, 3))).momentum.shape
        (2, 3)
    """
    _tree.check_floating(like, "like")
    return APGState(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), like))


def _batch_shape(tree: Any, batch_dims: int, name: str) -> tuple[int, ...]:
    shapes = {tuple(leaf.shape[:batch_dims]) for leaf in jax.tree.leaves(tree)}
    if any(leaf.ndim < batch_dims for leaf in jax.tree.leaves(tree)) or len(shapes) != 1:
        raise ValueError(
            f"every leaf of {name} must share the {batch_dims=} leading batch axes, got leaf "
            f"shapes {[tuple(leaf.shape) for leaf in jax.tree.leaves(tree)]}"
        )
    if all(leaf.ndim == batch_dims for leaf in jax.tree.leaves(tree)):
        raise ValueError(
            f"{name} has no axes beyond its {batch_dims=} leading batch axes, so there is "
            "nothing to project; pass batch_dims=0 to treat each array as one sample (e.g. "
            "under vmap)"
        )
    return shapes.pop()


def _per_sample_dot(x: Any, y: Any, batch_dims: int) -> jax.Array:
    # Accumulated in float64 when x64 is on (APG's reference code reduces in float64).
    acc = jax.dtypes.canonicalize_dtype(jnp.float64)
    parts = [
        jnp.sum(
            a.astype(acc) * b.astype(acc),
            axis=tuple(range(batch_dims, a.ndim)),
        )
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True)
    ]
    return sum(parts[1:], parts[0])


def _per_sample_scale(coef: jax.Array, x: Any, batch_dims: int) -> Any:
    def leaf(a):
        c = coef.reshape(coef.shape + (1,) * (a.ndim - batch_dims))
        return c.astype(a.dtype) * a

    return jax.tree.map(leaf, x)


def apg(
    pred_cond: Any,
    pred_uncond: Any,
    scale: jax.typing.ArrayLike,
    state: APGState,
    *,
    eta: jax.typing.ArrayLike = 0.0,
    norm_threshold: float | None = 2.5,
    momentum: jax.typing.ArrayLike = -0.75,
    batch_dims: int = 1,
) -> tuple[Any, APGState]:
    r"""Adaptive projected guidance: CFG with the update split along the prediction.

    Per sample, with $\Delta = p_c - p_u$ (the paper's convention and reference code):

    $$\begin{aligned}
    m &\leftarrow \Delta + \beta\, m, \qquad \Delta \leftarrow m
        &&\text{(momentum; } \beta = 0 \text{ disables it)} \\
    \Delta &\leftarrow \Delta \cdot \min(1,\ r / \|\Delta\|)
        &&\text{(rescaling; } r = \text{None disables it)} \\
    \Delta_\parallel &= \frac{\langle \Delta, p_c\rangle}{\langle p_c, p_c\rangle}\, p_c,
        \quad \Delta_\perp = \Delta - \Delta_\parallel \\
    \hat p &= p_c + (w - 1)\,(\Delta_\perp + \eta\, \Delta_\parallel).
    \end{aligned}$$

    With ``eta=1``, ``norm_threshold=None`` and ``momentum=0`` this is exactly
    :func:`cfg`. Norms and inner products run over all non-batch axes of all leaves (a
    pytree is one vector per sample), accumulated in float64 when x64 is on. A zero
    $p_c$ has no direction: its $\Delta_\parallel$ is taken as 0; a zero $\Delta$ is
    left as is (no NaN in either case).

    **Which prediction.** The paper applies APG to the *denoised* prediction
    $\hat x_0 = D(x_t)$; since APG is not affine-invariant, applying it to noise or
    velocity predictions (as diffusers' guider does) is a different method. For an
    $\varepsilon$-model convert with :func:`eps_to_x0` / :func:`x0_to_eps`, or use
    :func:`guided_eps_fn` (``space="x0"`` by default, ``space="eps"`` for the raw output).

    Defaults ($\eta = 0$, $r = 2.5$, $\beta = -0.75$) are those of the paper's code as
    copied in ACE-Step and TREAD; diffusers' ``AdaptiveProjectedGuidance`` uses $\eta = 1$,
    $r = 15$, no momentum and a different formula ($p_u + w\,\cdot$ update).

    Args:
        pred_cond: conditional prediction $p_c$, a pytree of floating arrays whose leaves
            share ``batch_dims`` leading batch axes.
        pred_uncond: unconditional prediction $p_u$, like ``pred_cond``.
        scale: guidance scale $w$ (scalar).
        state: :class:`APGState` from :func:`apg_init` or the previous step.
        eta: weight $\eta$ of the parallel component (0: drop it, 1: keep it).
        norm_threshold: $r > 0$, the largest allowed norm of the update per sample, or
            ``None`` to disable rescaling.
        momentum: $\beta$ (negative: the paper's "reverse momentum"); 0 disables it.
        batch_dims: number of leading batch axes (1 for ``[batch, ...]`` predictions; 0
            when each call sees one sample, e.g. under ``vmap``).

    Returns:
        ``(pred, state)``: the guided prediction (like ``pred_cond``) and the new state.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> pc, pu = jnp.array([[1.0, 0.0]]), jnp.array([[0.0, 1.0]])
        >>> pred, state = gen.apg(pc, pu, 2.0, gen.apg_init(pc), norm_threshold=None,
        ...                       momentum=0.0)
        >>> pred  # the parallel part (1, 0) of the update (1, -1) is dropped
        Array([[ 1., -1.]], dtype=float32)

    References:
        Sadat, Hilliges, Weber (2025), "Eliminating Oversaturation and Artifacts of High
        Guidance Scales in Diffusion Models", ICLR, https://arxiv.org/abs/2410.02416
    """
    _check_pair(pred_cond, pred_uncond)
    if not isinstance(state, APGState):
        raise TypeError(f"state must be an APGState (from apg_init), got {type(state).__name__}")
    _tree.check_same_structure(state.momentum, pred_cond, "state.momentum", "pred_cond")
    if norm_threshold is not None:
        _tree.check_positive_scalar(norm_threshold, "norm_threshold")
    batch_dims = _tree.check_positive_int(batch_dims, "batch_dims", minimum=0)
    _batch_shape(pred_cond, batch_dims, "pred_cond")

    diff = _tree.tree_sub(pred_cond, pred_uncond)
    if not (isinstance(momentum, int | float) and momentum == 0):
        diff = _tree.tree_axpy(momentum, state.momentum, diff)
    new_state = APGState(diff)
    if norm_threshold is not None:
        norm = jnp.sqrt(_per_sample_dot(diff, diff, batch_dims))
        r = jnp.asarray(norm_threshold, norm.dtype)
        factor = jnp.where(norm > r, r / jnp.where(norm > r, norm, 1), 1)
        diff = _per_sample_scale(factor, diff, batch_dims)
    cc = _per_sample_dot(pred_cond, pred_cond, batch_dims)
    coef = jnp.where(
        cc > 0, _per_sample_dot(diff, pred_cond, batch_dims) / jnp.where(cc > 0, cc, 1), 0
    )
    parallel = _per_sample_scale(coef, pred_cond, batch_dims)
    orthogonal = _tree.tree_sub(diff, parallel)
    update = _tree.tree_axpy(eta, parallel, orthogonal)
    pred = jax.tree.map(lambda c, d: c + (jnp.asarray(scale, c.dtype) - 1) * d, pred_cond, update)
    return pred, new_state


def guided_eps_fn(
    model: Callable[[Any, Any, Any], Any],
    scale: jax.typing.ArrayLike,
    *,
    null_cond: Any,
    method: str = "cfg",
    schedule: Schedule | None = None,
    space: str = "x0",
    eta: jax.typing.ArrayLike = 0.0,
    norm_threshold: float | None = 2.5,
    momentum: jax.typing.ArrayLike = -0.75,
    batch_dims: int = 1,
) -> Callable[[Any, Any, Any], Any] | StatefulEpsFn:
    r"""Turn a conditional noise model into a guided ``eps_fn`` for the samplers.

    The guided predictor calls ``model(x, t, cond)`` and ``model(x, t, null_cond)`` (two
    model evaluations) and combines them:

    * ``method="cfg"``: $\hat\varepsilon = \varepsilon_u + w(\varepsilon_c - \varepsilon_u)$.
      Stateless; returns a plain ``eps_fn(x, t, cond)`` that works with every sampler and
      inverter (EDICT stays exact with it).
    * ``method="apg"``: :func:`apg` on the denoised predictions
      $\hat x_0 = (x_t - \sqrt{1-\bar\alpha_t}\,\varepsilon)/\sqrt{\bar\alpha_t}$
      (``space="x0"``, the paper's convention; needs ``schedule``), converted back to
      $\varepsilon$ afterwards; ``space="eps"`` applies APG to the model outputs directly.
      With ``momentum=0.0`` it is stateless and returns a plain ``eps_fn``. With momentum
      the guidance depends on the trajectory so far, so it returns a
      :class:`StatefulEpsFn` whose momentum buffer :func:`ddim_sample` and
      :func:`edict_sample` carry in their scan (reset to zero at the start of each call);
      the inverters refuse it, because a history-dependent $\varepsilon$ cannot be inverted
      step by step (EDICT's exactness needs $\varepsilon$ to be a function of
      $(x_t, t)$).

    Args:
        model: ``model(x, t, cond) -> eps``, the conditional noise predictor.
        scale: guidance scale $w$.
        null_cond: the unconditional input passed in place of ``cond`` (e.g. the empty
            prompt's embedding or a null class; ``None`` if the model takes that).
        method: ``"cfg"`` or ``"apg"``.
        schedule: the :class:`Schedule`, needed for ``method="apg"`` with ``space="x0"``
            (to look up $\bar\alpha_t$ for the int timestep ``t``).
        space: ``"x0"`` or ``"eps"``: where APG acts (ignored by CFG, which is the same in
            both).
        eta: APG's parallel weight $\eta$.
        norm_threshold: APG's rescaling threshold $r$ (``None``: off).
        momentum: APG's momentum $\beta$ (0.0: off, stateless).
        batch_dims: leading batch axes of the samples, for APG's per-sample norms.

    Returns:
        A plain ``eps_fn(x, t, cond)``, or a :class:`StatefulEpsFn` for APG with momentum.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> model = lambda x, t, c: 0.1 * x + c
        >>> eps_fn = gen.guided_eps_fn(model, 3.0, null_cond=jnp.zeros(2))
        >>> eps_fn(jnp.ones(2), 10, jnp.ones(2))  # 0.1 + 3 * 1
        Array([3.1, 3.1], dtype=float32)
        >>> x0 = gen.ddim_sample(eps_fn, jnp.ones(2), gen.linear_schedule(), num_steps=4,
        ...                      cond=jnp.full(2, 0.01))
    """
    if not callable(model):
        raise TypeError(f"model must be callable as model(x, t, cond), got {type(model)}")
    if method not in _METHODS:
        raise ValueError(f"{method=} must be one of {_METHODS}")
    if method == "cfg":

        def cfg_eps(x, t, cond):
            return cfg(model(x, t, cond), model(x, t, null_cond), scale)

        return cfg_eps

    if space not in _SPACES:
        raise ValueError(f"{space=} must be one of {_SPACES}")
    if space == "x0":
        if schedule is None:
            raise ValueError(
                "method='apg' with space='x0' needs schedule= to convert eps to x0 "
                "(or pass space='eps' to guide the raw model output)"
            )
        schedule = check_schedule(schedule)
    if norm_threshold is not None:
        _tree.check_positive_scalar(norm_threshold, "norm_threshold")
    batch_dims = _tree.check_positive_int(batch_dims, "batch_dims", minimum=0)
    stateless = isinstance(momentum, int | float) and momentum == 0
    options = dict(eta=eta, norm_threshold=norm_threshold, momentum=momentum, batch_dims=batch_dims)

    def apply(x, t, cond, state):
        eps_c, eps_u = model(x, t, cond), model(x, t, null_cond)
        if space == "eps":
            return apg(eps_c, eps_u, scale, state, **options)
        ac = schedule.alphas_cumprod[t]
        pred, state = apg(eps_to_x0(x, eps_c, ac), eps_to_x0(x, eps_u, ac), scale, state, **options)
        return x0_to_eps(x, pred, ac), state

    if stateless:

        def apg_eps(x, t, cond):
            return apply(x, t, cond, apg_init(x))[0]

        return apg_eps
    return StatefulEpsFn(init=apg_init, apply=apply)
