r"""Damped Gauss-Newton steps by matrix-free CG: a direction, an optax transform, unlearning.

All three solve $(G + \lambda I)\, d = g$ with $G = J^\top H_L J$ the generalised
Gauss-Newton matrix of :func:`~linjax.curvature.ggn` (exact products, no Kronecker
approximation) by :func:`linjax.lintools.cg`, truncated at ``max_steps`` iterations as in
Hessian-free optimisation. The model is linearised once per solve; each CG iteration costs
one JVP and one transposed JVP through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from linjax import _tree
from linjax import lintools as lt
from linjax.curvature._products import ggn_parts, split_batch

_SCALINGS = ("trust_region", "fixed")


def _check_rtol(rtol: Any) -> None:
    if not (isinstance(rtol, (int, float)) and not isinstance(rtol, bool) and rtol >= 0):
        raise ValueError(f"{rtol=} must be a number >= 0")


def gauss_newton_direction(
    apply_fn: Callable,
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    damping: float | jax.Array,
    max_steps: int,
    grads: Any = None,
    rtol: float = 1e-6,
) -> tuple[Any, lt.CGResult]:
    r"""Solve $(G + \lambda I)\, d = g$ for the damped Gauss-Newton direction by CG.

    $G = J^\top H_L J$ is the GGN of ``loss_fn(apply_fn(params, inputs), targets)`` on
    ``batch`` (see :func:`~linjax.curvature.ggn`) and $g$ its gradient, or ``grads`` when
    given (e.g. a gradient including a regulariser, or another objective's gradient). $d$
    points uphill like $g$: the Gauss-Newton *update* is $\theta - \eta\, d$. CG stops at
    ``rtol`` or after ``max_steps`` iterations; a truncated solve is still a descent
    direction ($g^\top d > 0$ for every CG iterate started at zero), and the returned
    :class:`~linjax.lintools.CGResult` says how far it got.

    Args:
        apply_fn: ``apply_fn(params, inputs) -> outputs``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (a recognised loss such as
            :func:`~linjax.curvature.softmax_cross_entropy` uses its closed-form Hessian).
        params: the point $\theta$, a pytree of floating arrays.
        batch: ``(inputs, targets)``.
        damping: $\lambda > 0$ (Levenberg-Marquardt / Tikhonov term; may be traced).
        max_steps: CG iteration cap, >= 1.
        grads: right-hand side shaped like ``params`` (default: the gradient of the loss on
            ``batch``, computed from the same linearisation, $J^\top \nabla_z L$).
        rtol: CG relative residual tolerance, >= 0.

    Returns:
        ``(direction, cg_result)``: ``direction`` shaped like ``params`` (dtypes of ``grads``,
        else of ``params``) and the :class:`~linjax.lintools.CGResult` of the solve.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> apply = lambda w, x: x @ w
        >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([[1.0], [4.0]])
        >>> d, res = cv.gauss_newton_direction(apply, cv.squared_error, jnp.zeros((2, 1)),
        ...                                    (x, y), damping=1e-6, max_steps=10)
        >>> (jnp.zeros((2, 1)) - d).round(3).ravel()   # the least-squares solution
        Array([1., 2.], dtype=float32)

    References:
        Martens (2010), "Deep learning via Hessian-free optimization", ICML. Schraudolph
        (2002), Neural Computation 14. Nocedal, Wright, "Numerical Optimization", §10.3.
    """
    _tree.check_positive_scalar(damping, "damping")
    max_steps = _tree.check_positive_int(max_steps, "max_steps")
    _check_rtol(rtol)
    parts = ggn_parts(apply_fn, loss_fn, params, batch)
    if grads is None:
        _, targets = split_batch(batch)
        grads = parts.vjp(jax.grad(lambda z: loss_fn(z, targets))(parts.outputs))
        out_like = params
    else:
        _tree.check_same_structure(grads, params, "grads", "params", check_dtypes=False)
        _tree.check_floating(grads, "grads")
        out_like = grads
    # The linearisation wants tangents in the dtypes of params.
    rhs = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)

    def matvec(v):
        return _tree.tree_axpy(damping, v, parts.vjp(parts.loss_hvp(parts.jvp(v))))

    res = lt.cg(matvec, rhs, rtol=rtol, max_steps=max_steps)
    direction = jax.tree.map(lambda x, ref: x.astype(ref.dtype), res.x, out_like)
    return direction, res


class GaussNewtonState(NamedTuple):
    """State of :func:`gauss_newton`: a step count and the last CG solve's statistics.

    Attributes:
        count: int32 ``[]``, number of updates so far.
        cg_steps: int32 ``[]``, CG iterations of the last update.
        cg_residual_norm: ``[]`` in the params' dtype, final residual norm of the last solve.
        cg_converged: bool ``[]``, whether the last solve met ``rtol`` within ``max_steps``.
    """

    count: jax.Array
    cg_steps: jax.Array
    cg_residual_norm: jax.Array
    cg_converged: jax.Array


def gauss_newton(
    apply_fn: Callable,
    loss_fn: Callable,
    *,
    damping: float,
    max_steps: int,
    rtol: float = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""Damped Gauss-Newton preconditioning as an optax transformation.

    ``update(updates, state, params, *, batch)`` treats the incoming ``updates`` as the
    gradient $g$ and returns $d = (G + \lambda I)^{-1} g$ with $G$ the GGN of
    ``loss_fn(apply_fn(params, inputs), targets)`` on ``batch`` at ``params``
    (:func:`gauss_newton_direction`, CG capped at ``max_steps``). Like optax's ``scale_by_*``
    transforms the result points uphill, so ``optax.chain(gauss_newton(...),
    optax.scale(-lr))`` followed by ``optax.apply_updates`` descends: $\theta \leftarrow
    \theta - \eta\,(G + \lambda I)^{-1} g$. With $\eta = 1$ and small $\lambda$ this is the
    (Levenberg-Marquardt) Gauss-Newton step. ``batch`` is an extra argument, so ``optax.chain``
    forwards it: ``opt.update(grads, state, params, batch=batch)``.

    Args:
        apply_fn: ``apply_fn(params, inputs) -> outputs``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        damping: $\lambda > 0$.
        max_steps: CG iterations per update, >= 1 (5-50 is typical).
        rtol: CG relative tolerance, >= 0.

    Returns:
        An ``optax.GradientTransformationExtraArgs`` whose state is a
        :class:`GaussNewtonState`.

    Examples:
        >>> import jax, jax.numpy as jnp, optax
        >>> from linjax import curvature as cv
        >>> apply = lambda w, x: x @ w
        >>> loss = lambda w, b: cv.squared_error(apply(w, b[0]), b[1])
        >>> opt = optax.chain(cv.gauss_newton(apply, cv.squared_error, damping=1e-3,
        ...                                   max_steps=10), optax.scale(-1.0))
        >>> w, batch = jnp.zeros((2, 1)), (jnp.eye(2), jnp.ones((2, 1)))
        >>> state = opt.init(w)
        >>> updates, state = opt.update(jax.grad(loss)(w, batch), state, w, batch=batch)
        >>> optax.apply_updates(w, updates).round(2).ravel()
        Array([1., 1.], dtype=float32)

    References:
        Martens (2010), "Deep learning via Hessian-free optimization", ICML. Botev, Ritter,
        Barber (2017), "Practical Gauss-Newton optimisation for deep learning", ICML.
    """
    _tree.check_positive_scalar(damping, "damping")
    max_steps = _tree.check_positive_int(max_steps, "max_steps")
    _check_rtol(rtol)

    def init_fn(params):
        _tree.check_floating(params, "params")
        return GaussNewtonState(
            count=jnp.zeros([], jnp.int32),
            cg_steps=jnp.zeros([], jnp.int32),
            cg_residual_norm=jnp.zeros([], _tree.tree_dtype(params)),
            cg_converged=jnp.zeros([], bool),
        )

    def update_fn(updates, state, params=None, *, batch=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError(
                "gauss_newton needs the parameters: call update(updates, state, params, "
                "batch=batch)"
            )
        if batch is None:
            raise ValueError(
                "gauss_newton needs the batch: call update(..., batch=(inputs, targets))"
            )
        direction, res = gauss_newton_direction(
            apply_fn,
            loss_fn,
            params,
            batch,
            damping=damping,
            max_steps=max_steps,
            grads=updates,
            rtol=rtol,
        )
        new_state = GaussNewtonState(
            count=optax.safe_int32_increment(state.count),
            cg_steps=res.num_steps.astype(jnp.int32),
            cg_residual_norm=res.residual_norm.astype(state.cg_residual_norm.dtype),
            cg_converged=res.converged,
        )
        return direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gauss_newton_unlearn(
    apply_fn: Callable,
    loss_fn: Callable,
    params: Any,
    forget_batch: Any,
    retain_batch: Any,
    *,
    damping: float | jax.Array,
    step_size: float | jax.Array,
    num_steps: int,
    max_cg_steps: int,
    scaling: str = "trust_region",
    rtol: float = 1e-6,
) -> Any:
    r"""Unlearn a forget set by uphill Gauss-Newton steps preconditioned by the retain set.

    Each of ``num_steps`` iterations (a ``lax.scan``) takes, at the current $\theta$,

    $$d = (G_r + \lambda I)^{-1} \nabla_\theta L_f, \qquad \theta \leftarrow \theta + \alpha\, d,$$

    with $L_f$ the loss on ``forget_batch``, $G_r$ the GGN of the loss on ``retain_batch``
    (re-linearised at every step, exact products, solved by CG with ``max_cg_steps``
    iterations), and $\alpha$:

    * ``scaling="trust_region"`` (default): $\alpha = \sqrt{2\varepsilon / g^\top d}$ with
      $\varepsilon$ = ``step_size``, so that the step's predicted change of the retain-set
      outputs, $\frac12 \Delta\theta^\top (G_r + \lambda I) \Delta\theta$, equals
      $\varepsilon$. For softmax cross-entropy $\frac12 \Delta\theta^\top G_r \Delta\theta$ is
      the second-order expansion of the mean KL divergence between the retain-set predictions
      before and after the step, so $\varepsilon$ is a per-step KL budget. The step length
      does not depend on the scale of $\nabla L_f$, which is tiny on memorised data; a zero
      forget gradient gives a zero step.
    * ``scaling="fixed"``: $\alpha$ = ``step_size``, a plain damped GN ascent step.

    $d$ maximises the first-order increase of $L_f$ per unit of that retain-set change: the
    output-space constraint on the retain set becomes a weight-space metric. This follows
    McKinney et al. (K-FADE), who approximate $G_r$ by K-FAC/EK-FAC so that the solve is
    affordable for LLMs; here $G_r$ is exact (matrix-free products solved by CG, truncated at
    ``max_cg_steps``), for models whose GGN-vector products are affordable. The trust-region
    scaling is our reading of the paper's constraint on the retain-set outputs, not a port
    of its code.

    Args:
        apply_fn: ``apply_fn(params, inputs) -> outputs``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, used on both sets.
        params: the trained parameters.
        forget_batch: ``(inputs, targets)`` to unlearn.
        retain_batch: ``(inputs, targets)`` whose predictions should not move.
        damping: $\lambda > 0$.
        step_size: $\varepsilon$ (``"trust_region"``) or $\alpha$ (``"fixed"``), > 0.
        num_steps: number of uphill steps, >= 1.
        max_cg_steps: CG iterations per step, >= 1.
        scaling: ``"trust_region"`` or ``"fixed"``.
        rtol: CG relative tolerance, >= 0.

    Returns:
        The unlearned parameters, shaped like ``params``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> apply = lambda w, x: x @ w
        >>> x = jnp.eye(3)
        >>> w = 3.0 * jnp.eye(3)
        >>> w2 = cv.gauss_newton_unlearn(apply, cv.softmax_cross_entropy, w,
        ...                              (x[:1], jnp.array([0])), (x[1:], jnp.array([1, 2])),
        ...                              damping=1e-2, step_size=0.5, num_steps=3,
        ...                              max_cg_steps=20)
        >>> w2.shape
        (3, 3)

    References:
        McKinney, Thudi, Bae, Rezaei, Papernot, McIlraith, Grosse (2026), "Gauss-Newton
        Unlearning for the LLM Era", arXiv:2602.10568. Martens (2020), JMLR 21.
    """
    _tree.check_positive_scalar(damping, "damping")
    _tree.check_positive_scalar(step_size, "step_size")
    num_steps = _tree.check_positive_int(num_steps, "num_steps")
    max_cg_steps = _tree.check_positive_int(max_cg_steps, "max_cg_steps")
    if scaling not in _SCALINGS:
        raise ValueError(f"{scaling=} must be one of {_SCALINGS}")
    _check_rtol(rtol)
    _tree.check_floating(params, "params")
    forget_inputs, forget_targets = split_batch(forget_batch, "forget_batch")
    split_batch(retain_batch, "retain_batch")

    def forget_loss(p):
        return loss_fn(apply_fn(p, forget_inputs), forget_targets)

    def step(p, _):
        g = jax.grad(forget_loss)(p)
        d, _ = gauss_newton_direction(
            apply_fn,
            loss_fn,
            p,
            retain_batch,
            damping=damping,
            max_steps=max_cg_steps,
            grads=g,
            rtol=rtol,
        )
        if scaling == "trust_region":
            gd = _tree.tree_dot(g, d)
            ok = gd > 0
            alpha = jnp.where(ok, jnp.sqrt(2 * step_size / jnp.where(ok, gd, 1)), 0)
        else:
            alpha = step_size
        return _tree.tree_axpy(alpha, d, p), None

    params, _ = lax.scan(step, params, None, length=num_steps)
    return params
