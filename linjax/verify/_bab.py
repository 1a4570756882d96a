r"""Complete verification of linear output properties by branch and bound (BaB)."""

from __future__ import annotations

import collections
import hashlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from linjax.verify import _graph
from linjax.verify._alpha_crown import _check_lr
from linjax.verify._attack import _check_int, pgd, starts
from linjax.verify._bab_bound import find_sites, make_bounder
from linjax.verify._box import Box, check_box
from linjax.verify._crown import _INTERMEDIATE, propagate
from linjax.verify._property import check_property, margin_of

METHODS = ("alpha-crown", "crown", "ibp")
SPLITS = ("auto", "input", "relu")
#: ``split="auto"`` splits the input when it has at most this many coordinates.
AUTO_INPUT_DIM = 8


class BaBResult(NamedTuple):
    r"""Outcome of :func:`branch_and_bound`.

    Attributes:
        status: ``"verified"`` (the property holds on the whole box), ``"falsified"``
            (``counterexample`` violates it) or ``"unknown"`` (``max_domains`` reached).
        lower_bound: a sound lower bound (Python float) on the margin
            $\min_{x \in B} m(x)$ (see :func:`branch_and_bound`): the minimum over the
            open and the closed leaf domains; ``> 0`` iff verified.
        counterexample: a point of the box with $m(x) \le 0$, checked by evaluating
            ``fn``; ``None`` unless falsified.
        num_domains: number of (sub-)domains bounded, the root included.
    """

    status: str
    lower_bound: float
    counterexample: jax.Array | None
    num_domains: int


class _Pool:
    """Open sub-domains as stacked numpy arrays (leading axis = domain)."""

    def __init__(self, fields: dict[str, Any]):
        self.f = fields

    def __len__(self):
        return len(self.f["lb"])

    def take(self, idx: np.ndarray) -> dict:
        out = jax.tree.map(lambda a: a[idx], self.f)
        keep = np.ones(len(self), bool)
        keep[idx] = False
        self.f = jax.tree.map(lambda a: a[keep], self.f)
        return out

    def add(self, new: dict, mask: np.ndarray):
        self.f = jax.tree.map(lambda a, b: np.concatenate([a, b[mask]]), self.f, new)


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(f"method={method!r} must be one of {METHODS}")
    return method


def branch_and_bound(
    fn: Callable[[jax.Array], jax.Array],
    box: Box,
    spec: jax.typing.ArrayLike,
    *,
    threshold: jax.typing.ArrayLike = 0.0,
    max_domains: int = 10_000,
    method: str = "alpha-crown",
    split: str = "auto",
    groups: jax.typing.ArrayLike | None = None,
    batch_size: int = 32,
    steps: int = 20,
    lr: float = 0.5,
    intermediate: str = "crown",
    key: jax.Array | None = None,
    attack_steps: int = 20,
    attack_restarts: int = 16,
) -> BaBResult:
    r"""Prove or refute ``spec @ fn(x) > threshold`` for all ``x`` in ``box`` by branch and bound.

    **Property.** Rows $c_k$ of ``spec`` and thresholds $t_k$; the property holds iff
    $c_k^\top f(x) > t_k$ for every row $k$ and every $x$ in the box (strict; a point
    with $c_k^\top f(x) \le t_k$ for some $k$ is a counterexample). With ``groups``,
    rows sharing a group id are *alternatives*: the property holds at $x$ iff each group
    has at least one row above its threshold (how a VNN-LIB unsafe conjunction negates,
    see :func:`read_vnnlib`). Everything is measured by the margin
    $m(x) = \min_g \max_{k \in g}(c_k^\top f(x) - t_k)$: verified iff $m > 0$ on the box.

    **Algorithm.** The root box is bounded; while some open sub-domain has a margin lower
    bound $\le 0$, the ``batch_size / 2`` open domains with the lowest bounds are each
    split in two and the children are bounded together in one ``jit(vmap(...))`` call
    (the batch is padded to ``batch_size``, so it compiles once; the compiled functions
    are cached by ``fn``'s traced jaxpr and constants, so further calls on the same
    network, for other boxes or specs of the same shapes, do not recompile, while a
    changed network never reuses them). Children with a positive bound are closed.
    Bounding uses ``method``: ``"alpha-crown"`` (CROWN with ``steps`` Adam steps on the
    slopes, never looser than CROWN), ``"crown"`` or ``"ibp"``. Two kinds of split:

    * **input** (``split="input"``): bisect the box along the coordinate $i$ with the
      largest $|\Lambda_{k i}|\,(u_i - l_i)$, where $\Lambda_k$ is CROWN's input
      coefficient of the critical row (the coordinate the bound depends on most). Good
      for low-dimensional inputs.
    * **ReLU** (``split="relu"``): pick an unstable ReLU-like neuron ($l < p < u$ around
      the kink $p$: ReLU, leaky ReLU, abs, max/min with a constant) by an intercept
      (BaBSR-style) score, $|\lambda_j| \times$ the gap of the relaxation at the kink,
      with $\lambda_j$ the critical row's backward coefficient at the neuron's output
      (for ReLU: $\max(-\lambda_j, 0)\,\frac{-l_j u_j}{u_j - l_j}$); the children clamp
      its pre-activation bounds to $[p, u]$ (active) and $[l, p]$ (inactive). The
      clamped bounds enter the relaxations and all later intermediate bounds, so each
      child's bound is sound on its half $\{x \in B: z_j(x) \gtrless p\}$; the halves
      cover the box. With ``method="alpha-crown"`` the split constraints also enter
      the final bound through Lagrange multipliers $\beta \ge 0$, optimised jointly
      with the slopes (β-CROWN, Wang et al. 2021), so the bound of a fully split
      domain can reach its exact linear-programming value; with ``"crown"`` and
      ``"ibp"`` only the clamps act and ReLU splitting converges poorly (prefer input
      splitting there). A sub-domain whose clamped intervals become empty (lower >
      upper beyond rounding) is closed. Falls back to an input split when no unstable
      neuron is left.
    * ``split="auto"``: input splitting if the input has at most ``AUTO_INPUT_DIM`` (8)
      coordinates or ``fn`` has no ReLU-like node, ReLU splitting otherwise.

    **Attacks.** Before branching, PGD (:func:`pgd_attack`) runs from the box centre and
    ``attack_restarts - 1`` random points; then, in every batch, a short PGD run
    (``attack_steps`` steps) starts in each child domain from the minimiser of its
    linear bound and from its centre. A candidate is accepted only after ``fn`` is
    evaluated at it (clipped into the box) and its margin is $\le 0$.

    Stops with ``"verified"`` when no open domain is left, ``"falsified"`` at the first
    confirmed counterexample, ``"unknown"`` when ``max_domains`` domains have been
    bounded. Soundness rests on the bound propagation (up to floating-point rounding):
    use float64 for tight margins.

    Args:
        fn: a function from one array shaped like ``box.lower`` to one real array.
        box: input set, :class:`Box` with ``lower <= upper``.
        spec: ``[S, n_out]`` (or ``[S, *out_shape]``) rows $c_k$.
        threshold: scalar or ``[S]`` thresholds $t_k$.
        max_domains: budget of bounded domains (integer ``>= 1``; 1 = the root only).
        method: ``"alpha-crown"``, ``"crown"`` or ``"ibp"``.
        split: ``"auto"``, ``"input"`` or ``"relu"``.
        groups: optional ``[S]`` integer group ids (alternatives, see above).
        batch_size: domains bounded per call (even integer ``>= 2``).
        steps: alpha-CROWN steps per bounding call; lr: its Adam learning rate.
        intermediate: ``"crown"`` or ``"ibp"`` pre-activation bounds (see :func:`crown`).
        key: ``jax.random`` key for the attack's restarts (default ``key(0)``).
        attack_steps: PGD steps of each attack run; attack_restarts: root restarts.

    Returns:
        :class:`BaBResult` ``(status, lower_bound, counterexample, num_domains)``.

    Raises:
        ValueError: malformed box, spec (shape not matching ``fn``'s output), threshold
            or groups; unknown ``method``/``split``/``intermediate``; ``max_domains < 1``.

    Examples:
        A 1-D ReLU net: $f(x) = \mathrm{relu}(x) + \mathrm{relu}(-x) = |x| \ge 0$ on
        $[-1, 1]$, so $f(x) > -0.1$ holds and $f(x) > 0.1$ fails near 0:

        >>> import jax, jax.numpy as jnp
        >>> from linjax import verify as vf
        >>> f = lambda x: jax.nn.relu(x) + jax.nn.relu(-x)
        >>> box = vf.Box(jnp.array([-1.0]), jnp.array([1.0]))
        >>> vf.branch_and_bound(f, box, jnp.ones((1, 1)), threshold=-0.1, method="crown").status
        'verified'
        >>> res = vf.branch_and_bound(f, box, jnp.ones((1, 1)), threshold=0.1, method="crown")
        >>> res.status, bool(f(res.counterexample)[0] <= 0.1)
        ('falsified', True)

    References:
        Bunel et al. (2020), "Branch and bound for piecewise linear neural network
        verification" (BaBSR), https://arxiv.org/abs/1909.06588.
        Xu et al. (2021), "Fast and complete" (alpha-CROWN BaB on batches of domains),
        https://arxiv.org/abs/2011.13824.
        Wang et al. (2021), "Beta-CROWN: efficient bound propagation with per-neuron
        split constraints for complete and incomplete neural network verification",
        https://arxiv.org/abs/2103.06624.
        Madry et al. (2018), "Towards deep learning models resistant to adversarial
        attacks" (PGD), https://arxiv.org/abs/1706.06083.
    """
    box = check_box(box)
    method = _check_method(method)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if intermediate not in _INTERMEDIATE:
        raise ValueError(f"intermediate={intermediate!r} must be one of {_INTERMEDIATE}")
    max_domains = _check_int("max_domains", max_domains, 1)
    batch_size = _check_int("batch_size", batch_size, 2)
    if batch_size % 2:
        raise ValueError(f"batch_size must be even (children come in pairs), got {batch_size}")
    steps = _check_int("steps", steps, 1)
    lr = _check_lr(lr)
    attack_steps = _check_int("attack_steps", attack_steps, 1)
    attack_restarts = _check_int("attack_restarts", attack_restarts, 1)
    key = jax.random.key(0) if key is None else key
    like = jax.ShapeDtypeStruct(box.lower.shape, box.lower.dtype)
    prop = check_property(fn, like, spec, threshold, groups)
    pargs = (prop.spec, prop.threshold, prop.mask)
    lower0, upper0 = np.asarray(box.lower), np.asarray(box.upper)
    fkey = _fingerprint(fn, like)

    def margin(x):
        return _cached(("margin", fkey), lambda: jax.jit(lambda x, *p: margin_of(fn, x, *p)))(
            x, *pargs
        )

    def confirm(x) -> jax.Array | None:
        x = jnp.clip(jnp.asarray(x, box.lower.dtype), box.lower, box.upper)
        return x if float(margin(x)) <= 0 else None

    with jax.default_matmul_precision("highest"):
        graph = _graph.trace(fn, like)
        if not _graph.is_bounded(graph.output):  # fn ignores x: one evaluation decides
            m = float(margin(box.center))
            cex = confirm(box.center)
            status = "falsified" if cex is not None else "verified"
            return BaBResult(status, m, cex, 1)
        root = propagate(graph, box, intermediate="ibp")
    sites = find_sites(graph, root)
    if split == "auto":
        split = "input" if (box.lower.size <= AUTO_INPUT_DIM or not sites) else "relu"
    config = dict(
        method=method, intermediate=intermediate, steps=steps, lr=lr, attack_steps=attack_steps
    )
    bound = _cached(
        ("bound", fkey, prop.out_shape, split, tuple(config.items())),
        lambda: make_bounder(fn, like, prop.out_shape, sites if split == "relu" else [], **config),
    )
    split_vars = sorted({s.var for s in sites}) if split == "relu" else []
    pivots = {r: np.asarray(s.px) for s in sites for r in [s.var]}
    shapes = {r: tuple(graph.avals[r].shape) for r in split_vars}
    dtype = lower0.dtype

    def run(doms: dict) -> dict:
        n = len(doms["lower"])
        pad = np.concatenate([np.arange(n), np.zeros(batch_size - n, int)])
        args = jax.tree.map(lambda a: a[pad], (doms["lower"], doms["upper"], doms["clamps"]))
        out = jax.tree.map(lambda a: np.asarray(a)[:n], bound(*args, *pargs))
        return {
            **doms,
            "lb": out.lower,
            "s_in": out.input_score,
            "s_relu": out.relu_score,
            "x_adv": out.x_adv,
            "m_adv": out.m_adv,
        }

    free = {
        r: (np.full((1,) + shapes[r], -np.inf, dtype), np.full((1,) + shapes[r], np.inf, dtype))
        for r in split_vars
    }
    doms = run({"lower": lower0[None], "upper": upper0[None], "clamps": free})
    num = 1
    # Attack first: the root bound's candidates, then PGD with restarts.
    cex = confirm(doms["x_adv"][0]) if doms["m_adv"][0] <= 0 else None
    if cex is None and doms["lb"][0] <= 0:
        attack = _cached(
            ("attack", fkey, attack_restarts, attack_steps),
            lambda: _root_attack(fn, attack_restarts, 5 * attack_steps),
        )
        xs, ms = attack(key, box, *pargs)
        ms = np.where(np.isnan(np.asarray(ms)), np.inf, np.asarray(ms))
        i = int(np.argmin(ms))
        cex = confirm(xs[i]) if ms[i] <= 0 else None
    if cex is not None:
        return BaBResult("falsified", float(min(doms["lb"][0], 0.0)), cex, num)
    closed = math.inf
    stuck: list[float] = []
    keep = doms["lb"] <= 0
    closed = min(closed, float(np.min(doms["lb"], initial=np.inf, where=~keep)))
    pool = _Pool(jax.tree.map(lambda a: a[keep], doms))
    while len(pool):
        k = min(batch_size // 2, len(pool), (max_domains - num) // 2)
        if k < 1:
            break
        order = np.argsort(pool.f["lb"], kind="stable")[:k]
        parents = pool.take(order)
        children, unsplittable = _split(parents, split, split_vars, pivots)
        stuck.extend(float(v) for v in parents["lb"][unsplittable])
        if not len(children["lower"]):
            continue
        kids = run(children)
        num += len(kids["lower"])
        bad = np.flatnonzero(kids["m_adv"] <= 0)
        for i in bad[np.argsort(kids["m_adv"][bad])]:
            cex = confirm(kids["x_adv"][i])
            if cex is not None:
                low = min(
                    float(np.min(pool.f["lb"], initial=np.inf)),
                    float(np.min(kids["lb"])),
                    closed,
                    *stuck,
                )
                return BaBResult("falsified", low, cex, num)
        open_ = kids["lb"] <= 0
        closed = min(closed, float(np.min(kids["lb"], initial=np.inf, where=~open_)))
        pool.add(kids, open_)
    low = min(float(np.min(pool.f["lb"], initial=np.inf)), closed, *stuck)
    if len(pool) or stuck:
        return BaBResult("unknown", low, None, num)
    return BaBResult("verified", low, None, num)


#: Compiled bounding / attack functions of recent calls, so that verifying many boxes
#: or properties of one network (a verified-accuracy table) compiles once.
_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 16


class _ById:
    """Hashes and compares by identity; holds the object so its ``id`` is not reused."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __hash__(self) -> int:
        return id(self.obj)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _ById) and other.obj is self.obj


def _fingerprint(fn: Callable, like: jax.ShapeDtypeStruct) -> tuple:
    """What ``fn`` computes at inputs like ``like``: its jaxpr text and its constants.

    JAX arrays are immutable, so they are identified by ``id`` (and kept alive by the
    key); other constants (numpy arrays, which can be mutated in place) by a hash of
    their bytes. Two functions with equal fingerprints compute the same thing, so a
    cache keyed by it can never return bounds of a stale network.
    """
    closed = jax.make_jaxpr(fn)(like)
    parts = []
    for c in closed.consts:
        if isinstance(c, jax.Array) and not isinstance(c, np.ndarray):
            parts.append(_ById(c))
        else:
            a = np.asarray(c)
            digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
            parts.append(("numpy", a.shape, a.dtype.str, digest))
    return (str(closed.jaxpr), like.shape, str(like.dtype), tuple(parts))


def _cached(key: tuple, build: Callable) -> Callable:
    try:
        hash(key)
    except TypeError:
        return build()
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = _CACHE[key] = build()
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return value


def _root_attack(fn: Callable, restarts: int, steps: int) -> Callable:
    @jax.jit
    def attack(key, box, spec, threshold, mask):
        def margin(x):
            return margin_of(fn, x, spec, threshold, mask)

        step = 4 * (box.upper - box.lower) / steps
        return pgd(margin, box, starts(key, box, restarts), steps, step)

    return attack


def _split(
    parents: dict, split: str, split_vars: list[int], pivots: dict
) -> tuple[dict, np.ndarray]:
    """Two children per parent; also the indices of parents that cannot be split."""
    n = len(parents["lower"])
    lows, ups, clamps, stuck = [], [], {r: ([], []) for r in split_vars}, []
    for i in range(n):
        lo, up = parents["lower"][i], parents["upper"][i]
        cl = {r: (parents["clamps"][r][0][i], parents["clamps"][r][1][i]) for r in split_vars}
        relu = None
        if split == "relu":
            best = -np.inf
            for r in split_vars:
                s = parents["s_relu"][r][i]
                j = int(np.argmax(s))
                if s.reshape(-1)[j] > best:
                    best, relu = s.reshape(-1)[j], (r, j)
        if relu is not None:
            r, j = relu
            px = np.broadcast_to(pivots[r], cl[r][0].shape).reshape(-1)[j]
            a_lo, i_hi = cl[r][0].copy().reshape(-1), cl[r][1].copy().reshape(-1)
            a_lo[j] = max(a_lo[j], px)
            i_hi[j] = min(i_hi[j], px)
            a_lo, i_hi = a_lo.reshape(cl[r][0].shape), i_hi.reshape(cl[r][1].shape)
            lows += [lo, lo]
            ups += [up, up]
            for q in split_vars:
                active = (a_lo, cl[q][1]) if q == r else cl[q]
                inactive = (cl[q][0], i_hi) if q == r else cl[q]
                for c in (active, inactive):
                    clamps[q][0].append(c[0])
                    clamps[q][1].append(c[1])
            continue
        width = (up - lo).reshape(-1)
        score = parents["s_in"][i].reshape(-1)
        score = np.where(width > 0, score + 1e-9 * width / max(width.max(), 1e-300), -np.inf)
        d = int(np.argmax(score))
        mid = lo.reshape(-1)[d] + width[d] / 2
        if not (width[d] > 0 and lo.reshape(-1)[d] < mid < up.reshape(-1)[d]):
            stuck.append(i)
            continue
        up1, lo2 = up.copy().reshape(-1), lo.copy().reshape(-1)
        up1[d], lo2[d] = mid, mid
        lows += [lo, lo2.reshape(lo.shape)]
        ups += [up1.reshape(up.shape), up]
        for q in split_vars:
            for _ in range(2):
                clamps[q][0].append(cl[q][0])
                clamps[q][1].append(cl[q][1])
    shape = parents["lower"].shape[1:]
    dt = parents["lower"].dtype
    out = {
        "lower": np.asarray(lows, dt).reshape((-1,) + shape),
        "upper": np.asarray(ups, dt).reshape((-1,) + shape),
        "clamps": {
            q: (
                np.asarray(clamps[q][0], dt).reshape((-1,) + parents["clamps"][q][0].shape[1:]),
                np.asarray(clamps[q][1], dt).reshape((-1,) + parents["clamps"][q][1].shape[1:]),
            )
            for q in split_vars
        },
    }
    return out, np.asarray(stuck, int)
