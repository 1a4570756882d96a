r"""alpha-CROWN: CROWN with the free lower-relaxation slopes optimised by projected Adam.

A crossing ReLU-like neuron ($l < 0 < u$) admits every lower line $\alpha z$ with
$\alpha \in [0, 1]$ (leaky ReLU: $[\text{slope}, 1]$; ``max``/``min`` with a constant,
``abs``: the slopes between the two pieces). Each choice gives a sound CROWN bound, so
the bound may be maximised over the slopes. The slopes are exposed by the CROWN engine's
hooks (:func:`~linjax.verify._crown.linear_parts` with ``alphas``).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linjax.verify import _graph
from linjax.verify import _linearize as lz
from linjax.verify._box import Box, check_box
from linjax.verify._crown import _INTERMEDIATE, _prepare, concretize, linear_parts, propagate


def _check_steps(steps: Any) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def _check_lr(lr: Any) -> Any:
    if isinstance(lr, jax.core.Tracer):
        return lr
    try:
        value = float(np.asarray(lr))
    except (TypeError, ValueError) as e:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}") from e
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    return value


def _ancestors(graph: _graph.Graph, producer: dict[int, int], var: int) -> set[int]:
    """Indices of the nodes a backward pass started at ``var`` can cross."""
    seen: set[int] = set()
    todo = [var]
    while todo:
        v = todo.pop()
        idx = producer.get(v)
        if idx is None or idx in seen:
            continue
        seen.add(idx)
        todo.extend(r for r in graph.nodes[idx].inputs if _graph.is_bounded(r))
    return seen


def _sites(graph: _graph.Graph, box: Box, intermediate: str, num_spec: int, splits=None):
    """Per (start, node) alpha: keys, CROWN initial values ``[rows, *shape]`` and ranges."""
    prop = propagate(graph, box, intermediate=intermediate, splits=splits)
    free = {
        i: lin.freedom
        for i, lin in enumerate(prop.lins)
        if isinstance(lin, lz.ElementwiseLin) and lin.freedom is not None
    }
    keys, inits, lows, highs = [], [], [], []
    if not free:
        return keys, inits, lows, highs
    starts = [(s, s, 2 * int(np.prod(graph.avals[s].shape, dtype=np.int64))) for s in prop.starts]
    starts.append(("output", graph.output, 2 * num_spec))
    for key, var, rows in starts:
        crossed = _ancestors(graph, prop.producer, var)
        for idx in sorted(crossed & free.keys()):
            fr = free[idx]
            shape = (rows,) + tuple(fr.init.shape)
            keys.append((key, idx))
            inits.append(jnp.broadcast_to(fr.init, shape))
            lows.append(jnp.broadcast_to(fr.slope_min, shape).astype(fr.init.dtype))
            highs.append(jnp.broadcast_to(fr.slope_max, shape).astype(fr.init.dtype))
    return keys, inits, lows, highs


def alpha_crown(
    fn: Callable[[jax.Array], jax.Array],
    box: Box,
    *,
    spec: jax.typing.ArrayLike | None = None,
    steps: int = 100,
    lr: float = 0.1,
    intermediate: str = "crown",
) -> Box:
    r"""Bounds on ``spec @ fn(x)`` over ``box`` by CROWN with optimised slopes (alpha-CROWN).

    CROWN (:func:`crown`) relaxes a crossing ReLU $y = \max(z, 0)$, $l < 0 < u$, by
    $\alpha z \le y \le \tfrac{u}{u - l}(z - l)$ and fixes $\alpha \in \{0, 1\}$
    heuristically. Every $\alpha \in [0, 1]$ is sound, so for each spec row $c_i$

    $$\underline{f}_i(\alpha) = \min_{x \in B}\, \Lambda_i(\alpha)\, x + \beta_i(\alpha)
    \;\le\; \min_{x \in B} c_i^\top f(x)$$

    and alpha-CROWN maximises $\underline{f}_i(\alpha)$ (and minimises the upper bound
    $\overline{f}_i(\alpha)$) by projected gradient ascent:

    $$\alpha \leftarrow \Pi_{[\alpha_{\min}, \alpha_{\max}]}\big(\alpha +
    \mathrm{Adam}(\nabla_\alpha \textstyle\sum_i \underline{f}_i -
    \overline{f}_i)\big).$$

    The slopes are separate per backward pass, per row and per neuron, as in auto_LiRPA:
    the final pass has one set for each lower and each upper bound of every spec row, and
    each intermediate pass (``intermediate="crown"``: the bounds $[l, u]$ of every
    pre-activation are CROWN bounds, which themselves depend on earlier slopes) has one set
    per lower/upper bound of each pre-activation neuron. Rows do not interact through the
    final slopes, so their optimisation is independent; the intermediate slopes are shared
    by all rows and optimised for the total width. Besides ReLU, the free slopes are those
    of leaky ReLU ($[\text{negative slope}, 1]$), ``max``/``min`` with a constant and
    ``abs`` (both pieces' slopes bound the range); other relaxations stay CROWN's.

    Slopes start at CROWN's choice and the best value of every bound element over all
    $\text{steps} + 1$ evaluations is kept, so the result is never looser than
    :func:`crown` (up to rounding), and it is sound whatever the optimiser does. For a
    network with one hidden ReLU layer the optimum equals the LP relaxation with the
    triangle relaxation (LP duality); deeper nets can be tighter than the layerwise LP
    because intermediate bounds are optimised too.

    The loop is a ``lax.scan``, so the function is traceable (``jit``) and batches over
    boxes with ``jax.vmap``. Cost: ``steps + 1`` CROWN passes with their gradient.

    Args:
        fn: a function from one array shaped like ``box.lower`` to one real floating array.
        box: input set, :class:`Box` with ``lower <= upper``.
        spec: ``[S, out]`` (or ``[S, *out_shape]``) specification matrix $C$; ``None``
            means the identity.
        steps: number of Adam steps (integer ``>= 1``).
        lr: Adam learning rate (``> 0``).
        intermediate: ``"crown"`` (default; intermediate bounds by CROWN with their own
            optimised slopes) or ``"ibp"`` (CROWN-IBP intermediate bounds; only the final
            pass's slopes are optimised).

    Returns:
        :class:`Box` with ``[S]`` arrays, or of ``fn``'s output shape without ``spec``.

    Raises:
        NotImplementedError: for a primitive with no rule (see :func:`register_rule`).
        ValueError: for a malformed box or spec, ``steps < 1`` or ``lr <= 0``.

    Examples:
        The toy network of auto_LiRPA (``examples/simple/toy.py``), where CROWN gives
        $[-3, 3]$ and alpha-CROWN $[-3, 2]$ (the true range is $[-2, 1]$):

        >>> import jax, jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> W1, W2 = jnp.array([[1.0, -1.0], [2.0, -1.0]]), jnp.array([[1.0, -1.0]])
        >>> net = lambda x: W2 @ jax.nn.relu(W1 @ x)
        >>> box = vf.Box(jnp.array([-1.0, -2.0]), jnp.array([2.0, 1.0]))
        >>> out = vf.alpha_crown(net, box, steps=50)
        >>> [round(float(v), 4) for v in (out.lower[0], out.upper[0])]
        [-3.0, 2.0]

    References:
        Xu et al. (2021), "Fast and complete: enabling complete neural network
        verification with rapid and massively parallel incomplete verifiers"
        (alpha-CROWN), https://arxiv.org/abs/2011.13824.
        Salman et al. (2019), "A convex relaxation barrier to tight robustness
        verification of neural networks", https://arxiv.org/abs/1902.08722.
    """
    steps = _check_steps(steps)
    lr = _check_lr(lr)
    box = check_box(box)
    if intermediate not in _INTERMEDIATE:
        raise ValueError(f"{intermediate=} must be one of {_INTERMEDIATE}")
    return _optimise(fn, box, spec, lr, steps=steps, intermediate=intermediate)


def _optimise(fn, box, spec, lr, *, steps, intermediate, splits=None):
    """The alpha-CROWN loop; ``splits`` restricts to a sub-domain (``_crown.propagate``)."""
    with jax.default_matmul_precision("highest"):
        box, graph, mat, out_shape = _prepare(fn, box, spec, intermediate)
        keys: list = []
        inits: list = []
        if _graph.is_bounded(graph.output):
            keys, inits, lows, highs = _sites(graph, box, intermediate, mat.shape[0], splits)

        def bounds(alist):
            alphas = dict(zip(keys, alist, strict=True)) if keys else None
            _, (lA, lb, uA, ub), _ = linear_parts(fn, box, spec, intermediate, alphas, splits)
            return concretize(lA, lb, box), -concretize(-uA, -ub, box)

        if not keys:
            low, high = bounds([])
        else:
            opt = optax.adam(lr)

            def project(alist):
                return [jnp.clip(a, lo, hi) for a, lo, hi in zip(alist, lows, highs, strict=True)]

            def objective(alist):
                low, high = bounds(alist)
                # Non-finite bounds (an unbounded box) carry no useful gradient.
                width = jnp.where(jnp.isfinite(high - low), high - low, 0)
                return width.sum(), (low, high)

            grad = jax.value_and_grad(objective, has_aux=True)

            def keep(best, new):
                bl, bu = best
                low, high = new
                return jnp.where(low > bl, low, bl), jnp.where(high < bu, high, bu)

            def step(carry, _):
                alist, state, best = carry
                (_, new), g = grad(alist)
                g = [jnp.where(jnp.isfinite(gi), gi, 0) for gi in g]
                upd, state = opt.update(g, state, alist)
                alist = project(optax.apply_updates(alist, upd))
                return (alist, state, keep(best, new)), None

            s = mat.shape[0]
            dtype = mat.dtype
            best0 = (jnp.full((s,), -jnp.inf, dtype), jnp.full((s,), jnp.inf, dtype))
            carry = (list(inits), opt.init(list(inits)), best0)
            (alist, _, best), _ = jax.lax.scan(step, carry, None, length=steps)
            low, high = keep(best, bounds(alist))
    if spec is None:
        low, high = low.reshape(out_shape), high.reshape(out_shape)
    return Box(low, high)
