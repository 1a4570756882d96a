"""CPU timings of the attention kernels (impl="auto") against dense and sequential baselines.

Targets (issue 7): local_attention at ``T = 16384``, window 256, at least 10x faster than
dense masked attention; local_attention_2d on a 64 x 64 grid (4096 tokens), radius 8, at
least 5x faster than dense attention with the same mask; gated_linear_attention at
``T = 16384`` at least 5x faster than the naive per-token scan, and
``time(4T) / time(T) <= 4.5`` (linear in ``T``). Everything is jitted and timed as the
median of ``--repeats`` runs after a warm-up call, with ``block_until_ready``; the runs of
all cases are interleaved round by round so that background load affects them alike.
Baselines are measured in the same run:

* dense masked attention: ``jax.nn.dot_product_attention(..., is_causal=True,
  local_window_size=(window - 1, 0))`` (XLA, builds the ``[T, T]`` logits); for the 2-D
  window ``jax.nn.dot_product_attention(..., mask=<[T, T] disc mask>)``, the mask built
  once outside the timed call;
* naive scan: :func:`linjax.kernels_pallas.gated_linear_attention_reference`, one
  ``lax.scan`` step per token. GLA is timed forward-only and forward + backward (the
  gradient of the sum of the outputs and of the final state).

Run: ``python benchmarks/kernels.py [--seq-len 16384] [--repeats 5] [--grid 64 --radius 8]
[--only local_attention_2d]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from linjax import kernels_pallas as kp
from linjax.kernels_pallas._local_attention_2d import local_attention_2d_mask


def _time_interleaved(cases: dict, *, repeats: int) -> dict[str, float]:
    """Median seconds per case; rounds interleave the cases so load drift hits all alike."""
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, args) in cases.items():
            # One untimed call first: the previous case (a dense baseline freeing gigabytes)
            # must not charge its page faults and cold caches to this one.
            jax.block_until_ready(fn(*args))
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _fwd_bwd(fn):
    """Gradient of ``sum(o) + sum(final_state)`` w.r.t. every input: one training step."""

    def loss(*args):
        o, state = fn(*args)
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(state)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))


def _local_attention_cases(args, key):
    b, t, h, d, w = args.batch, args.seq_len, args.heads, args.head_dim, args.window
    q, k, v = jax.random.normal(key, (3, b, t, h, d), jnp.float32)
    ours = jax.jit(lambda q, k, v: kp.local_attention(q, k, v, window=w))
    dense = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(w - 1, 0), implementation="xla"
        )
    )
    size = f"T={t}, w={w}"
    return [("local_attention fwd", size, (ours, (q, k, v)), (dense, (q, k, v)), 10.0)]


def _gla_inputs(args, key, t):
    b, h, d = args.batch, args.heads, args.head_dim
    kq, kk, kv, kg = jax.random.split(key, 4)
    q, k, v = (jax.random.normal(kx, (b, t, h, d), jnp.float32) for kx in (kq, kk, kv))
    g = jax.nn.log_sigmoid(jax.random.normal(kg, (b, t, h, d), jnp.float32)) / 16
    return q, k, v, g


def _gla_cases(args, key):
    t = args.seq_len
    inputs = _gla_inputs(args, key, t)
    ours = lambda *a: kp.gated_linear_attention(*a)
    naive = lambda *a: kp.gated_linear_attention_reference(*a)
    return [
        ("gla fwd", f"T={t}", (jax.jit(ours), inputs), (jax.jit(naive), inputs), 5.0),
        ("gla fwd+bwd", f"T={t}", (_fwd_bwd(ours), inputs), (_fwd_bwd(naive), inputs), 5.0),
    ]


def _gla_scaling_cases(args, key):
    """Our GLA at T against itself at 4T: the ratio must stay near 4 (linear cost)."""
    t = args.seq_len
    ours = jax.jit(lambda *a: kp.gated_linear_attention(*a))
    big = (ours, _gla_inputs(args, key, 4 * t))
    small = (ours, _gla_inputs(args, key, t))
    return [("gla fwd, time(4T)/time(T)", f"T={t}", big, small, None)]


# --- local_attention_2d (CLEAR) -------------------------------------------------------------
def _local_attention_2d_cases(args, key):
    """CLEAR disc window on a ``grid x grid`` image (no prefix) vs dense masked attention."""
    grid, r = (args.grid, args.grid), args.radius
    b, t, h, d = args.batch, args.grid * args.grid, args.heads, args.head_dim
    q, k, v = jax.random.normal(key, (3, b, t, h, d), jnp.float32)
    mask = jnp.asarray(local_attention_2d_mask(grid, r))[None, None]  # built once, not timed
    ours = jax.jit(lambda q, k, v: kp.local_attention_2d(q, k, v, grid_shape=grid, radius=r))
    dense = jax.jit(
        lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m, implementation="xla")
    )
    size = f"{grid[0]}x{grid[1]}, r={r}"
    return [("local_attention_2d fwd", size, (ours, (q, k, v)), (dense, (q, k, v, mask)), 5.0)]


CASE_BUILDERS = (
    _local_attention_cases,
    _gla_cases,
    _gla_scaling_cases,
    _local_attention_2d_cases,
)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--grid", type=int, default=64, help="local_attention_2d grid side")
    parser.add_argument("--radius", type=int, default=8, help="local_attention_2d radius")
    parser.add_argument(
        "--only", default="", help="run only the case builders whose name contains this"
    )
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error(f"--repeats={args.repeats} must be >= 3")

    rows = []
    for i, build in enumerate(CASE_BUILDERS):
        if args.only in build.__name__:
            rows += build(args, jax.random.key(i))
    cases = {}
    for name, _, ours, base, _ in rows:
        cases[f"{name}: ours"] = ours
        cases[f"{name}: baseline"] = base
    medians = _time_interleaved(cases, repeats=args.repeats)

    print(
        f"batch {args.batch}, heads {args.heads}, head_dim {args.head_dim}, float32, "
        f"impl=auto ({jax.default_backend()}), device {jax.devices()[0].device_kind}, "
        f"median of {args.repeats}"
    )
    print(
        f"| {'operation':<26} | {'size':<14} | {'ours (ms)':>10} | {'baseline (ms)':>13} | "
        f"{'ratio':>7} | {'target':>8} |"
    )
    print(f"|{'-' * 28}|{'-' * 16}|{'-' * 12}|{'-' * 15}|{'-' * 9}|{'-' * 10}|")
    verdicts = []
    for name, size, _, _, target in rows:
        ours, base = medians[f"{name}: ours"], medians[f"{name}: baseline"]
        if target is None:  # scaling row: ours at 4T over ours at T, lower is better
            ratio, tgt, ok = ours / base, "<= 4.5", ours / base <= 4.5
        else:  # speed-up over the baseline, higher is better
            ratio, tgt, ok = base / ours, f">= {target:g}", base / ours >= target
        print(
            f"| {name:<26} | {size:<14} | {1e3 * ours:10.2f} | {1e3 * base:13.2f} | "
            f"{ratio:7.2f} | {tgt:>8} |"
        )
        verdicts.append(f"{name}: {ratio:.2f} ({'meets' if ok else 'MISSES'} {tgt})")
    print("\n".join(verdicts))


if __name__ == "__main__":
    main()
