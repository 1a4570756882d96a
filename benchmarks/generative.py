"""Generative samplers: EDICT against DDIM, and sampler compile time against the step count.

Targets (issue 6, reference/generative.md):

* EDICT (``edict_sample`` / ``edict_invert``) <= 2.1x the wall time of DDIM
  (``ddim_sample`` / ``ddim_invert``) for the same number of steps: EDICT makes exactly two
  model evaluations per step against DDIM's one, and its coupling and mixing layers should
  add almost nothing on top. The model evaluations are counted at run time (a
  ``jax.debug.callback`` in a separate, untimed run), not assumed.
* Compile time (trace + lower + XLA compile) of each sampler at ``num_steps = 500`` <= 1.5x
  that at ``num_steps = 10``: every sampler is one ``lax.scan``, so it should not grow with
  the number of steps.

The model is a tanh MLP ``eps(x, t, cond)`` (``--dim`` -> ``--hidden`` -> ``--hidden`` ->
``--dim``, time and condition added to the first layer) on a batch of ``--batch`` samples,
big enough that the model dominates a step, as it does for any real diffusion model. Run
times are the median of ``--repeats`` (>= 5) calls after a warm-up call, with
``block_until_ready``; the rounds interleave the cases so that background load affects them
alike. Compile times are the median of ``--compile-repeats`` fresh functions (a new Python
function per measurement, so no JAX cache can hide tracing or compilation).

Run: ``python benchmarks/generative.py [--steps 50] [--repeats 9]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.random as jr

from linjax import generative as gen


def _mlp_eps(dim: int, hidden: int, cond_dim: int, key: jax.Array) -> Callable:
    k1, k2, k3, k4 = jr.split(key, 4)
    w1 = jr.normal(k1, (dim, hidden)) / jnp.sqrt(dim)
    w2 = jr.normal(k2, (hidden, hidden)) / jnp.sqrt(hidden)
    w3 = jr.normal(k3, (hidden, dim)) / jnp.sqrt(hidden)
    wc = jr.normal(k4, (cond_dim, hidden)) / jnp.sqrt(cond_dim)

    def eps_fn(x, t, cond):
        h = jnp.tanh(x @ w1 + cond @ wc + jnp.sin(t.astype(x.dtype) / 100))
        h = jnp.tanh(h @ w2)
        return h @ w3 + 0.3 * x

    return eps_fn


def _time_interleaved(cases: dict[str, tuple[Callable, tuple]], repeats: int) -> dict[str, float]:
    """Median seconds per case; rounds interleave the cases so load drift hits all alike."""
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, (fn, args) in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _count_evaluations(run: Callable[[Callable], object], eps_fn: Callable) -> int:
    """Model evaluations made at run time by ``run(eps_fn)``, counted with a host callback."""
    count = [0]

    def counted(x, t, cond):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return eps_fn(x, t, cond)

    jax.block_until_ready(run(counted))
    jax.effects_barrier()
    return count[0]


def _compile_seconds(make: Callable[[], Callable], args: tuple, repeats: int) -> float:
    """Median trace + lower + compile time of ``repeats`` fresh functions."""
    times = []
    for _ in range(repeats):
        fn = make()  # a new function object: nothing cached from the previous round
        t0 = time.perf_counter()
        jax.jit(fn).lower(*args).compile()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compile-repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats={args.repeats} must be >= 5")

    cond_dim, n = 8, args.steps
    eps_fn = _mlp_eps(args.dim, args.hidden, cond_dim, jr.key(0))
    schedule = gen.linear_schedule()
    x = jr.normal(jr.key(1), (args.batch, args.dim))
    cond = jr.normal(jr.key(2), (args.batch, cond_dim))
    pair = gen.EDICTState(x, x)

    runs = {
        "ddim_sample": (lambda e, x, c: gen.ddim_sample(e, x, schedule, num_steps=n, cond=c), x),
        "edict_sample": (
            lambda e, st, c: gen.edict_sample(e, st, schedule, num_steps=n, cond=c),
            pair,
        ),
        "ddim_invert": (lambda e, x, c: gen.ddim_invert(e, x, schedule, num_steps=n, cond=c), x),
        "edict_invert": (
            lambda e, x, c: gen.edict_invert(e, x, schedule, num_steps=n, cond=c),
            x,
        ),
    }
    cases = {
        name: (jax.jit(lambda s, c, run=run: run(eps_fn, s, c)), (start, cond))
        for name, (run, start) in runs.items()
    }
    medians = _time_interleaved(cases, args.repeats)
    nfe = {
        name: _count_evaluations(lambda e, run=run, start=start: run(e, start, cond), eps_fn)
        for name, (run, start) in runs.items()
    }

    print(
        f"tanh MLP eps {args.dim}-{args.hidden}-{args.hidden}-{args.dim}, batch {args.batch}, "
        f"{jnp.dtype(x.dtype).name}, {n} steps, device {jax.devices()[0].device_kind}, "
        f"median of {args.repeats}"
    )
    print(f"| {'sampler':<14} | {'time (ms)':>9} | {'model evals':>11} | {'x DDIM':>6} | target |")
    print(f"|{'-' * 16}|{'-' * 11}|{'-' * 13}|{'-' * 8}|{'-' * 8}|")
    verdicts = []
    for kind in ("sample", "invert"):
        base = medians[f"ddim_{kind}"]
        for algo in ("ddim", "edict"):
            name = f"{algo}_{kind}"
            ratio = medians[name] / base
            target = "<= 2.1" if algo == "edict" else ""
            print(
                f"| {name:<14} | {1e3 * medians[name]:9.2f} | {nfe[name]:11d} | {ratio:6.2f} | "
                f"{target:>6} |"
            )
            if algo == "edict":
                verdict = "meets" if ratio <= 2.1 else "MISSES"
                verdicts.append(
                    f"{name}: {ratio:.2f}x {f'ddim_{kind}'} with {nfe[name]} / "
                    f"{nfe[f'ddim_{kind}']} model evaluations, {verdict} the target of 2.1x"
                )

    # Compile time against the number of steps (every sampler is one lax.scan).
    few, many = 10, 500
    print(
        "\ncompile time (trace + lower + compile), median of "
        f"{args.compile_repeats} fresh functions"
    )
    print(
        f"| {'sampler':<14} | {f'{few} steps (s)':>13} | {f'{many} steps (s)':>14} "
        "| ratio | target |"
    )
    print(f"|{'-' * 16}|{'-' * 15}|{'-' * 16}|{'-' * 7}|{'-' * 8}|")
    for name, (_, start) in runs.items():
        fn, secs = getattr(gen, name), {}
        for steps in (few, many):
            make = lambda fn=fn, steps=steps: (
                lambda s, c: fn(eps_fn, s, schedule, num_steps=steps, cond=c)
            )
            secs[steps] = _compile_seconds(make, (start, cond), args.compile_repeats)
        ratio = secs[many] / secs[few]
        print(
            f"| {name:<14} | {secs[few]:13.3f} | {secs[many]:14.3f} | {ratio:5.2f} "
            f"| {'<= 1.5':>6} |"
        )
        verdict = "meets" if ratio <= 1.5 else "MISSES"
        verdicts.append(
            f"{name} compile time: {ratio:.2f}x from {few} to {many} steps, {verdict} 1.5x"
        )

    # ------------------------------------------------------------------------------------
    # cfg_projection_sample (CFG manifold projection, issue 6 part 2): model evaluations
    # (counted at run time) and wall time against plain CFG Euler sampling at the same steps.
    # The same MLP serves as a flow velocity v(t, x, cond), t in [0, 1]; null cond = zeros.
    # Expected evaluations: 2N for CFG, plus 2K per projected step (t_i < t_max) for CFG-MP.
    # ------------------------------------------------------------------------------------
    scale, null = 2.0, jnp.zeros_like(cond)
    print(
        f"\ncfg_projection_sample vs plain CFG Euler (scale {scale}, K=2 fixed-point iterations, "
        f"t_max=0.6), median of {args.repeats}"
    )
    print(
        f"| {'sampler':<28} | {'steps':>5} | {'time (ms)':>9} | {'model evals':>11} "
        f"| {'x CFG time':>10} | {'x CFG evals':>11} |"
    )
    print(f"|{'-' * 30}|{'-' * 7}|{'-' * 11}|{'-' * 13}|{'-' * 12}|{'-' * 13}|")
    for n_cfg in sorted({10, n}):
        flow_runs = {
            "plain CFG (sample_ode)": lambda e, x, c, n_cfg=n_cfg: gen.sample_ode(
                lambda t, z: gen.cfg(e(z, t, c), e(z, t, null), scale), x, num_steps=n_cfg
            ),
            "CFG-MP (Picard)": lambda e, x, c, n_cfg=n_cfg: gen.cfg_projection_sample(
                lambda t, z, cc: e(z, t, cc),
                x,
                c,
                scale=scale,
                num_steps=n_cfg,
                anderson_window=0,
                null_cond=null,
            ),
            "CFG-MP+ (Anderson, m=1)": lambda e, x, c, n_cfg=n_cfg: gen.cfg_projection_sample(
                lambda t, z, cc: e(z, t, cc), x, c, scale=scale, num_steps=n_cfg, null_cond=null
            ),
        }
        flow_cases = {
            name: (jax.jit(lambda s, c, run=run: run(eps_fn, s, c)), (x, cond))
            for name, run in flow_runs.items()
        }
        flow_medians = _time_interleaved(flow_cases, args.repeats)
        flow_nfe = {
            name: _count_evaluations(lambda e, run=run: run(e, x, cond), eps_fn)
            for name, run in flow_runs.items()
        }
        base_name = "plain CFG (sample_ode)"
        projected = sum(1 for i in range(n_cfg) if i / n_cfg < 0.6)
        for name in flow_runs:
            t_ratio = flow_medians[name] / flow_medians[base_name]
            e_ratio = flow_nfe[name] / flow_nfe[base_name]
            print(
                f"| {name:<28} | {n_cfg:5d} | {1e3 * flow_medians[name]:9.2f} "
                f"| {flow_nfe[name]:11d} | {t_ratio:10.2f} | {e_ratio:11.2f} |"
            )
        mp = "CFG-MP+ (Anderson, m=1)"
        expected = 2 * n_cfg + 2 * 2 * projected
        overhead = (flow_medians[mp] / flow_medians[base_name]) / (
            flow_nfe[mp] / flow_nfe[base_name]
        )
        verdict = "as documented" if flow_nfe[mp] == expected else "NOT as documented"
        verdicts.append(
            f"cfg_projection_sample at {n_cfg} steps: {flow_nfe[mp]} model evaluations per sample "
            f"vs {flow_nfe[base_name]} for plain CFG ({verdict}: 2N + 4 x {projected} projected "
            f"= {expected}); time per evaluation {overhead:.2f}x plain CFG's"
        )

    print()
    for line in verdicts:
        print(line)


if __name__ == "__main__":
    main()
