"""The ``lintools`` section of ``linjax tour``: the spectrum of a digits MLP Hessian.

Trains a small MLP on scikit-learn's digits for a few Adam steps, then looks at the Hessian
of its training loss through matrix-free tools only (Lanczos Ritz values, ``eigsh``, SLQ,
Hutchinson, CG) and checks each against the dense Hessian, which is small enough to build.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from linjax import _tree, data, testing
from linjax import lintools as lt
from linjax._tour import TourContext, section


def digits_mlp(hidden: int, *, steps: int, key: jax.Array):
    """Train a one-hidden-layer tanh MLP on digits; returns ``(loss_fn, params, batch)``.

    ``loss_fn(params, x, y)`` is the mean softmax cross-entropy; float64 when x64 is on.
    """
    digits = data.load_digits()
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64)
    x, y = digits.x_train.astype(dtype), digits.y_train
    k1, k2 = jax.random.split(key)
    params = {
        "w1": jax.random.normal(k1, (64, hidden), dtype) / 8.0,
        "b1": jnp.zeros(hidden, dtype),
        "w2": jax.random.normal(k2, (hidden, 10), dtype) / jnp.sqrt(hidden),
        "b2": jnp.zeros(10, dtype),
    }

    def loss_fn(p, x, y):
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    opt = optax.adam(1e-2)

    @jax.jit
    def train(params):
        def step(carry, _):
            p, s = carry
            g = jax.grad(loss_fn)(p, x, y)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(step, (params, opt.init(params)), length=steps)[0][0]

    return loss_fn, train(params), (x, y)


def hessian_matvec(loss_fn):
    """``matvec(v, params, x, y)``: forward-over-reverse Hessian-vector product."""

    def matvec(v, params, x, y):
        return jax.jvp(lambda p: jax.grad(loss_fn)(p, x, y), (params,), (v,))[1]

    return matvec


def ritz_history(alphas: np.ndarray, betas: np.ndarray) -> list[np.ndarray]:
    """Ritz values after each Lanczos step ``j``: eigenvalues of the leading ``j x j`` block."""
    T = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    return [np.linalg.eigvalsh(T[:j, :j]) for j in range(1, len(alphas) + 1)]


@section("lintools", title="Matrix-free linear algebra: the spectrum of a digits MLP", order=10)
def run(ctx: TourContext) -> None:
    """Lanczos, eigsh, SLQ, Hutchinson and CG on a real Hessian, checked densely."""
    # float64 so the comparison with the dense eigensolver is about the method, not rounding.
    with jax.enable_x64(True):
        _run(ctx)


def _run(ctx: TourContext) -> None:
    import matplotlib.pyplot as plt

    hidden, steps = (16, 100) if ctx.quick else (32, 300)
    num_lanczos = 40 if ctx.quick else 80
    key = jax.random.key(0)

    ctx.progress(f"training a 64-{hidden}-10 tanh MLP on digits for {steps} Adam steps")
    loss_fn, params, (x, y) = digits_mlp(hidden, steps=steps, key=key)
    matvec = hessian_matvec(loss_fn)
    dim = _tree.tree_size(params)

    ctx.progress(f"dense Hessian ({dim} x {dim}) for reference")
    H = np.asarray(jax.jit(lambda p: testing.materialize(matvec, p, p, x, y))(params))
    H = 0.5 * (H + H.T)
    dense_eigs = np.linalg.eigvalsh(H)

    ctx.progress(f"Lanczos, {num_lanczos} steps")
    v0 = _tree.tree_random_like(jax.random.key(1), params)
    t0 = time.perf_counter()
    res = jax.jit(lambda v, p: lt.lanczos(matvec, v, num_lanczos, p, x, y))(v0, params)
    jax.block_until_ready(res)
    history = ritz_history(np.asarray(res.alphas), np.asarray(res.betas))

    top = lambda k: jax.jit(
        lambda p: lt.eigsh(matvec, p, k, p, x, y, key=jax.random.key(2), num_steps=num_lanczos)
    )(params)
    vals, _ = top(5)
    top_err = np.max(np.abs(np.asarray(vals) - dense_eigs[::-1][:5]) / np.abs(dense_eigs[::-1][:5]))
    lanczos_s = time.perf_counter() - t0

    ctx.progress("stochastic Lanczos quadrature and Hutchinson")
    num_probes = 8 if ctx.quick else 32
    quad = jax.jit(
        lambda p: lt.slq(
            matvec, p, p, x, y, key=jax.random.key(3), num_probes=num_probes, num_steps=40
        )
    )(params)
    slq_trace = float(lt.trace_f(quad, lambda t: t, dim))
    hutch = float(
        jax.jit(
            lambda p: lt.hutchinson_trace(
                matvec, p, p, x, y, key=jax.random.key(4), num_probes=4 * num_probes
            )
        )(params)
    )
    exact_trace = float(np.trace(H))

    ctx.progress("CG on the Hessian, undamped (indefinite) and damped")
    g = jax.grad(loss_fn)(params, x, y)
    solve = jax.jit(
        lambda p, g, lam: lt.cg(lt.damped(matvec, lam), g, p, x, y, rtol=1e-8, max_steps=dim)
    )
    # The trained net's Hessian has negative eigenvalues: plain CG must notice and stop.
    undamped = solve(params, g, 0.0)
    # Damping past |lambda_min| makes the system SPD; CG then converges to the Newton step.
    damping = abs(float(dense_eigs[0])) + 1e-2 * float(dense_eigs[-1])
    sol = solve(params, g, damping)
    ref = np.linalg.solve(H + damping * np.eye(dim), np.asarray(_tree.ravel(g)[0]))
    cg_err = float(np.linalg.norm(_tree.ravel(sol.x)[0] - ref) / np.linalg.norm(ref))

    # Figure 1: Ritz values converging to the extreme eigenvalues.
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for j, ritz in enumerate(history, start=1):
        ax.scatter(np.full(len(ritz), j), ritz, s=4, color="tab:blue", alpha=0.6)
    for lam in np.concatenate([dense_eigs[-8:], dense_eigs[:3]]):
        ax.axhline(lam, color="tab:red", lw=0.6, alpha=0.7)
    ax.set_xlabel("Lanczos step")
    ax.set_ylabel("Ritz values")
    ax.set_title(f"Ritz values (dots) vs dense eigenvalues (lines), d = {dim}")
    ctx.savefig(fig, "lintools_ritz.png")

    # Figure 2: SLQ spectral density vs the dense eigenvalue histogram.
    lo, hi = dense_eigs[0], dense_eigs[-1]
    pad = 0.05 * (hi - lo)
    grid = jnp.linspace(lo - pad, hi + pad, 2000)
    sigma = 0.01 * (hi - lo)
    density = np.asarray(lt.spectral_density(quad, grid, sigma))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(dense_eigs, bins=200, density=True, color="tab:gray", alpha=0.5, label="dense eigh")
    ax.plot(grid, density, color="tab:blue", label=f"SLQ ({num_probes} probes, 40 steps)")
    ax.set_yscale("log")
    ax.set_ylim(1e-4 / (hi - lo), None)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.legend()
    ax.set_title("Hessian spectral density")
    ctx.savefig(fig, "lintools_density.png")

    ctx.headline("parameters (Hessian dimension)", dim)
    ctx.headline("top-5 eigsh max relative error", top_err, fmt=".1e")
    ctx.headline("lambda_max (eigsh / dense)", f"{float(vals[0]):.5g} / {dense_eigs[-1]:.5g}")
    ctx.headline(
        "trace: SLQ / Hutchinson / exact", f"{slq_trace:.4g} / {hutch:.4g} / {exact_trace:.4g}"
    )
    ctx.headline(
        "CG on undamped H: steps, converged",
        f"{int(undamped.num_steps)}, {bool(undamped.converged)} (negative curvature met)",
    )
    ctx.headline(
        "CG on H + damping I: steps, converged", f"{int(sol.num_steps)}, {bool(sol.converged)}"
    )
    ctx.headline("CG damped-Newton solve relative error", cg_err, fmt=".1e")
    ctx.markdown(
        f"Lanczos ({num_lanczos} matvecs, full reorthogonalisation) recovers the top of the "
        f"spectrum of a {dim}-parameter Hessian without forming it; the dense eigenvalues are "
        f"only computed to check. Lanczos+eigsh took {lanczos_s:.2f} s including compilation. "
        f"The smallest eigenvalue is {dense_eigs[0]:.3g}: the loss is not convex here, which is "
        f"why plain CG stops with converged=False until the damping exceeds |lambda_min|."
    )
