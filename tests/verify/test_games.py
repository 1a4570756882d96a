"""Small-Gain Nash certificates: closed forms, soundness on random games, sound constants,
simulated contraction, the entropic (mirror) variant and input checks."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from linjax import verify as vf

SQ = np.sqrt(0.5)
MU = np.array([1.0, 1.0])
LIP = np.array([[0.0, 10.0], [0.05, 0.0]])
JQ = np.array([[1.0, 10.0], [0.05, 1.0]])  # Jacobian of the quadratic game


def metric_norm(a, w, sizes):
    """||M^{1/2} A M^{-1/2}||_2 for M = blkdiag(w_i I_{d_i}) (dense numpy oracle)."""
    m = np.repeat(np.sqrt(w), sizes)
    return np.linalg.norm(m[:, None] * a / m[None, :], 2)


def true_margin(j, w, sizes):
    """lambda_min of M^{-1/2} sym(M J) M^{-1/2}: the best modulus in the metric."""
    m = np.repeat(w, sizes)
    s = (m[:, None] * j + (m[:, None] * j).T) / 2
    r = 1 / np.sqrt(m)
    return np.linalg.eigvalsh(r[:, None] * s * r[None, :])[0]


def block_constants(j, sizes):
    edges = np.cumsum([0, *sizes])
    blk = [slice(a, b) for a, b in itertools.pairwise(edges)]
    n = len(sizes)
    mu = np.array([np.linalg.eigvalsh((j[b, b] + j[b, b].T) / 2)[0] for b in blk])
    norms = np.array([[np.linalg.norm(j[blk[i], blk[k]], 2) for k in range(n)] for i in range(n)])
    return mu, norms * (1 - np.eye(n)), norms


REGION = vf.Box(jnp.array([-1.0, -0.5, -1.0, -1.0]), jnp.array([1.0, 1.5, 1.0, 0.0]))
margin_jit = jax.jit(vf.sgn_margin)
cert_jit = jax.jit(vf.sgn_certificate)
metric_jit = jax.jit(vf.metric_lipschitz)


@pytest.fixture(scope="module")
def tanh_constants():
    """Sound constants of :func:`tanh_game` on REGION (2 pieces per coordinate)."""
    return vf.game_constants(tanh_game, REGION, (2, 2), splits=2)


def tanh_game(x):
    """A nonlinear two-player game: x1 in R^2 strongly coupled to x2 in R^2 through tanh."""
    w = jnp.array([[1.0, 0.5], [-0.5, 1.0]])
    x1, x2 = x[:2], x[2:]
    g1 = x1 - 0.3 + 0.2 * jnp.tanh(x1) + 1.5 * jnp.tanh(w @ x2 + 0.1)
    g2 = 1.2 * x2 + 0.1 * jnp.tanh(x1[::-1] - 0.2)
    return jnp.concatenate([g1, g2])


# --------------------------------------------------------------------------------------------
# The 2-D quadratic game of the SGN authors (reference note §6.5)
# --------------------------------------------------------------------------------------------


def test_quadratic_game_reference_numbers():
    alpha, beta = 1 - SQ, 1 + SQ
    assert float(vf.sgn_margin(MU, LIP, np.ones(2))) == pytest.approx(-4.025, abs=1e-12)
    assert float(vf.sgn_margin(MU, LIP, np.array([1.0, 200.0]))) == pytest.approx(alpha, 1e-12)
    cert = vf.sgn_certificate(MU, LIP, beta=JQ)  # beta from the block norms, at w*
    np.testing.assert_allclose(cert.weights, [1.0, 200.0], rtol=1e-12)
    assert float(cert.margin) == pytest.approx(alpha, rel=1e-12)
    assert bool(cert.certified)
    np.testing.assert_allclose(cert.weight_band, [34.3146, 1165.6854], atol=5e-5)
    assert float(cert.euler_step) == pytest.approx(2 * alpha / beta**2, rel=1e-12)
    assert float(cert.rk4_step) == pytest.approx(2.5 / beta, rel=1e-12)
    # beta = 1 + sqrt(0.5) is exactly the Lipschitz constant of F = J x in M(w*).
    assert metric_norm(JQ, np.array([1.0, 200.0]), [1, 1]) == pytest.approx(beta, rel=1e-12)
    scalar = vf.sgn_certificate(MU, LIP, beta=beta)
    assert float(scalar.euler_step) == pytest.approx(float(cert.euler_step), rel=1e-12)
    # ... and alpha* is the true rate of this linear game.
    assert true_margin(JQ, np.array([1.0, 200.0]), [1, 1]) == pytest.approx(alpha, rel=1e-12)


def test_quadratic_game_sound_constants_reproduce_certificate():
    region = vf.Box.from_eps(jnp.zeros(2), 3.0)
    c = vf.game_constants(lambda x: jnp.asarray(JQ) @ x, region, (1, 1))
    np.testing.assert_allclose(c.mu, MU, rtol=1e-9)
    np.testing.assert_allclose(c.lipschitz, LIP, rtol=1e-9)
    np.testing.assert_allclose(c.beta, JQ, rtol=1e-9)
    assert np.all(np.asarray(c.mu) <= MU) and np.all(np.asarray(c.beta) >= JQ)
    cert = vf.sgn_certificate(c.mu, c.lipschitz, beta=c.beta)
    assert float(cert.margin) == pytest.approx(1 - SQ, rel=1e-8)
    assert float(cert.euler_step) == pytest.approx(2 * (1 - SQ) / (1 + SQ) ** 2, rel=1e-8)


def test_margin_equals_half_min_eig_of_scaled_sgn_matrix():
    rng = np.random.default_rng(0)
    for n in (1, 2, 3, 5):
        mu = rng.normal(size=n)
        lip = rng.uniform(0, 2, (n, n))
        w = np.exp(rng.normal(size=n))
        c = -(w[:, None] * lip + (w[:, None] * lip).T)
        c[np.diag_indices(n)] = 2 * w * mu
        ref = 0.5 * np.linalg.eigvalsh(c / np.sqrt(np.outer(w, w)))[0]
        assert float(vf.sgn_margin(mu, lip, w)) == pytest.approx(ref, abs=1e-12)


def test_two_player_closed_form_and_band():
    rng = np.random.default_rng(1)
    for _ in range(20):
        mu = rng.uniform(0.2, 2.0, 2)
        lip = np.diag(rng.uniform(0, 1, 2))[::-1] * rng.uniform(0.1, 3)
        cert = vf.sgn_certificate(mu, lip)
        ref = mu.mean() - np.sqrt(((mu[0] - mu[1]) / 2) ** 2 + lip[0, 1] * lip[1, 0])
        assert float(cert.margin) == pytest.approx(ref, abs=1e-12)
        assert np.isnan(float(cert.euler_step))  # no beta given
        band = np.asarray(cert.weight_band)
        if ref <= 0:
            assert np.all(np.isnan(band))
            continue
        for r in band:  # the margin is zero at both ends, positive inside, negative out
            assert float(vf.sgn_margin(mu, lip, np.array([1.0, r]))) == pytest.approx(0, abs=1e-9)
        mid = np.sqrt(band[0] * band[1])
        assert float(vf.sgn_margin(mu, lip, np.array([1.0, mid]))) > 0
        assert float(vf.sgn_margin(mu, lip, np.array([1.0, band[0] / 2]))) < 0
        assert float(vf.sgn_margin(mu, lip, np.array([1.0, band[1] * 2]))) < 0
        # sgn_band at a target margin: the band where alpha* exceeds half the optimum
        half = np.asarray(vf.sgn_band(mu, lip, margin=ref / 2))
        for r in half:
            m = float(vf.sgn_margin(mu, lip, np.array([1.0, r])))
            assert m == pytest.approx(ref / 2, abs=1e-9)


def test_random_games_true_margin_dominates_and_euler_contracts():
    rng = np.random.default_rng(2)
    certified = 0
    for trial in range(40):
        n = int(rng.integers(2, 5))
        sizes = list(rng.integers(1, 4, n))
        d = sum(sizes)
        j = rng.normal(size=(d, d)) * rng.uniform(0.05, 0.6)
        j += np.diag(np.repeat(rng.uniform(0.5, 2.0, n), sizes))
        mu, lip, norms = block_constants(j, sizes)
        for _ in range(5):  # random weights: alpha_true(w) >= alpha*(w)
            w = np.exp(rng.normal(size=n) * 2)
            assert true_margin(j, w, sizes) >= float(margin_jit(mu, lip, w)) - 1e-10
        cert = cert_jit(mu, lip, beta=norms)
        w = np.asarray(cert.weights)
        assert true_margin(j, w, sizes) >= float(cert.margin) - 1e-10
        beta = float(metric_jit(norms, w))
        assert beta >= metric_norm(j, w, sizes) - 1e-10
        if not bool(cert.certified):
            assert float(cert.euler_step) == 0.0
            continue
        certified += 1
        alpha = float(cert.margin)
        for frac in (0.05, 0.5, 0.95, 0.999):
            h = frac * float(cert.euler_step)
            factor = metric_norm(np.eye(d) - h * j, w, sizes)
            bound = np.sqrt(1 - 2 * h * alpha + h**2 * beta**2)
            assert factor <= bound + 1e-10 and bound < 1, (trial, frac)
    assert certified >= 10


def test_n_player_optimum_matches_grid_and_perron_root():
    rng = np.random.default_rng(3)
    grid = np.linspace(-7, 7, 141)
    t1, t2 = np.meshgrid(grid, grid, indexing="ij")
    ws = np.stack([np.ones(t1.size), np.exp(t1.ravel()), np.exp(t2.ravel())], 1)
    for _ in range(3):
        mu = rng.uniform(0.5, 2.0, 3)
        lip = rng.uniform(0, 1.0, (3, 3)) * (1 - np.eye(3))
        lip[0, 1] *= 20  # strongly asymmetric, so the best weights are far from equal
        brute = jax.vmap(lambda w, mu=mu, lip=lip: vf.sgn_margin(mu, lip, w))(jnp.asarray(ws))
        best = ws[int(jnp.argmax(brute))]
        cert = vf.sgn_certificate(mu, lip)
        margin = float(cert.margin)
        assert margin >= float(jnp.max(brute)) - 1e-12
        assert margin == pytest.approx(float(jnp.max(brute)), abs=5e-3)
        np.testing.assert_allclose(np.log(cert.weights), np.log(best), atol=0.1)
        ev = np.linalg.eigvals(np.diag(mu) - lip)
        tau = ev[np.abs(ev.imag) < 1e-9].real.min()  # smallest real eigenvalue of D - L
        assert margin == pytest.approx(tau, abs=1e-9)
        grad = jax.grad(lambda t, mu=mu, lip=lip: vf.sgn_margin(mu, lip, jnp.exp(t)))(
            jnp.log(cert.weights)
        )
        assert float(jnp.max(jnp.abs(grad))) < 1e-7  # stationary point of a concave function


def test_one_way_couplings_and_jit():
    # L21 = 0: the supremum min(mu) is approached as w2/w1 -> infinity; weights stay finite.
    cert = vf.sgn_certificate(np.array([1.0, 2.0]), np.array([[0.0, 5.0], [0.0, 0.0]]))
    assert bool(cert.certified) and float(cert.margin) == pytest.approx(1.0, abs=1e-4)
    assert np.all(np.isfinite(cert.weights))
    assert np.isinf(float(cert.weight_band[1]))
    chain = np.array([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]])
    cert = vf.sgn_certificate(np.array([1.0, 0.5, 2.0]), chain)
    assert float(cert.margin) == pytest.approx(0.5, abs=1e-3)
    assert np.all(np.isfinite(cert.weights))
    mu, lip = jnp.array([1.0, 2.0, 0.7]), jnp.array([[0, 1.0, 0.2], [0.3, 0, 1.0], [2.0, 0.1, 0]])
    eager = vf.sgn_certificate(mu, lip, beta=lip + jnp.eye(3))
    jitted = jax.jit(lambda m, l: vf.sgn_certificate(m, l, beta=l + jnp.eye(3)))(mu, lip)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


# --------------------------------------------------------------------------------------------
# Sound constants
# --------------------------------------------------------------------------------------------


def sampled_block_checks(jacs, c, blocks):
    for i, bi in enumerate(blocks):
        sub = jacs[:, bi][:, :, bi]
        lam = np.linalg.eigvalsh((sub + np.swapaxes(sub, 1, 2)) / 2)[:, 0]
        assert np.all(lam >= float(c.mu[i]) - 1e-12)
        for k, bk in enumerate(blocks):
            norms = np.linalg.norm(jacs[:, bi][:, :, bk], 2, axis=(1, 2))
            assert np.all(norms <= float(c.beta[i, k]) + 1e-12)
            if i != k:
                assert np.all(norms <= float(c.lipschitz[i, k]) + 1e-12)


def test_constants_from_random_interval_jacobians_are_sound():
    rng = np.random.default_rng(4)
    for _ in range(5):
        sizes = [int(s) for s in rng.integers(1, 4, 3)]
        d = sum(sizes)
        mid = rng.normal(size=(d, d)) + 2 * np.eye(d)
        rad = rng.uniform(0, 0.3, (d, d))
        box = vf.Box(jnp.asarray(mid - rad), jnp.asarray(mid + rad))
        c = vf.game_constants(lambda x: x, vf.Box(jnp.zeros(d), jnp.ones(d)), sizes, jacobian=box)
        pick = rng.integers(0, 2, (300, d, d)).astype(bool)
        samples = np.concatenate(  # vertices of the interval matrix and interior points
            [np.where(pick, mid + rad, mid - rad), mid + rad * rng.uniform(-1, 1, (300, d, d))]
        )
        edges = np.cumsum([0, *sizes])
        blocks = [np.arange(a, b) for a, b in itertools.pairwise(edges)]
        sampled_block_checks(samples, c, blocks)


@pytest.mark.slow
def test_tanh_game_sound_constants_bound_sampled_jacobians(getkey, tanh_constants):
    region, c = REGION, tanh_constants
    xs = jax.random.uniform(getkey(), (4000, 4), minval=region.lower, maxval=region.upper)
    verts = jnp.asarray(list(itertools.product(*zip(region.lower, region.upper, strict=True))))
    jacs = np.asarray(jax.vmap(jax.jacfwd(tanh_game))(jnp.concatenate([xs, verts])))
    sampled_block_checks(jacs, c, [np.arange(2), np.arange(2, 4)])
    est = vf.sampled_game_constants(tanh_game, region, (2, 2), key=getkey(), num_samples=500)
    assert np.all(np.asarray(est.mu) >= np.asarray(c.mu) - 1e-12)
    assert np.all(np.asarray(est.beta) <= np.asarray(c.beta) + 1e-12)
    # Blocks given as index lists, in another order, give the same constants permuted.
    jac = vf.ibp(jax.jacfwd(tanh_game), region)
    c1 = vf.game_constants(tanh_game, region, (2, 2), jacobian=jac)
    c2 = vf.game_constants(tanh_game, region, [[2, 3], [0, 1]], jacobian=jac)
    np.testing.assert_allclose(c2.mu, c1.mu[::-1], rtol=1e-12)
    np.testing.assert_allclose(c2.beta, c1.beta[::-1, ::-1], rtol=1e-12)
    sampled_block_checks(jacs, c1, [np.arange(2), np.arange(2, 4)])
    # This game is not monotone in the Euclidean metric, but SGN certifies it on the box.
    assert float(vf.sgn_margin(c.mu, c.lipschitz, jnp.ones(2))) < 0
    cert = vf.sgn_certificate(c.mu, c.lipschitz, beta=c.beta)
    assert bool(cert.certified)


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------


def m_dist(a, b, w, sizes):
    m = np.repeat(w, sizes)
    return np.sqrt(np.sum(m * (np.asarray(a) - np.asarray(b)) ** 2, axis=-1))


@pytest.mark.slow
def test_game_flow_contracts_at_certified_rate_on_tanh_game(tanh_constants):
    region, c = REGION, tanh_constants
    cert = vf.sgn_certificate(c.mu, c.lipschitz, beta=c.beta)
    w, alpha = np.asarray(cert.weights), float(cert.margin)
    beta = float(vf.metric_lipschitz(c.beta, cert.weights))
    clip = lambda x: jnp.clip(x, region.lower, region.upper)
    x0s = jnp.array([[-1.0, 1.5, 1.0, -1.0], [1.0, -0.5, -1.0, 0.0], [0.3, 0.2, 0.1, -0.4]])
    h = float(cert.euler_step) / 2
    runs = [vf.game_flow(tanh_game, x0, step=h, num_steps=80, project=clip) for x0 in x0s]
    q = np.sqrt(1 - 2 * h * alpha + h**2 * beta**2)
    for a, b in itertools.combinations(runs, 2):
        d = m_dist(a, b, w, [2, 2])
        assert np.all(d <= d[0] * q ** np.arange(81) * (1 + 1e-9) + 1e-13)
    # A small step approaches the flow's rate e^{-alpha t}: q(h)^(1/h) -> e^{-alpha}.
    h = float(cert.euler_step) / 50
    runs = [vf.game_flow(tanh_game, x0, step=h, num_steps=400, project=clip) for x0 in x0s]
    q = np.sqrt(1 - 2 * h * alpha + h**2 * beta**2)
    assert q ** (1 / h) < np.exp(-alpha) * 1.02
    for a, b in itertools.combinations(runs, 2):
        d = m_dist(a, b, w, [2, 2])
        assert np.all(d <= d[0] * q ** np.arange(401) * (1 + 1e-9) + 1e-13)


def test_game_flow_rk4_matches_matrix_exponential_and_pytrees():
    x0 = jnp.array([1.0, -2.0])
    traj = vf.game_flow(lambda x: jnp.asarray(JQ) @ x, x0, step=0.01, num_steps=100, method="rk4")
    exact = scipy.linalg.expm(-JQ * 1.0) @ np.asarray(x0)
    np.testing.assert_allclose(traj[-1], exact, rtol=1e-8)
    assert traj.shape == (101, 2) and np.all(traj[0] == x0)
    tree = {"a": x0[:1], "b": x0[1:]}
    f = lambda t: {"a": t["a"] + 10 * t["b"], "b": 0.05 * t["a"] + t["b"]}
    out = vf.game_flow(f, tree, step=0.01, num_steps=100, method="rk4")
    np.testing.assert_allclose(jnp.concatenate([out["a"], out["b"]], -1), traj, rtol=1e-12)


# --------------------------------------------------------------------------------------------
# Entropy-regularised matrix games in the mirror (natural-gradient) geometry
# --------------------------------------------------------------------------------------------


def test_entropic_game_is_mirror_descent_and_constants_are_sound(getkey):
    rng = np.random.default_rng(5)
    a = jnp.asarray(rng.normal(size=(3, 4)))
    b = jnp.asarray(rng.normal(size=(3, 4)))
    tau = jnp.array([1.5, 2.0])
    game = vf.entropic_matrix_game(a, b, temperature=tau)
    assert game.blocks == (2, 3)
    # One Euler step on the field is entropic mirror descent (multiplicative weights).
    z = jax.random.uniform(getkey(), (5,), minval=game.region.lower, maxval=game.region.upper)
    p1, p2 = game.policies(z)
    h = 0.3
    q1, q2 = game.policies(z - h * game.pseudo_grad(z))
    g1 = a @ p2 + tau[0] * (jnp.log(p1) + 1)
    g2 = b.T @ p1 + tau[1] * (jnp.log(p2) + 1)
    np.testing.assert_allclose(q1, jax.nn.softmax(jnp.log(p1) - h * g1), rtol=1e-12)
    np.testing.assert_allclose(q2, jax.nn.softmax(jnp.log(p2) - h * g2), rtol=1e-12)
    np.testing.assert_allclose(game.coordinates(jnp.log(p1), jnp.log(p2)), z, atol=1e-12)
    # Sound constants: every sampled Jacobian in the region satisfies them; J_ii = tau I.
    xs = jax.random.uniform(getkey(), (3000, 5), minval=game.region.lower, maxval=game.region.upper)
    jacs = np.asarray(jax.vmap(jax.jacfwd(game.pseudo_grad))(xs))
    np.testing.assert_allclose(
        jacs[:, :2, :2], np.broadcast_to(1.5 * np.eye(2), (3000, 2, 2)), atol=1e-12
    )
    sampled_block_checks(jacs, game.constants, [np.arange(2), np.arange(2, 5)])


def test_entropic_game_certificate_converges_to_the_qre():
    rps = jnp.array([[0.0, 1.0, -1.0], [-1.0, 0.0, 1.0], [1.0, -1.0, 0.0]])
    a = 2.0 * rps + jnp.array([[0.0, 0.0, 0.5]])
    game = vf.entropic_matrix_game(a, -a, temperature=2.0)
    c = game.constants
    cert = vf.sgn_certificate(c.mu, c.lipschitz, beta=c.beta)
    assert bool(cert.certified)
    w, alpha = np.asarray(cert.weights), float(cert.margin)
    beta = float(vf.metric_lipschitz(c.beta, cert.weights))
    h = min(float(cert.euler_step), 0.5)  # h <= 1/tau keeps the region invariant
    corners = [game.region.lower, game.region.upper, (game.region.lower + game.region.upper) / 2]
    runs = [vf.game_flow(game.pseudo_grad, z0, step=h, num_steps=300) for z0 in corners]
    for r in runs:
        assert np.all((r >= game.region.lower - 1e-12) & (r <= game.region.upper + 1e-12))
    q = np.sqrt(1 - 2 * h * alpha + h**2 * beta**2)
    for x, y in itertools.combinations(runs, 2):
        d = m_dist(x, y, w, [2, 2])
        assert np.all(d <= d[0] * q ** np.arange(301) * (1 + 1e-9) + 1e-13)
    p1, p2 = game.policies(runs[0][-1])  # the QRE: each policy is a softmax best response
    np.testing.assert_allclose(p1, jax.nn.softmax(-(a @ p2) / 2), atol=1e-8)
    np.testing.assert_allclose(p2, jax.nn.softmax(a.T @ p1 / 2), atol=1e-8)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------


def test_bad_input_errors():
    with pytest.raises(ValueError, match="weights must be positive"):
        vf.sgn_margin(MU, LIP, np.array([1.0, 0.0]))
    with pytest.raises(ValueError, match="weights must be positive"):
        vf.sgn_margin(MU, LIP, np.array([1.0, -2.0]))
    with pytest.raises(ValueError, match=r"lipschitz\[1, 0\]"):
        vf.sgn_certificate(MU, np.array([[0.0, 1.0], [-0.1, 0.0]]))
    with pytest.raises(ValueError, match="shape"):
        vf.sgn_margin(MU, np.zeros((3, 3)), np.ones(2))
    with pytest.raises(ValueError, match="beta"):
        vf.sgn_certificate(MU, LIP, beta=-1.0)
    with pytest.raises(ValueError, match="two players"):
        vf.sgn_band(np.ones(3), np.zeros((3, 3)))
    region = vf.Box(-jnp.ones(4), jnp.ones(4))
    with pytest.raises(ValueError, match="sum to the strategy dimension 4"):
        vf.game_constants(tanh_game, region, (2, 1))
    with pytest.raises(ValueError, match=r"missing \[3\], repeated \[2\]"):
        vf.game_constants(tanh_game, region, [[0, 1, 2], [2]])
    with pytest.raises(ValueError, match="out of range"):
        vf.game_constants(tanh_game, region, [[0, 1], [2, 3, 4]])
    with pytest.raises(ValueError, match="same shape"):
        vf.game_constants(lambda x: x[:3], region, (2, 2))
    with pytest.raises(ValueError, match="splits"):
        vf.game_constants(tanh_game, region, (2, 2), splits=0)
    with pytest.raises(TypeError, match="blocks"):
        vf.game_constants(tanh_game, region, "ab")
    with pytest.raises(ValueError, match="method"):
        vf.game_flow(tanh_game, jnp.zeros(4), step=0.1, num_steps=3, method="heun")
    with pytest.raises(ValueError, match="num_steps"):
        vf.game_flow(tanh_game, jnp.zeros(4), step=0.1, num_steps=0)
    with pytest.raises(ValueError, match="temperature"):
        vf.entropic_matrix_game(jnp.ones((2, 2)), jnp.ones((2, 2)), temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        vf.entropic_matrix_game(jnp.ones((2, 2)), jnp.ones((2, 3)), temperature=1.0)
