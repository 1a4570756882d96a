# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The Hessian spectrum of a digits classifier, matrix-free
#
# `linjax.lintools` works with linear operators given only as functions
# `matvec(v, *params)` on pytrees. Here the operator is the Hessian of the training loss of
# a small flax (nnx) MLP trained on scikit-learn's handwritten digits. It has a few thousand
# parameters, so we can also build it densely and check every matrix-free answer:
#
# 1. Lanczos / `eigsh` against `numpy.linalg.eigh` for the extreme eigenvalues;
# 2. stochastic Lanczos quadrature (SLQ) against the histogram of all eigenvalues;
# 3. Hutchinson's trace estimator against the exact trace, with its error bars.

# %%
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("linjax") is None:  # e.g. on Colab
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "-q",
         "linjax[examples] @ git+https://github.com/linjax/linjax"]
    )

# %%
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

from linjax import data, testing
from linjax import lintools as lt

jax.config.update("jax_enable_x64", True)
QUICK = os.environ.get("LINJAX_NOTEBOOK_QUICK") == "1"
HIDDEN, STEPS = (16, 150) if QUICK else (48, 600)

# %% [markdown]
# ## A small MLP on digits
#
# 8×8 grey-level images, 10 classes. We train for a few hundred Adam steps: long enough for
# the loss landscape to have structure (a few large outlier eigenvalues, a bulk near zero).

# %%
digits = data.load_digits()
x, y = digits.x_train.astype(jnp.float64), digits.y_train


class MLP(nnx.Module):
    def __init__(self, hidden: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, hidden, rngs=rngs, param_dtype=jnp.float64)
        self.l2 = nnx.Linear(hidden, 10, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


model = MLP(HIDDEN, rngs=nnx.Rngs(0))
graphdef, params = nnx.split(model, nnx.Param)


def loss_fn(params, x, y):
    logits = nnx.merge(graphdef, params)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


opt = optax.adam(1e-2)


@jax.jit
def train(params):
    def step(carry, _):
        p, s = carry
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), loss

    (p, _), losses = jax.lax.scan(step, (params, opt.init(params)), length=STEPS)
    return p, losses


params, losses = train(params)
accuracy = jnp.mean(
    jnp.argmax(nnx.merge(graphdef, params)(digits.x_test.astype(jnp.float64)), -1)
    == digits.y_test
)
dim = sum(p.size for p in jax.tree.leaves(params))
print(f"{dim} parameters, final loss {losses[-1]:.4f}, test accuracy {accuracy:.3f}")

# %% [markdown]
# ## The Hessian as an operator
#
# A Hessian-vector product is forward-mode differentiation of the gradient. The parameters,
# the data and the vector all stay pytrees (an `nnx.State`); nothing is flattened. The dense
# matrix is only for checking: `linjax.testing.materialize` applies the operator to every
# basis vector.


# %%
def hvp(v, params, x, y):
    return jax.jvp(lambda p: jax.grad(loss_fn)(p, x, y), (params,), (v,))[1]


H = np.asarray(jax.jit(lambda p: testing.materialize(hvp, p, p, x, y))(params))
H = 0.5 * (H + H.T)
dense_eigs = np.linalg.eigvalsh(H)
print(f"dense: lambda_max = {dense_eigs[-1]:.5f}, lambda_min = {dense_eigs[0]:.5f}")

# %% [markdown]
# ## Lanczos: Ritz values converge to the extreme eigenvalues
#
# After $j$ steps, the eigenvalues of the $j\times j$ tridiagonal $T_j$ (Ritz values)
# approximate the extreme eigenvalues first. With full reorthogonalisation the basis stays
# orthonormal, so no spurious copies appear.

# %%
num_steps = 40 if QUICK else 80
v0 = jax.tree.map(lambda p: jax.random.normal(jax.random.key(1), p.shape, p.dtype), params)
res = jax.jit(lambda v, p: lt.lanczos(hvp, v, num_steps, p, x, y))(v0, params)
T = np.asarray(lt.tridiagonal(res.alphas, res.betas))
basis = np.asarray(jax.vmap(lambda b: jax.flatten_util.ravel_pytree(b)[0])(res.basis))
print("max |Q Q^T - I| =", np.abs(basis @ basis.T - np.eye(num_steps)).max())

fig, ax = plt.subplots(figsize=(7, 4))
for j in range(1, num_steps + 1):
    ritz = np.linalg.eigvalsh(T[:j, :j])
    ax.scatter(np.full(j, j), ritz, s=4, color="tab:blue")
for lam in dense_eigs[-6:]:
    ax.axhline(lam, color="tab:red", lw=0.6)
ax.set(xlabel="Lanczos step", ylabel="Ritz values", title="Ritz values vs dense eigenvalues")
plt.show()

# %%
vals, vecs = jax.jit(
    lambda p: lt.eigsh(hvp, p, 5, p, x, y, key=jax.random.key(2), num_steps=num_steps)
)(params)
rel = np.abs(np.asarray(vals) - dense_eigs[::-1][:5]) / np.abs(dense_eigs[::-1][:5])
print("eigsh top-5:", np.asarray(vals))
print("dense top-5:", dense_eigs[::-1][:5])
print(f"max relative error {rel.max():.1e}")
assert rel.max() < 1e-6

# %% [markdown]
# The returned eigenvectors are pytrees shaped like the parameters: here, the direction of
# sharpest curvature, split by layer.

# %%
top = jax.tree.map(lambda v: v[0], vecs)
for path, leaf in jax.tree_util.tree_leaves_with_path(top):
    print(jax.tree_util.keystr(path), f"share of |v|^2: {float(jnp.sum(leaf**2)):.3f}")

# %% [markdown]
# ## Stochastic Lanczos quadrature: the whole spectrum from a few probes
#
# Each Rademacher probe $v$ gives a Gauss quadrature rule (nodes = Ritz values, weights =
# squared first components of $T$'s eigenvectors) for the spectral measure seen from $v$.
# Averaged over probes and smoothed with a Gaussian, this estimates the eigenvalue density.

# %%
num_probes = 8 if QUICK else 32
quad = jax.jit(
    lambda p: lt.slq(hvp, p, p, x, y, key=jax.random.key(3), num_probes=num_probes, num_steps=40)
)(params)
lo, hi = dense_eigs[0], dense_eigs[-1]
grid = jnp.linspace(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo), 2000)
density = lt.spectral_density(quad, grid, 0.01 * (hi - lo))
print("density integrates to", float(jnp.sum(density) * (grid[1] - grid[0])))

fig, ax = plt.subplots(figsize=(7, 4))
ax.hist(dense_eigs, bins=200, density=True, color="gray", alpha=0.5, label="dense eigh")
ax.plot(grid, density, label=f"SLQ, {num_probes} probes x 40 steps")
ax.set(yscale="log", ylim=(1e-4 / (hi - lo), None), xlabel="eigenvalue", ylabel="density")
ax.legend()
plt.show()

# %% [markdown]
# ## Hutchinson's trace estimator
#
# $\operatorname{tr} H \approx \frac1N\sum_i v_i^\top H v_i$ with Rademacher $v_i$. The
# error shrinks like $1/\sqrt N$, with variance $2(\|H\|_F^2 - \sum_i H_{ii}^2)$ per probe,
# which we can compute exactly here. SLQ with $f(t) = t$ gives the same kind of estimate.

# %%
exact = np.trace(H)
sigma1 = np.sqrt(2 * (np.sum(H**2) - np.sum(np.diag(H) ** 2)))
probes = [4, 16, 64] if QUICK else [4, 16, 64, 256, 1024]
estimates = [
    float(
        jax.jit(
            lambda p, n=n: lt.hutchinson_trace(
                hvp, p, p, x, y, key=jax.random.key(4), num_probes=n, batch_size=16
            )
        )(params)
    )
    for n in probes
]
for n, est in zip(probes, estimates, strict=True):
    print(f"N={n:5d}: {est:.4f}  (exact {exact:.4f}, 1-sigma {sigma1 / np.sqrt(n):.4f})")
print("SLQ trace:", float(lt.trace_f(quad, lambda t: t, dim)))

fig, ax = plt.subplots(figsize=(6, 4))
ax.errorbar(probes, estimates, yerr=sigma1 / np.sqrt(np.array(probes)), fmt="o", capsize=3)
ax.axhline(exact, color="tab:red", label="exact trace")
ax.set(xscale="log", xlabel="number of probes", ylabel="trace estimate")
ax.legend()
plt.show()
assert abs(estimates[-1] - exact) < 4 * sigma1 / np.sqrt(probes[-1])
