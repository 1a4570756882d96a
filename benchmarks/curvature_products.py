"""Cost of one HVP / GGN-vector product relative to one gradient, on the digits MLP.

Targets (reference/curvature.md §7, issue 3): ``hvp`` <= 3x and ``ggn`` <= 2.5x the time of
one gradient on the same batch. Everything is jitted, timed as the median of ``--repeats``
runs after a warm-up call, with ``block_until_ready``; the runs of all cases are interleaved
round by round so that background load affects them alike. Two costs are reported per product:

* *from scratch*: build the product at ``params`` and apply it once (what a single product
  costs, linearisation included), and
* *per matvec*: build once and apply it to ``--num-vectors`` vectors in a ``lax.map``
  (how Lanczos, CG and Hutchinson use it), divided by the number of vectors.

Baselines measured in the same run: the plain ``jax.jvp(jax.grad(f))`` HVP and a GGN product
from ``jax.jvp`` + ``jax.vjp`` that re-runs the forward pass per matvec.

Run: ``python benchmarks/curvature_products.py [--hidden 256] [--repeats 7]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from jax import lax

from linjax import _tree, data
from linjax import curvature as cv


def _mlp(hidden: int, depth: int, key: jax.Array):
    sizes = [64] + [hidden] * depth + [10]
    params = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (a, b)) / jnp.sqrt(a), "b": jnp.zeros(b)})

    def apply(params, x):
        for layer in params[:-1]:
            x = jnp.tanh(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    return apply, params


def _time_interleaved(cases: dict, params, *, repeats: int) -> dict[str, float]:
    """Median seconds per case; rounds interleave the cases so load drift hits all alike."""
    for fn, arg in cases.values():
        jax.block_until_ready(fn(params, arg))  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, arg) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(params, arg))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--num-vectors", type=int, default=10)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats={args.repeats} must be >= 5")

    digits = data.load_digits()
    x, y = digits.x_train, digits.y_train
    apply, params = _mlp(args.hidden, args.depth, jax.random.key(0))
    batch = (x, y)
    d = _tree.tree_size(params)
    v = _tree.tree_random_like(jax.random.key(1), params)
    V = jax.tree.map(lambda a: jnp.stack([a * (i + 1) for i in range(args.num_vectors)]), v)
    k = args.num_vectors

    def loss(p, x, y):
        return cv.softmax_cross_entropy(apply(p, x), y)

    def ggn_jvp_vjp(p, u):  # baseline: forward pass re-run inside every product
        f = lambda q: apply(q, x)
        out, jv = jax.jvp(f, (p,), (u,))
        hjv = jax.jvp(jax.grad(lambda z: cv.softmax_cross_entropy(z, y)), (out,), (jv,))[1]
        return jax.vjp(f, p)[1](hjv)[0]

    def hvp_jvp_grad(p, u):  # baseline: forward-over-reverse without linearize
        return jax.jvp(lambda q: jax.grad(loss)(q, x, y), (p,), (u,))[1]

    cases = {
        "gradient": (jax.jit(lambda p, u: jax.grad(loss)(p, x, y)), v),
        "hvp (linjax)": (jax.jit(lambda p, u: cv.hvp(loss, p, x, y)(u)), v),
        "hvp (jvp of grad, baseline)": (jax.jit(hvp_jvp_grad), v),
        "ggn (linjax)": (
            jax.jit(lambda p, u: cv.ggn(apply, cv.softmax_cross_entropy, p, batch)(u)),
            v,
        ),
        "ggn (jvp + vjp, baseline)": (jax.jit(ggn_jvp_vjp), v),
        "empirical fisher (linjax)": (jax.jit(lambda p, u: cv.fisher(apply, p, batch)(u)), v),
        f"hvp (linjax), per matvec of {k}": (
            jax.jit(lambda p, U: lax.map(cv.hvp(loss, p, x, y), U)),
            V,
        ),
        f"hvp (jvp of grad), per matvec of {k}": (
            jax.jit(lambda p, U: lax.map(lambda u: hvp_jvp_grad(p, u), U)),
            V,
        ),
        f"ggn (linjax), per matvec of {k}": (
            jax.jit(lambda p, U: lax.map(cv.ggn(apply, cv.softmax_cross_entropy, p, batch), U)),
            V,
        ),
        f"ggn (jvp + vjp), per matvec of {k}": (
            jax.jit(lambda p, U: lax.map(lambda u: ggn_jvp_vjp(p, u), U)),
            V,
        ),
    }
    medians = _time_interleaved(cases, params, repeats=args.repeats)
    results = {name: t / k if "per matvec" in name else t for name, t in medians.items()}

    sizes = [64] + [args.hidden] * args.depth + [10]
    print(
        f"digits MLP {'-'.join(map(str, sizes))} (tanh), d = {d} parameters, batch "
        f"{x.shape[0]}, {jnp.dtype(x.dtype).name}, device {jax.devices()[0].device_kind}, "
        f"median of {args.repeats}"
    )
    grad_t = results["gradient"]
    targets = {"hvp (linjax)": 3.0, "ggn (linjax)": 2.5}
    print(f"| {'operation':<40} | {'time (ms)':>9} | {'x gradient':>10} | {'target':>6} |")
    print(f"|{'-' * 42}|{'-' * 11}|{'-' * 12}|{'-' * 8}|")
    for name, t in results.items():
        target = targets.get(name)
        tgt = f"<= {target:g}" if target else ""
        print(f"| {name:<40} | {1e3 * t:9.3f} | {t / grad_t:10.2f} | {tgt:>6} |")
    for name, target in targets.items():
        ratio = results[name] / grad_t
        verdict = "meets" if ratio <= target else "MISSES"
        print(f"{name}: {ratio:.2f}x the gradient, {verdict} the target of {target:g}x")


if __name__ == "__main__":
    main()
