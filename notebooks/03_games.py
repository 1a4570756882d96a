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
# # Games: Small-Gain Nash certificates with sound constants
#
# In a differentiable game, player $i$ moves $x_i$ to lower its own cost $f_i(x_i, x_{-i})$.
# Simultaneous gradient play follows the *pseudo-gradient*
# $F(x) = (\nabla_{x_1} f_1, \dots, \nabla_{x_N} f_N)$. It converges when $F$ is strongly
# monotone, but asymmetric couplings often break monotonicity in the Euclidean metric even
# though the dynamics converge. **Small-Gain Nash** (SGN) looks for a block-diagonal metric
# $M(w) = \mathrm{blkdiag}(w_i I)$ in which $F$ is strongly monotone, from per-player
# constants:
#
# * curvature $\mu_i \le \lambda_{\min}(\tfrac12(J_{ii} + J_{ii}^\top))$,
# * couplings $L_{ij} \ge \|J_{ij}\|_2$,
#
# where $J_{ij} = \partial F_i / \partial x_j$. The SGN margin
# $\alpha^*(w) = \lambda_{\min}(D - S(w))$, with $D = \mathrm{diag}(\mu)$ and
# $S_{ij} = \tfrac12(\sqrt{w_i/w_j}L_{ij} + \sqrt{w_j/w_i}L_{ji})$, is a strong-monotonicity
# modulus in $M(w)$: the flow contracts at rate $\alpha^*$ and projected Euler contracts for
# steps $h < 2\alpha^*/\beta^2$ ($\beta$ the Lipschitz constant in the metric).
#
# This notebook:
#
# 1. certifies the SGN authors' quadratic game, which is not Euclidean-monotone;
# 2. computes **sound** constants for a nonlinear game with tanh couplings over a box, by
#    bounding the Jacobian with bound propagation (`vf.game_constants`), and checks the
#    certified contraction by simulation (`vf.game_flow`);
# 3. certifies an entropy-regularised matrix game in the mirror (natural-gradient) geometry;
# 4. maximises the margin over weights for three players.

# %%
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("linjax") is None:  # e.g. on Colab
    subprocess.check_call(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "linjax[examples] @ git+https://github.com/linjax/linjax",
        ]
    )

# %%
import itertools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from linjax import verify as vf

jax.config.update("jax_enable_x64", True)
QUICK = os.environ.get("LINJAX_NOTEBOOK_QUICK") == "1"
SPLITS = 2 if QUICK else 3  # pieces per coordinate for the sound constants


def m_norm(v, weights, sizes):
    """||v||_M over the last axis, M = blkdiag(w_i I_{d_i})."""
    return np.sqrt(np.sum(np.repeat(weights, sizes) * np.asarray(v) ** 2, axis=-1))


# %% [markdown]
# ## 1. A quadratic game that is not monotone, certified by SGN
#
# $f_1 = \tfrac12 x_1^2 + 10\,x_1 x_2$, $f_2 = \tfrac12 x_2^2 + 0.05\,x_1 x_2$: the
# pseudo-gradient is $F(x) = Jx$ with $J = [[1, 10], [0.05, 1]]$, so $\mu = (1, 1)$,
# $L_{12} = 10$, $L_{21} = 0.05$. In the Euclidean metric the margin is negative; the best
# SGN weights balance $w_1 L_{12} = w_2 L_{21}$ (ratio 200) and certify
# $\alpha^* = 1 - \sqrt{0.5}$, which is this game's true rate.

# %%
mu = jnp.array([1.0, 1.0])
lip = jnp.array([[0.0, 10.0], [0.05, 0.0]])
jac = jnp.array([[1.0, 10.0], [0.05, 1.0]])

cert = vf.sgn_certificate(mu, lip, beta=jac)  # beta: bounds on every block's norm
beta = float(vf.metric_lipschitz(jac, cert.weights))
print(f"Euclidean margin:   {float(vf.sgn_margin(mu, lip, jnp.ones(2))):.4f}")
print(f"SGN weights:        {np.asarray(cert.weights)}")
print(f"SGN margin:         {float(cert.margin):.6f}   (1 - sqrt(0.5) = {1 - np.sqrt(0.5):.6f})")
print(f"feasible band:      {np.asarray(cert.weight_band).round(4)}")
print(f"beta in the metric: {beta:.4f}   (1 + sqrt(0.5) = {1 + np.sqrt(0.5):.4f})")
print(f"Euler step bound:   {float(cert.euler_step):.4f}")

# %% [markdown]
# The margin as a function of the weight ratio, and gradient play at half the certified step:
# the Euclidean norm grows before it decays, the $M$-norm contracts from the first step, at
# least as fast as the certified factor $q = \sqrt{1 - 2h\alpha^* + h^2\beta^2}$.

# %%
ratios = np.logspace(-1, 5, 400)
margins = jax.vmap(lambda r: vf.sgn_margin(mu, lip, jnp.stack([1.0, r])))(jnp.asarray(ratios))
alpha = float(cert.margin)
h = float(cert.euler_step) / 2
traj = np.asarray(vf.game_flow(lambda x: jac @ x, jnp.array([0.0, 1.0]), step=h, num_steps=60))
q = np.sqrt(1 - 2 * h * alpha + h**2 * beta**2)
k = np.arange(61)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
lo, hi = np.asarray(cert.weight_band)
axes[0].semilogx(ratios, margins, label=r"$\alpha^*(1, r)$")
axes[0].axhline(0, color="k", lw=0.8)
axes[0].axvspan(lo, hi, color="C2", alpha=0.15, label=f"band ({lo:.1f}, {hi:.1f})")
axes[0].axvline(200, color="C3", ls="--", label="$r^* = 200$")
axes[0].set(xlabel="$w_2 / w_1$", ylabel="SGN margin", ylim=(-5, 0.6))
axes[0].legend(fontsize=8)
e = np.linalg.norm(traj, axis=-1)
m = m_norm(traj, np.asarray(cert.weights), [1, 1])
axes[1].semilogy(k, e / e[0], label="Euclidean norm")
axes[1].semilogy(k, m / m[0], label="$M(w^*)$ norm")
axes[1].semilogy(k, q**k, "k--", label=f"certified $q^k$ (q = {q:.3f})")
axes[1].set(xlabel="Euler step", ylabel="norm / initial")
axes[1].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. A nonlinear game with tanh couplings, certified over a box
#
# Player 1 ($x_1 \in \mathbb{R}^2$) is pulled strongly by player 2 through a tanh layer;
# player 2 ($x_2 \in \mathbb{R}^2$) only weakly by player 1. The constants must hold on the
# whole box, so they come from **bounds on the Jacobian** over it
# (`vf.jacobian_bounds`, bound propagation through the derivative graph), turned into block
# constants soundly: $\mu_i \ge \lambda_{\min}(\mathrm{sym}\,J_c) - \|\mathrm{sym}\,R\|_2$
# (Weyl, with the interval's midpoint $J_c$ and radius $R$) and
# $L_{ij} \le \|\,|J_c| + R\,\|_2$. Cutting the box into sub-boxes (`splits`) tightens them.
# A sampled estimate is shown beside them: it is an *inner* estimate, not a proof.

# %%
COUPLING = jnp.array([[1.0, 0.5], [-0.5, 1.0]])
REGION = vf.Box(jnp.array([-1.0, -0.5, -1.0, -1.0]), jnp.array([1.0, 1.5, 1.0, 0.0]))


def tanh_game(x):
    x1, x2 = x[:2], x[2:]
    g1 = x1 - 0.3 + 0.2 * jnp.tanh(x1) + 2.5 * jnp.tanh(COUPLING @ x2 + 0.1)
    g2 = 1.2 * x2 + 0.1 * jnp.tanh(x1[::-1] - 0.2)
    return jnp.concatenate([g1, g2])


sound = vf.game_constants(tanh_game, REGION, (2, 2), splits=SPLITS)
sampled = vf.sampled_game_constants(
    tanh_game, REGION, (2, 2), key=jax.random.key(0), num_samples=4096
)
print(f"{'':6s} {'sound':>8s} {'sampled':>8s}")
for name, s, e in [
    ("mu_1", sound.mu[0], sampled.mu[0]),
    ("mu_2", sound.mu[1], sampled.mu[1]),
    ("L_12", sound.lipschitz[0, 1], sampled.lipschitz[0, 1]),
    ("L_21", sound.lipschitz[1, 0], sampled.lipschitz[1, 0]),
]:
    print(f"{name:6s} {float(s):8.4f} {float(e):8.4f}")

cert = vf.sgn_certificate(sound.mu, sound.lipschitz, beta=sound.beta)
w = np.asarray(cert.weights)
alpha = float(cert.margin)
beta = float(vf.metric_lipschitz(sound.beta, cert.weights))
print(
    f"Euclidean margin (sound constants): "
    f"{float(vf.sgn_margin(sound.mu, sound.lipschitz, jnp.ones(2))):.4f}"
)
print(
    f"SGN: weights {w.round(3)}, margin {alpha:.4f}, certified {bool(cert.certified)}, "
    f"beta(w) {beta:.3f}, Euler step < {float(cert.euler_step):.4f}"
)

# %% [markdown]
# Every sampled Jacobian obeys the sound constants (a check of soundness, not part of the
# proof):

# %%
xs = jax.random.uniform(jax.random.key(1), (4000, 4), minval=REGION.lower, maxval=REGION.upper)
jacs = np.asarray(jax.vmap(jax.jacfwd(tanh_game))(xs))
lam = np.linalg.eigvalsh((jacs[:, :2, :2] + np.swapaxes(jacs[:, :2, :2], 1, 2)) / 2)[:, 0]
norm12 = np.linalg.norm(jacs[:, :2, 2:], 2, axis=(1, 2))
print(
    f"min over samples of lambda_min(sym J_11): {lam.min():.4f} >= mu_1 = {float(sound.mu[0]):.4f}"
)
print(
    f"max over samples of ||J_12||: {norm12.max():.4f} <= L_12 = {float(sound.lipschitz[0, 1]):.4f}"
)

# %% [markdown]
# ### Simulated trajectories contract in the certified metric
#
# Projected gradient play (`vf.game_flow` with `project=` a clip to the box; the blockwise
# Euclidean projection onto a box is also the $M$-projection, so it does not spoil the
# contraction) from the box's corners, at half the certified Euler step. The $M$-norm
# distance to the equilibrium falls at least as fast as the certified $q^k$.

# %%
clip = lambda x: jnp.clip(x, REGION.lower, REGION.upper)
h = float(cert.euler_step) / 2
corners = jnp.asarray(
    list(itertools.product(*zip(np.asarray(REGION.lower), np.asarray(REGION.upper), strict=True)))
)
runs = np.asarray(
    jax.vmap(lambda x0: vf.game_flow(tanh_game, x0, step=h, num_steps=60, project=clip))(corners)
)
x_star = np.asarray(
    vf.game_flow(tanh_game, jnp.asarray(runs[0, -1]), step=h, num_steps=2000, project=clip)[-1]
)
dist = m_norm(runs - x_star, w, [2, 2])
q = np.sqrt(1 - 2 * h * alpha + h**2 * beta**2)
k = np.arange(61)
assert np.all(dist <= dist[:, :1] * q**k * (1 + 1e-9) + 1e-12)

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for r in runs:
    axes[0].plot(r[:, 0], r[:, 2], color="C0", lw=1, alpha=0.6)
axes[0].plot(x_star[0], x_star[2], "r*", ms=12, label="equilibrium")
axes[0].set(xlabel="$x_{1,1}$", ylabel="$x_{2,1}$", title="trajectories (a 2-D slice)")
axes[0].legend()
for d in dist:
    axes[1].semilogy(k, d / d[0], color="C0", lw=1, alpha=0.6)
axes[1].semilogy(k, q**k, "k--", lw=2, label=f"certified $q^k$, q = {q:.4f}")
axes[1].set(xlabel="Euler step", ylabel=r"$\|x_k - x^*\|_M / \|x_0 - x^*\|_M$")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. Entropy-regularised matrix games in the mirror geometry
#
# With softmax policies $\pi_i = \mathrm{softmax}(\theta_i)$ and costs
# $f_1 = \pi_1^\top A\pi_2 - \tau H(\pi_1)$, $f_2 = \pi_1^\top B\pi_2 - \tau H(\pi_2)$, the
# natural policy gradient (Fisher-preconditioned) is entropic mirror descent:
# $\theta_i \leftarrow \theta_i - h\nabla_{\pi_i} f_i$. In centred-logit coordinates its
# Jacobian has $J_{ii} = \tau I$ exactly and $\|J_{12}\| \le \|Q^\top A Q\|/2$ (the softmax
# Jacobian has norm at most 1/2), so `vf.entropic_matrix_game` gives sound closed-form
# constants on a forward-invariant box that contains every regularised equilibrium (QRE).
# A certificate proves a unique QRE and linear convergence of natural-gradient play to it;
# it says nothing about the unregularised game ($\tau \to 0$) or about vanilla policy
# gradient.

# %%
rps = jnp.array([[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
a = 2.0 * rps + jnp.array([[0.0, 0.0, 0.5]])
for tau in (1.0, 2.0, 3.0):
    game = vf.entropic_matrix_game(a, -a, temperature=tau)
    c = game.constants
    cert = vf.sgn_certificate(c.mu, c.lipschitz, beta=c.beta)
    msg = f"tau = {tau}: L_12 = {float(c.lipschitz[0, 1]):.3f}, margin {float(cert.margin):.4f}"
    if bool(cert.certified):
        step = min(float(cert.euler_step), 1 / tau)
        z = vf.game_flow(game.pseudo_grad, game.region.lower, step=step, num_steps=300)[-1]
        p1, p2 = game.policies(z)
        msg += f"; QRE policies {np.asarray(p1).round(3)}, {np.asarray(p2).round(3)}"
    print(msg)

# %% [markdown]
# ## 4. Three players: the best weights
#
# For $N$ players the margin is concave in the log-weights, and its maximum is the smallest
# real eigenvalue of the Z-matrix $D - L$, reached at $w_i = y_i/x_i$ from its left and right
# Perron vectors (`vf.sgn_certificate` computes them by bisection and inverse iteration). A
# brute-force grid over the two free weight ratios agrees.

# %%
mu3 = jnp.array([1.0, 1.0, 1.0])
lip3 = jnp.array([[0.0, 4.0, 0.1], [0.02, 0.0, 3.0], [0.05, 0.01, 0.0]])
cert3 = vf.sgn_certificate(mu3, lip3)
grid = np.linspace(-8, 8, 121 if QUICK else 401)
t1, t2 = (g.ravel() for g in np.meshgrid(grid, grid, indexing="ij"))
ws = jnp.asarray(np.stack([np.ones_like(t1), np.exp(t1), np.exp(t2)], 1))
brute = jax.vmap(lambda w: vf.sgn_margin(mu3, lip3, w))(ws)
print(f"Euclidean margin {float(vf.sgn_margin(mu3, lip3, jnp.ones(3))):.4f}")
print(f"Perron weights {np.asarray(cert3.weights).round(3)}, margin {float(cert3.margin):.5f}")
print(
    f"best on the grid: weights {np.asarray(ws[int(jnp.argmax(brute))]).round(3)}, "
    f"margin {float(jnp.max(brute)):.5f}"
)
