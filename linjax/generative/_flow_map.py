r"""Flow maps learned by self-distillation (Lagrangian, Eulerian, progressive) and their sampler.

A flow map $X_{s,t}$ jumps along the flow of the velocity $b$ from time $s$ to time $t$:
$X_{s,t}(x_s) = x_t$. It is parametrised as $X_{s,t}(x) = x + (t - s)\,v_{s,t}(x)$, so that its
diagonal $v_{t,t} = b_t$ is the velocity (trained by flow matching) and the off-diagonal part
is distilled from it by one of three self-consistency conditions. The teacher is the current
network under ``stop_gradient``, exactly where the reference code puts it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
from jax import lax

from linjax import _tree
from linjax.generative._velocity import (
    check_callable,
    check_output,
    check_pair_batch,
    lerp,
    one_sample,
    sq_norm,
    time_dtype,
    uniform_grid,
)

NetFn = Callable[[Any, jax.Array, jax.Array, Any], Any]
FlowMap = Callable[[Any, jax.Array, jax.Array, Any], Any]

_LAGRANGIAN_STOPGRADS = ("convex", "none")
_EULERIAN_STOPGRADS = ("full", "convex", "none")
_PROGRESSIVE_STOPGRADS = ("convex", "none")
_SPLITS = ("uniform", "midpoint")
_NET_SIGNATURE = "net_fn(params, s, t, x)"


def flow_map(net_fn: NetFn) -> FlowMap:
    r"""The flow map $X_{s,t}(x) = x + (t - s)\, v_{s,t}(x)$ of a network $v = $ ``net_fn``.

    The parametrisation makes $X_{s,s} = \mathrm{id}$ exact and $\partial_t X_{s,t}|_{t=s} =
    v_{s,s}$, so the network's diagonal $v_{t,t}(x)$ is the velocity $b_t(x)$ of the flow.

    Args:
        net_fn: ``net_fn(params, s, t, x) -> v`` with ``v`` structured, shaped and typed like
            ``x`` (a pytree of floating arrays); ``s`` and ``t`` are scalars.

    Returns:
        ``X(params, s, t, x) -> x_t``, a pure function (jit/vmap/grad/jvp safe).

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> X = gen.flow_map(lambda p, s, t, x: p * x)
        >>> X(2.0, 0.25, 0.75, jnp.ones(2))  # x + 0.5 * 2 x
        Array([2., 2.], dtype=float32)

    References:
        Boffi, Albergo, Vanden-Eijnden (2025), "How to build a consistency model: Learning
        flow maps via self-distillation", NeurIPS, https://arxiv.org/abs/2505.18825
    """
    check_callable(net_fn, "net_fn", _NET_SIGNATURE)

    def X(params, s, t, x):
        dt = jnp.asarray(t) - jnp.asarray(s)
        return _tree.tree_axpy(dt, net_fn(params, s, t, x), x)

    return X


def _sample_triangle(key: jax.Array, batch: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    # (s, t) uniform on the triangle 0 <= s <= t <= 1: the min and max of two uniforms.
    a, b = jr.uniform(key, (2, batch), dtype)
    return jnp.minimum(a, b), jnp.maximum(a, b)


def _prepare(net_fn, params, x0, x1, stopgrad, allowed, name):
    check_callable(net_fn, "net_fn", _NET_SIGNATURE)
    if stopgrad not in allowed:
        raise ValueError(f"{stopgrad=} must be one of {allowed} for {name}")
    batch = check_pair_batch(x0, x1)
    dtype = time_dtype(x0)
    like, scalar = one_sample(x0), jax.ShapeDtypeStruct((), dtype)
    check_output(net_fn, (params, scalar, scalar, like), like, _NET_SIGNATURE)
    return batch, dtype


def _scalar_jvp(fn: Callable[[jax.Array], Any], at: jax.Array) -> tuple[Any, Any]:
    """``(fn(at), d fn / d at)`` for a scalar ``at``, by one forward-mode product."""
    return jax.jvp(fn, (at,), (jnp.ones_like(at),))


def lagrangian_loss(
    net_fn: NetFn,
    params: Any,
    x0: Any,
    x1: Any,
    key: jax.Array,
    *,
    stopgrad: str = "convex",
) -> jax.Array:
    r"""Lagrangian self-distillation (LSD): the flow map must follow its own velocity.

    A flow map of $b$ satisfies $\partial_t X_{s,t}(x) = b_t(X_{s,t}(x))$. Per pair, with
    $(s, t)$ uniform on the triangle $0 \le s \le t \le 1$ (min and max of two uniforms) and
    $I_s = (1 - s)\,x_0 + s\,x_1$,

    $$L = \big\|\partial_t X_{s,t}(I_s)
        - \operatorname{sg}\big(v_{t,t}(\operatorname{sg}(X_{s,t}(I_s)))\big)\big\|^2 ,$$

    averaged over the batch ($\partial_t$ by ``jax.jvp`` in $t$). ``stopgrad="convex"`` (the
    reference default, written above) trains only the time derivative against a frozen
    teacher; ``"none"`` differentiates through the teacher term too.

    This is the off-diagonal term only: it vanishes for the exact flow map of *any* velocity,
    so train it together with the diagonal :func:`flow_matching_loss`, e.g. on 75 % / 25 % of
    the batch as the reference code does::

        velocity_fn = lambda p, t, x: net_fn(p, t, t, x)
        diag = gen.flow_matching_loss(velocity_fn, params, x0[:n], x1[:n], k1)
        lsd = gen.lagrangian_loss(net_fn, params, x0[n:], x1[n:], k2)
        loss = (n * diag + (B - n) * lsd) / B

    (The reference also weights each term by a learned $e^{-w(s,t)}(\cdot) + w(s,t)$; that
    weighting is left to the caller.)

    Args:
        net_fn: ``net_fn(params, s, t, x) -> v`` for **one** sample (scalar ``s``, ``t``; ``x``
            a pytree shaped like one sample); the loss ``vmap``s it over the batch.
        params: the differentiable parameters (any pytree).
        x0: base samples, a pytree whose leaves share a leading batch axis.
        x1: data samples, like ``x0``.
        key: PRNG key for the times.
        stopgrad: ``"convex"`` or ``"none"``.

    Returns:
        The scalar loss, in the samples' dtype.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> net_fn = lambda p, s, t, x: p * jnp.ones_like(x)  # constant velocity: exact map
        >>> x0, x1 = jnp.zeros((4, 2)), jnp.ones((4, 2))
        >>> float(gen.lagrangian_loss(net_fn, 1.0, x0, x1, jax.random.key(0)))
        0.0

    References:
        Boffi, Albergo, Vanden-Eijnden (2025), "How to build a consistency model: Learning
        flow maps via self-distillation", NeurIPS, https://arxiv.org/abs/2505.18825
    """
    batch, dtype = _prepare(
        net_fn, params, x0, x1, stopgrad, _LAGRANGIAN_STOPGRADS, "lagrangian_loss"
    )
    X = flow_map(net_fn)
    s, t = _sample_triangle(key, batch, dtype)

    def per_sample(s, t, a, b):
        x_s = lerp(s, a, b)
        x_t, dt_x = _scalar_jvp(lambda t_: X(params, s, t_, x_s), t)
        if stopgrad == "convex":
            target = lax.stop_gradient(net_fn(params, t, t, lax.stop_gradient(x_t)))
        else:
            target = net_fn(params, t, t, x_t)
        return sq_norm(_tree.tree_sub(dt_x, target))

    return jnp.mean(jax.vmap(per_sample)(s, t, x0, x1))


def eulerian_loss(
    net_fn: NetFn,
    params: Any,
    x0: Any,
    x1: Any,
    key: jax.Array,
    *,
    stopgrad: str = "full",
) -> jax.Array:
    r"""Eulerian self-distillation (ESD): the flow map must be transported by the velocity.

    A flow map of $b$ satisfies $\partial_s X_{s,t}(x) + \nabla_x X_{s,t}(x)\, b_s(x) = 0$.
    Per pair, with $(s, t)$ uniform on the triangle $0 \le s \le t \le 1$ and
    $I_s = (1 - s)\,x_0 + s\,x_1$,

    $$L = \big\|\partial_s X_{s,t}(I_s)
        + \operatorname{sg}\big(\nabla_x X_{s,t}(I_s)\, v_{s,s}(I_s)\big)\big\|^2 ,$$

    averaged over the batch; $\partial_s$ and the advective term are forward-mode products
    (``jax.jvp`` in $s$, and in $x$ with tangent $v_{s,s}(I_s)$). ``stopgrad="full"`` (the
    reference default, written above) stops the gradient through the whole advective term,
    so no gradient flows through the network's spatial Jacobian; ``"convex"`` stops it only
    through the velocity $v_{s,s}$ and keeps the Jacobian-vector product; ``"none"`` keeps
    everything. The paper reports ESD less stable than LSD on images.

    Like :func:`lagrangian_loss` this is the off-diagonal term only; add the diagonal
    :func:`flow_matching_loss` to train.

    Args:
        net_fn: ``net_fn(params, s, t, x) -> v`` for **one** sample.
        params: the differentiable parameters (any pytree).
        x0: base samples, a pytree whose leaves share a leading batch axis.
        x1: data samples, like ``x0``.
        key: PRNG key for the times.
        stopgrad: ``"full"``, ``"convex"`` or ``"none"``.

    Returns:
        The scalar loss, in the samples' dtype.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> net_fn = lambda p, s, t, x: p * jnp.ones_like(x)
        >>> x0, x1 = jnp.zeros((4, 2)), jnp.ones((4, 2))
        >>> float(gen.eulerian_loss(net_fn, 1.0, x0, x1, jax.random.key(0)))
        0.0

    References:
        Boffi, Albergo, Vanden-Eijnden (2025), "How to build a consistency model: Learning
        flow maps via self-distillation", NeurIPS, https://arxiv.org/abs/2505.18825
    """
    batch, dtype = _prepare(net_fn, params, x0, x1, stopgrad, _EULERIAN_STOPGRADS, "eulerian_loss")
    X = flow_map(net_fn)
    s, t = _sample_triangle(key, batch, dtype)

    def per_sample(s, t, a, b):
        x_s = lerp(s, a, b)
        _, ds_x = _scalar_jvp(lambda s_: X(params, s_, t, x_s), s)
        velocity = net_fn(params, s, s, x_s)
        if stopgrad != "none":
            velocity = lax.stop_gradient(velocity)
        _, advection = jax.jvp(lambda x: X(params, s, t, x), (x_s,), (velocity,))
        if stopgrad == "full":
            advection = lax.stop_gradient(advection)
        return sq_norm(_tree.tree_add(ds_x, advection))

    return jnp.mean(jax.vmap(per_sample)(s, t, x0, x1))


def progressive_loss(
    net_fn: NetFn,
    params: Any,
    x0: Any,
    x1: Any,
    key: jax.Array,
    *,
    split: str = "uniform",
    stopgrad: str = "convex",
) -> jax.Array:
    r"""Progressive self-distillation (PSD): one long jump must equal two shorter ones.

    A flow map satisfies the semigroup property $X_{s,t} = X_{u,t} \circ X_{s,u}$. With
    $u = \gamma s + (1 - \gamma) t$ (so $u - s = (1-\gamma)(t - s)$, $t - u = \gamma(t - s)$),
    this is, in terms of the network,

    $$L = \big\| v_{s,t}(I_s) - \operatorname{sg}\big((1 - \gamma)\, v_{s,u}(I_s)
        + \gamma\, v_{u,t}(X_{s,u}(I_s))\big)\big\|^2 ,$$

    averaged over the batch, with $(s, t)$ uniform on the triangle $0 \le s \le t \le 1$,
    $I_s = (1 - s)\,x_0 + s\,x_1$ and $\gamma \sim \mathcal U[0, 1]$ (``split="uniform"``) or
    $\gamma = \tfrac12$ (``split="midpoint"``). ``stopgrad="convex"`` (the reference default,
    written above) uses the two short jumps as a frozen teacher; ``"none"`` differentiates
    through them too.

    Like :func:`lagrangian_loss` this is the off-diagonal term only; add the diagonal
    :func:`flow_matching_loss` to train.

    Args:
        net_fn: ``net_fn(params, s, t, x) -> v`` for **one** sample.
        params: the differentiable parameters (any pytree).
        x0: base samples, a pytree whose leaves share a leading batch axis.
        x1: data samples, like ``x0``.
        key: PRNG key for the times (and $\gamma$).
        split: ``"uniform"`` or ``"midpoint"``: how the intermediate time ``u`` is drawn.
        stopgrad: ``"convex"`` or ``"none"``.

    Returns:
        The scalar loss, in the samples' dtype.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> net_fn = lambda p, s, t, x: p * jnp.ones_like(x)
        >>> x0, x1 = jnp.zeros((4, 2)), jnp.ones((4, 2))
        >>> float(gen.progressive_loss(net_fn, 1.0, x0, x1, jax.random.key(0)))
        0.0

    References:
        Boffi, Albergo, Vanden-Eijnden (2025), "How to build a consistency model: Learning
        flow maps via self-distillation", NeurIPS, https://arxiv.org/abs/2505.18825
    """
    if split not in _SPLITS:
        raise ValueError(f"{split=} must be one of {_SPLITS}")
    batch, dtype = _prepare(
        net_fn, params, x0, x1, stopgrad, _PROGRESSIVE_STOPGRADS, "progressive_loss"
    )
    k_times, k_gamma = jr.split(key)
    s, t = _sample_triangle(k_times, batch, dtype)
    if split == "uniform":
        gamma = jr.uniform(k_gamma, (batch,), dtype)
    else:
        gamma = jnp.full((batch,), 0.5, dtype)

    def per_sample(s, t, gamma, a, b):
        x_s = lerp(s, a, b)
        u = gamma * s + (1 - gamma) * t
        student = net_fn(params, s, t, x_s)
        v_su = net_fn(params, s, u, x_s)
        x_u = _tree.tree_axpy(u - s, v_su, x_s)
        v_ut = net_fn(params, u, t, x_u)
        teacher = _tree.tree_axpy(1 - gamma, v_su, _tree.tree_scale(gamma, v_ut))
        if stopgrad == "convex":
            teacher = lax.stop_gradient(teacher)
        return sq_norm(_tree.tree_sub(student, teacher))

    return jnp.mean(jax.vmap(per_sample)(s, t, gamma, x0, x1))


def sample_flow_map(X: FlowMap, params: Any, x0: Any, *, num_steps: int) -> Any:
    r"""Carry ``x0`` from $t = 0$ to $t = 1$ in ``num_steps`` jumps of a flow map.

    On the uniform grid $t_k = k/N$: $x_{k+1} = X_{t_k, t_{k+1}}(x_k)$, one network evaluation
    per step, in one ``lax.scan``. ``num_steps=1`` is one-step generation
    $X_{0,1}(x_0)$; more steps trade evaluations for accuracy when the map is imperfect (for
    the exact flow map every ``num_steps`` gives the same, exact, result).

    Args:
        X: ``X(params, s, t, x) -> x_t`` (e.g. from :func:`flow_map`), called with scalar times
            on ``x0`` as given; ``jax.vmap`` the sampler over a batch for a per-sample network.
        params: the network's parameters.
        x0: base sample(s) at $t = 0$, any pytree of floating arrays.
        num_steps: number of jumps ``N >= 1`` (static).

    Returns:
        $x$ at $t = 1$, a pytree like ``x0``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import generative as gen
        >>> X = gen.flow_map(lambda p, s, t, x: p * jnp.ones_like(x))
        >>> gen.sample_flow_map(X, 3.0, jnp.zeros(2), num_steps=4)
        Array([3., 3.], dtype=float32)

    References:
        Boffi, Albergo, Vanden-Eijnden (2025), "How to build a consistency model: Learning
        flow maps via self-distillation", NeurIPS, https://arxiv.org/abs/2505.18825
    """
    check_callable(X, "X", "X(params, s, t, x)")
    _tree.check_floating(x0, "x0")
    num_steps = _tree.check_positive_int(num_steps, "num_steps")
    dtype = time_dtype(x0)
    scalar = jax.ShapeDtypeStruct((), dtype)
    check_output(X, (params, scalar, scalar, x0), x0, "X(params, s, t, x)")
    grid = uniform_grid(num_steps, dtype)

    def step(x, ts):
        return X(params, ts[0], ts[1], x), None

    x, _ = lax.scan(step, x0, (grid[:-1], grid[1:]))
    return x
