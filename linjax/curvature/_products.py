r"""Curvature-vector products: Hessian, generalised Gauss-Newton, Fisher; per-example gradients.

Conventions shared by every function in :mod:`linjax.curvature`:

* A model is ``apply_fn(params, inputs) -> outputs`` and a loss is
  ``loss_fn(outputs, targets) -> scalar``; a batch is the pair ``(inputs, targets)``, pytrees
  whose leaves carry the examples on their leading axis (``n`` examples).
* The recognised losses of this module (:func:`softmax_cross_entropy`, :func:`squared_error`,
  :func:`sigmoid_binary_cross_entropy`) are **means over the examples of a per-example
  negative log-likelihood**, summed within an example:
  $L = \frac1n \sum_i \ell_i$, $\ell_i = -\log p(y_i \mid f(x_i))$. The output Hessian is then
  $\nabla_z^2 L = \frac1n \operatorname{blockdiag}_i \nabla_{z_i}^2 \ell_i$, every curvature
  is $\frac1n$ times a sum over examples, and the empirical and true Fisher are
  $\frac1n \sum_i$ of per-example outer products, so that GGN, Fisher and Hessian all
  describe the same objective $L$ at the same scale.
* Passing one of those functions (the objects themselves) as the loss selects its closed-form
  output Hessian and, for :func:`fisher`, its likelihood. Any other ``loss_fn`` works too:
  :func:`ggn` then differentiates it twice with respect to the outputs (exact, whatever its
  reduction), and the empirical :func:`fisher` and :func:`per_example_grads` take example
  ``i``'s loss to be ``loss_fn`` evaluated on the batch of one ``(x_i, y_i)`` (leading axis of
  size 1 kept), which is $\ell_i$ for a mean-reduced loss.
* Products are returned as ``matvec(v) -> pytree`` on vectors shaped like ``params``. The
  network is linearised once when the product is built (``jax.linearize``), so each matvec
  pays only the tangent and cotangent passes; build the product inside the same ``jit`` as
  the solver or estimator that uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.random as jr

from linjax import _tree

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

_KINDS = ("empirical", "true")


# ---------------------------------------------------------------------------------------------
# Recognised losses
# ---------------------------------------------------------------------------------------------


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Softmax cross-entropy, mean over examples, summed over positions within an example.

    $L = \frac1n \sum_i \sum_t -\sum_c y_{itc} \log \operatorname{softmax}(z_{it})_c$, with
    $t$ running over any axes between the batch axis and the class axis (tokens, pixels).
    Its output Hessian is $\frac1n(\operatorname{diag}(p) - p p^\top)$ per position, with
    $p = \operatorname{softmax}(z)$, which :func:`ggn` and :func:`fisher` use in closed form.

    Args:
        logits: ``[n, ..., C]`` floating.
        labels: integer class indices ``[n, ...]`` (``logits.shape[:-1]``), or floating class
            probabilities shaped like ``logits``. Integer labels outside ``[0, C)`` give NaN.

    Returns:
        Scalar loss in the dtype of ``logits``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> cv.softmax_cross_entropy(jnp.zeros((4, 2)), jnp.array([0, 1, 1, 0]))
        Array(0.6931472, dtype=float32)
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 2:
        raise ValueError(f"logits must be [n, ..., C] with a batch axis, got shape {logits.shape}")
    logp = jax.nn.log_softmax(logits, axis=-1)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"integer labels must have shape logits.shape[:-1]={logits.shape[:-1]}, "
                f"got {labels.shape}"
            )
        nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    else:
        if labels.shape != logits.shape:
            raise ValueError(
                f"probability labels must have the shape of logits {logits.shape}, "
                f"got {labels.shape}"
            )
        nll = -jnp.sum(labels.astype(logp.dtype) * logp, axis=-1)
    return jnp.sum(nll) / logits.shape[0]


def squared_error(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    r"""Half squared error, mean over examples, summed within an example.

    $L = \frac1n \sum_i \tfrac12 \|f_i - y_i\|^2$: the Gaussian negative log-likelihood with
    unit variance (up to a constant), so its output Hessian is $\frac1n I$ and the GGN of a
    linear model is its Hessian.

    Args:
        outputs: ``[n, ...]`` floating.
        targets: same shape as ``outputs``.

    Returns:
        Scalar loss in the dtype of ``outputs``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> cv.squared_error(jnp.ones((2, 3)), jnp.zeros((2, 3)))
        Array(1.5, dtype=float32)
    """
    outputs = jnp.asarray(outputs)
    targets = jnp.asarray(targets)
    if outputs.ndim < 1:
        raise ValueError(f"outputs must have a leading batch axis, got shape {outputs.shape}")
    if targets.shape != outputs.shape:
        raise ValueError(f"targets shape {targets.shape} must equal outputs shape {outputs.shape}")
    diff = outputs - targets.astype(outputs.dtype)
    return 0.5 * jnp.sum(diff**2) / outputs.shape[0]


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Sigmoid binary cross-entropy, mean over examples, summed within an example.

    $L = \frac1n \sum_i \sum_t \operatorname{softplus}(z_{it}) - y_{it} z_{it}$ (Bernoulli
    likelihood with $p = \sigma(z)$); its output Hessian is $\frac1n\,p(1-p)$ elementwise.

    Args:
        logits: ``[n, ...]`` floating.
        labels: same shape, values in ``[0, 1]`` (integers 0/1 are accepted).

    Returns:
        Scalar loss in the dtype of ``logits``.
    """
    logits = jnp.asarray(logits)
    labels = jnp.asarray(labels)
    if logits.ndim < 1:
        raise ValueError(f"logits must have a leading batch axis, got shape {logits.shape}")
    if labels.shape != logits.shape:
        raise ValueError(f"labels shape {labels.shape} must equal logits shape {logits.shape}")
    nll = jax.nn.softplus(logits) - labels.astype(logits.dtype) * logits
    return jnp.sum(nll) / logits.shape[0]


class _Likelihood(NamedTuple):
    # hessian(outputs, targets) -> (u -> H_L u): the output Hessian of the batch loss
    #   (including the 1/n of the mean), set up once per linearisation point.
    # residuals(key, outputs, num_samples): [S, *outputs.shape] gradients of the per-example
    #   NLL w.r.t. the outputs at labels sampled from the model, E[r r^T] = per-example Hessian.
    hessian: Callable[[jax.Array, Any], Callable[[jax.Array], jax.Array]]
    residuals: Callable[[jax.Array, jax.Array, int], jax.Array]


def _ce_hessian(logits, labels):
    del labels  # the softmax Hessian does not depend on the targets
    # d softmax(z) = (diag(p) - p p^T) dz is exactly the cross-entropy Hessian; its linearised
    # JVP fuses better in XLA than the explicit p * u - p (p^T u) (measured ~10% on CPU).
    _, jvp = jax.linearize(partial(jax.nn.softmax, axis=-1), logits)
    scale = jnp.asarray(1 / logits.shape[0], logits.dtype)
    return lambda u: scale * jvp(u)


def _ce_residuals(key, logits, num_samples):
    p = jax.nn.softmax(logits, axis=-1)
    y = jr.categorical(key, logits, axis=-1, shape=(num_samples, *logits.shape[:-1]))
    return p - jax.nn.one_hot(y, logits.shape[-1], dtype=p.dtype)


def _se_hessian(outputs, targets):
    del targets
    scale = jnp.asarray(1 / outputs.shape[0], outputs.dtype)
    return lambda u: scale * u


def _se_residuals(key, outputs, num_samples):
    # y ~ N(f, I), so the NLL gradient f - y is minus a standard normal draw.
    return -jr.normal(key, (num_samples, *outputs.shape), outputs.dtype)


def _bce_hessian(logits, labels):
    del labels
    p = jax.nn.sigmoid(logits)
    h = p * (1 - p) / logits.shape[0]
    return lambda u: h * u


def _bce_residuals(key, logits, num_samples):
    p = jax.nn.sigmoid(logits)
    y = jr.bernoulli(key, p, (num_samples, *logits.shape))
    return p - y.astype(p.dtype)


_LIKELIHOODS = (
    (softmax_cross_entropy, _Likelihood(_ce_hessian, _ce_residuals)),
    (squared_error, _Likelihood(_se_hessian, _se_residuals)),
    (sigmoid_binary_cross_entropy, _Likelihood(_bce_hessian, _bce_residuals)),
)


def _likelihood(loss_fn: Any) -> _Likelihood | None:
    # Identity, not equality or hashing: a loss_fn may be an unhashable callable pytree.
    return next((lik for fn, lik in _LIKELIHOODS if fn is loss_fn), None)


# ---------------------------------------------------------------------------------------------
# Shared plumbing
# ---------------------------------------------------------------------------------------------


def _check_callable(fn: Any, name: str, signature: str) -> None:
    if not callable(fn):
        raise TypeError(f"{name} must be a function {signature}, got {type(fn).__name__}")


def split_batch(batch: Any, name: str = "batch") -> tuple[Any, Any]:
    """``(inputs, targets)`` from ``batch``, with a clear error for anything else."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            f"{name} must be a pair (inputs, targets), got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    return batch[0], batch[1]


def batch_size(tree: Any, name: str) -> int:
    """The common leading-axis size of every leaf of ``tree`` (static)."""
    leaves = jax.tree.leaves(tree)
    if not leaves:
        raise ValueError(f"{name} is an empty pytree; expected arrays with a leading batch axis")
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = [jnp.shape(leaf) for leaf in leaves]
        raise ValueError(f"{name} leaves must share a leading batch axis, got shapes {shapes}")
    return int(sizes.pop())


def _as_operator(linear_fn: MatVec, params: PyTree) -> MatVec:
    """Wrap a linear map on params-shaped trees: structure check, dtypes follow ``v``."""

    def matvec(v):
        _tree.check_same_structure(v, params, "v", "params", check_dtypes=False)
        v_in = jax.tree.map(lambda a, p: jnp.asarray(a, p.dtype), v, params)
        return jax.tree.map(lambda o, a: o.astype(jnp.result_type(a)), linear_fn(v_in), v)

    return matvec


def _linearize(apply_fn: Callable, params: PyTree, inputs: Any):
    """``(outputs, J, J^T)``: one forward pass, then linear maps reusing its residuals."""
    outputs, jvp_fn = jax.linearize(lambda p: apply_fn(p, inputs), params)
    transpose = jax.linear_transpose(jvp_fn, params)
    return outputs, jvp_fn, lambda u: transpose(u)[0]


def _check_loss(loss_fn: Callable, outputs: Any, targets: Any) -> None:
    out = jax.eval_shape(loss_fn, outputs, targets)
    if not hasattr(out, "shape") or out.shape != ():
        raise TypeError(
            f"loss_fn(outputs, targets) must return a scalar, got {getattr(out, 'shape', out)}"
        )


def _output_hessian_vp(loss_fn: Callable, outputs: Any, targets: Any) -> MatVec:
    lik = _likelihood(loss_fn)
    if lik is not None:
        return lik.hessian(outputs, targets)
    # Generic fallback: forward-over-reverse on the loss alone (cheap next to the network).
    _, hess = jax.linearize(jax.grad(lambda z: loss_fn(z, targets)), outputs)
    return hess


class GGNParts(NamedTuple):
    """A linearised model and loss at ``params``: what GGN products and GN steps need."""

    outputs: Any
    jvp: MatVec  # v -> J v
    vjp: MatVec  # u -> J^T u
    loss_hvp: MatVec  # u -> H_L u  (output-space Hessian of the loss)
    targets: Any


def ggn_parts(apply_fn: Callable, loss_fn: Callable, params: PyTree, batch: Any) -> GGNParts:
    """Validate and linearise once; shared by :func:`ggn` and the Gauss-Newton solvers."""
    _check_callable(apply_fn, "apply_fn", "apply_fn(params, inputs) -> outputs")
    _check_callable(loss_fn, "loss_fn", "loss_fn(outputs, targets) -> scalar")
    _tree.check_floating(params, "params")
    inputs, targets = split_batch(batch)
    outputs, jvp_fn, vjp_fn = _linearize(apply_fn, params, inputs)
    _check_loss(loss_fn, outputs, targets)
    return GGNParts(outputs, jvp_fn, vjp_fn, _output_hessian_vp(loss_fn, outputs, targets), targets)


# ---------------------------------------------------------------------------------------------
# Public products
# ---------------------------------------------------------------------------------------------


def hvp(loss_fn: Callable[..., jax.Array], params: PyTree, *args: Any) -> MatVec:
    r"""Hessian-vector products $v \mapsto \nabla^2_\theta L(\theta)\, v$ of ``loss_fn``.

    Forward-over-reverse: the gradient map $\theta \mapsto \nabla L(\theta)$ is linearised
    once at ``params`` (``jax.linearize(jax.grad(loss_fn))``), and each matvec evaluates that
    linearisation, a JVP through the backward pass, at about the cost of one more gradient.
    Building the product costs one gradient; the matvecs then share its residuals (kept in
    memory), which is what Lanczos, CG and Hutchinson want.

    Args:
        loss_fn: ``loss_fn(params, *args) -> scalar``.
        params: the point $\theta$, a pytree of floating arrays.
        *args: further arguments of ``loss_fn`` (a batch), held fixed.

    Returns:
        ``matvec(v)`` for ``v`` shaped like ``params``; the result has ``v``'s structure and
        dtypes. Symmetric, possibly indefinite.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> loss = lambda p, a: 0.5 * jnp.sum(a * p["w"] ** 2)
        >>> mv = cv.hvp(loss, {"w": jnp.ones(3)}, jnp.array([1.0, 2.0, 3.0]))
        >>> mv({"w": jnp.ones(3)})["w"]
        Array([1., 2., 3.], dtype=float32)

    References:
        Pearlmutter (1994), "Fast exact multiplication by the Hessian", Neural Computation 6.
    """
    _check_callable(loss_fn, "loss_fn", "loss_fn(params, *args) -> scalar")
    _tree.check_floating(params, "params")
    _, hess = jax.linearize(lambda p: jax.grad(loss_fn)(p, *args), params)
    return _as_operator(hess, params)


def ggn(apply_fn: Callable, loss_fn: Callable, params: PyTree, batch: Any) -> MatVec:
    r"""Generalised Gauss-Newton products $v \mapsto J^\top H_L J v$.

    $J = \partial f(\theta, x) / \partial\theta$ is the Jacobian of the outputs on the whole
    batch and $H_L = \nabla_z^2 L(z, y)$ the Hessian of the loss in output space. The GGN
    drops the term $\sum_k (\partial L/\partial z_k) \nabla^2_\theta z_k$ from the Hessian, so
    it is positive semi-definite whenever the loss is convex in the outputs, and equals the
    Hessian for a linear model. The model is linearised once (``jax.linearize``); each matvec
    is one JVP, the output-space product, and one transposed JVP
    (``jax.linear_transpose``), with no second forward pass.

    $H_L u$ is closed form for :func:`softmax_cross_entropy`
    ($\frac1n(p \odot u - p\,p^\top u)$, the JVP of the softmax), :func:`squared_error`
    ($\frac1n u$) and :func:`sigmoid_binary_cross_entropy` ($\frac1n p(1-p) u$), recognised
    by identity; any other ``loss_fn`` gets its exact output Hessian by forward-over-reverse
    autodiff.

    Args:
        apply_fn: ``apply_fn(params, inputs) -> outputs``.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        params: the point $\theta$, a pytree of floating arrays.
        batch: ``(inputs, targets)``.

    Returns:
        ``matvec(v)`` for ``v`` shaped like ``params``.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> apply = lambda p, x: x @ p["w"]
        >>> x, y = jnp.eye(3), jnp.array([0, 1, 2])
        >>> mv = cv.ggn(apply, cv.softmax_cross_entropy, {"w": jnp.zeros((3, 3))}, (x, y))
        >>> mv({"w": jnp.eye(3)})["w"].shape
        (3, 3)

    References:
        Schraudolph (2002), "Fast curvature matrix-vector products for second-order gradient
        descent", Neural Computation 14. Martens (2020), "New insights and perspectives on the
        natural gradient method", JMLR 21.
    """
    parts = ggn_parts(apply_fn, loss_fn, params, batch)
    return _as_operator(lambda v: parts.vjp(parts.loss_hvp(parts.jvp(v))), params)


def fisher(
    apply_fn: Callable,
    params: PyTree,
    batch: Any,
    *,
    kind: str = "empirical",
    key: jax.Array | None = None,
    loss: Callable = softmax_cross_entropy,
    num_samples: int = 1,
) -> MatVec:
    r"""Fisher-vector products, empirical, exact or Monte-Carlo.

    With per-example output gradients $r_i = \nabla_{z_i} \ell_i$ and $J_i$ the Jacobian of
    example $i$'s outputs, every kind is $J^\top M J$ with $M$ block diagonal over examples:

    * ``kind="empirical"``: $F = \frac1n \sum_i g_i g_i^\top$ with $g_i = J_i^\top r_i$ the
      gradient of example $i$'s loss at its *observed* target. Any ``loss`` works.
    * ``kind="true"``, ``key=None``: the exact expectation
      $F = \frac1n \sum_i J_i^\top \mathbb E_{\hat y \sim p(\cdot\mid z_i)}[r r^\top] J_i$,
      which for the recognised likelihoods is the GGN of ``loss`` (computed in closed form).
    * ``kind="true"`` with a ``key``: the Monte-Carlo estimate with ``num_samples`` labels
      $\hat y_{is} \sim p(\cdot \mid z_i)$ per example,
      $\frac{1}{nS} \sum_{i,s} \hat g_{is} \hat g_{is}^\top$ (unbiased for the exact one).

    All kinds are matrix-free: the model is linearised once and a matvec is
    $v \mapsto \frac1n J^\top (r \odot \langle r, J v\rangle)$, one JVP and one transposed
    JVP; per-example gradients $g_i$ are never stored.

    Args:
        apply_fn: ``apply_fn(params, inputs) -> outputs``.
        params: the point $\theta$, a pytree of floating arrays.
        batch: ``(inputs, targets)``; targets are only read by ``kind="empirical"``.
        kind: ``"empirical"`` or ``"true"``.
        key: PRNG key; ``None`` for the exact true Fisher, a key for Monte Carlo. Only with
            ``kind="true"``.
        loss: the loss defining the likelihood. ``kind="true"`` needs one of
            :func:`softmax_cross_entropy` (default), :func:`squared_error`,
            :func:`sigmoid_binary_cross_entropy`.
        num_samples: Monte-Carlo labels per example ($S \ge 1$); only with a ``key``.

    Returns:
        ``matvec(v)`` for ``v`` shaped like ``params``, symmetric positive semi-definite.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> apply = lambda p, x: x @ p
        >>> x, y = jnp.eye(3), jnp.array([0, 1, 2])
        >>> mv = cv.fisher(apply, jnp.zeros((3, 3)), (x, y), kind="true",
        ...                key=jax.random.key(0), num_samples=8)
        >>> mv(jnp.eye(3)).shape
        (3, 3)

    References:
        Martens (2020), "New insights and perspectives on the natural gradient method", JMLR
        21. Kunstner, Balles, Hennig (2019), "Limitations of the empirical Fisher
        approximation for natural gradient descent", NeurIPS.
    """
    if kind not in _KINDS:
        raise ValueError(f"{kind=} must be one of {_KINDS}")
    _check_callable(loss, "loss", "loss(outputs, targets) -> scalar")
    lik = _likelihood(loss)
    if kind == "empirical" and key is not None:
        raise ValueError("key is only used by kind='true' (Monte-Carlo); pass key=None")
    if kind == "true" and lik is None:
        raise ValueError(
            f"kind='true' needs a likelihood to sample from or take expectations under: {loss=} "
            "must be one of softmax_cross_entropy, squared_error, sigmoid_binary_cross_entropy"
        )
    num_samples = _tree.check_positive_int(num_samples, "num_samples")
    if num_samples != 1 and (kind != "true" or key is None):
        raise ValueError(f"{num_samples=} is only used by kind='true' with a key (Monte Carlo)")

    parts = ggn_parts(apply_fn, loss, params, batch)
    if kind == "true" and key is None:
        return _as_operator(lambda v: parts.vjp(parts.loss_hvp(parts.jvp(v))), params)

    outputs, targets = parts.outputs, parts.targets
    n = batch_size(outputs, "apply_fn(params, inputs)")
    if kind == "empirical":
        # r_i = d loss(z_i, y_i) / d z_i on a batch of one; a leading sample axis of size 1.
        r = jax.tree.map(lambda a: a[None], _per_example_output_grads(loss, outputs, targets))
    else:
        r = lik.residuals(key, outputs, num_samples)
    scale = 1.0 / (n * num_samples)

    def linear(v):
        jv = parts.jvp(v)
        # c[s, i] = <r_si, (J v)_i>, summed over every non-batch axis of every output leaf.
        c = sum(
            jnp.sum((a * b[None]).reshape(a.shape[0], n, -1), axis=-1)
            for a, b in zip(jax.tree.leaves(r), jax.tree.leaves(jv), strict=True)
        )
        w = jax.tree.map(lambda a: scale * jnp.einsum("sn,sn...->n...", c.astype(a.dtype), a), r)
        return parts.vjp(w)

    return _as_operator(linear, params)


def _per_example_output_grads(loss: Callable, outputs: Any, targets: Any) -> Any:
    batch_size(targets, "targets")

    def one(z, y):
        one_example = partial(jax.tree.map, lambda a: a[None])
        return jax.grad(lambda z: loss(one_example(z), one_example(y)))(z)

    return jax.vmap(one)(outputs, targets)


def per_example_grads(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree, batch: Any):
    r"""Gradients of each example's loss, stacked on a leading batch axis.

    $g_i = \nabla_\theta\, \mathrm{loss\_fn}(\theta, b_i)$, where $b_i$ is example $i$ of
    ``batch`` given as a batch of one (its leading axis kept with size 1), so the same
    ``loss_fn`` you train with works unchanged; for a mean-reduced loss
    $\frac1n \sum_i g_i = \nabla_\theta\, \mathrm{loss\_fn}(\theta, \text{batch})$. Computed as
    ``jax.vmap`` of ``jax.grad`` over examples: memory is ``n`` copies of ``params``.

    Args:
        loss_fn: ``loss_fn(params, batch) -> scalar``.
        params: pytree of floating arrays.
        batch: pytree whose leaves share a leading axis of ``n`` examples.

    Returns:
        A pytree like ``params`` whose leaves have a leading axis ``n``.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import curvature as cv
        >>> loss = lambda w, b: cv.squared_error(b[0] @ w, b[1])
        >>> x, y = jnp.eye(2), jnp.zeros((2, 1))
        >>> cv.per_example_grads(loss, jnp.ones((2, 1)), (x, y)).shape
        (2, 2, 1)

    References:
        Goodfellow (2015), "Efficient per-example gradient computations", arXiv:1510.01799.
    """
    _check_callable(loss_fn, "loss_fn", "loss_fn(params, batch) -> scalar")
    _tree.check_floating(params, "params")
    batch_size(batch, "batch")

    def one(example):
        return jax.grad(loss_fn)(params, jax.tree.map(lambda a: a[None], example))

    return jax.vmap(one)(batch)
