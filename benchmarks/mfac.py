"""M-FAC products and window updates against the memory floor and the reference PyTorch code.

Targets (reference/curvature.md §7, issue 3), float32, d = 4,000,000, m = 64:

* ``mfac_ihvp`` <= 1.3x the memory floor: one ``G @ x`` plus one ``G.T @ c`` on the same
  ``[m, d]`` window, jitted, measured in this run. The IHVP cannot do with fewer passes
  (``c`` needs all of ``G x`` first).
* ``mfac_update`` <= 1.5x one pass ``G @ g`` over the window. The state is donated, as in
  a jitted training step, so the window is written in place rather than copied.
* The fused optax step (``mfac`` transform: push + product) is reported against the same
  two-pass floor.
* Only when ``import torch`` works and a checkout of IST-DASLab/M-FAC is given
  (``--mfac-repo PATH`` or ``LINJAX_MFAC_REPO``): the same operations with the reference's
  dynamic algorithm (``HInvFastUpMulti`` in its ``optim.py``, imported from the user's
  checkout, never copied here) on CPU in float32; target ratio <= 1.0. Two CPU shims are
  installed for it, both mathematically identical to what the reference runs on CUDA:
  ``torch.lu(A, pivot=False)`` (PyTorch implements unpivoted LU only on CUDA) is computed
  from the Cholesky factor ``A = C C^T`` as ``U = diag(C) C^T``, exact for the symmetric
  positive definite matrix it is applied to, and ``nn.parallel.parallel_apply`` (which
  needs an accelerator) runs its one-device list sequentially.

Each time is the median of ``--repeats`` (>= 5) calls after a warm-up call, with
``block_until_ready`` (``torch`` is synchronous on CPU); rounds interleave the cases so
background load affects them alike. The vectors are pytrees of 8 leaves, so the timings
include raveling them into the window's layout.

Run: ``python benchmarks/mfac.py [--quick] [--mfac-repo PATH]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from linjax import curvature as cv

_LEAVES = 8
_NUM_PUSHED = 4


def _tree(flat: jax.Array) -> dict:
    """A flat ``[..., d]`` array as a pytree of 8 two-dimensional leaves."""
    lead = flat.shape[:-1]
    parts = jnp.split(flat, _LEAVES, axis=-1)
    return {f"layer{i}": p.reshape(lead + (-1, 100)) for i, p in enumerate(parts)}


def _time_interleaved(cases: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in cases.values():
        jax.block_until_ready(fn())  # compile + warm up
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _load_reference(path: str):
    """Import ``optim.py`` from a user's IST-DASLab/M-FAC checkout, with the CPU shims."""
    import torch

    file = os.path.join(path, "optim.py")
    if not os.path.isfile(file):
        raise ImportError(f"no optim.py in {path!r} (expected an IST-DASLab/M-FAC checkout)")
    lu = torch.lu

    def lu_cpu(A, pivot=True, get_infos=False, out=None):
        if pivot or A.is_cuda:
            return lu(A, pivot=pivot, get_infos=get_infos, out=out)
        C = torch.linalg.cholesky(A)
        pivots = torch.arange(1, A.shape[-1] + 1, dtype=torch.int32)
        return torch.diagonal(C).unsqueeze(-1) * C.mT, pivots

    torch.lu = lu_cpu
    torch.nn.parallel.parallel_apply = lambda fns, inputs, *a, **k: [
        f(x) for f, x in zip(fns, inputs, strict=True)
    ]
    spec = importlib.util.spec_from_file_location("mfac_reference_optim", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return torch, module


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=4_000_000)
    parser.add_argument("--m", type=int, default=64)
    parser.add_argument("--damping", type=float, default=1e-5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="d = 200,000 (a smoke run)")
    parser.add_argument(
        "--mfac-repo",
        default=os.environ.get("LINJAX_MFAC_REPO"),
        help="path of an IST-DASLab/M-FAC checkout (default: $LINJAX_MFAC_REPO)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats={args.repeats} must be >= 5")
    d = 200_000 if args.quick else args.d
    if d % (_LEAVES * 100):
        parser.error(f"d={d} must be a multiple of {_LEAVES * 100}")
    m, damping = args.m, args.damping

    key_g, key_x, key_n = jax.random.split(jax.random.key(0), 3)
    # A full window of unit-norm rows sharing a common direction (correlated gradients).
    G = jax.random.normal(key_g, (m, d), jnp.float32)
    G = (G + jax.random.normal(key_n, (1, d), jnp.float32)) / jnp.sqrt(2.0 * d)
    state = jax.jit(cv.mfac_from_grads)(_tree(G), damping)
    G = state.grads  # the same buffer the library uses
    x_flat = jax.random.normal(key_x, (d,), jnp.float32)
    x = _tree(x_flat)
    # Pushed gradients: a few distinct ones from the same distribution, used in turn.
    pushed = jax.random.normal(key_x, (_NUM_PUSHED, d), jnp.float32) + G[:1] * jnp.sqrt(2.0 * d)
    pushed = [_tree(p / jnp.sqrt(2.0 * d)) for p in pushed]
    jax.block_until_ready((state, x, pushed))

    # The floor's second pass is written c @ G (row-major G streamed once, as in the library);
    # G.T @ c compiles to the same or a slower loop on CPU.
    floor_two = jax.jit(
        lambda G, x: jnp.matmul(jnp.matmul(G, x, precision="highest"), G, precision="highest")
    )
    floor_one = jax.jit(lambda G, x: jnp.matmul(G, x, precision="highest"))
    ihvp = jax.jit(cv.mfac_ihvp)
    ihvp_refine = jax.jit(lambda s, v: cv.mfac_ihvp(s, v, refine=1))
    # Donated: each call consumes the previous state (as in a training loop).
    update = jax.jit(cv.mfac_update, donate_argnums=0)
    opt = cv.mfac(num_grads=m, damping=damping)
    step = jax.jit(lambda u, s: opt.update(u, s), donate_argnums=1)

    # Donation needs a state the benchmark owns; copies keep `state` for the reference.
    holder = {
        "update": jax.tree.map(jnp.copy, state),
        "step": jax.tree.map(jnp.copy, state),
    }

    calls = {"update": 0, "step": 0}

    def run_update():
        g = pushed[calls["update"] % _NUM_PUSHED]
        calls["update"] += 1
        holder["update"] = update(holder["update"], g)
        return holder["update"].chol

    def run_step():
        g = pushed[calls["step"] % _NUM_PUSHED]
        calls["step"] += 1
        out, holder["step"] = step(g, holder["step"])
        return out

    cases = {
        "floor: G @ x + G.T @ c": lambda: floor_two(G, x_flat),
        "floor: one pass G @ g": lambda: floor_one(G, x_flat),
        "mfac_ihvp": lambda: ihvp(state, x),
        "mfac_ihvp, refine=1": lambda: ihvp_refine(state, x),
        "mfac_update (donated)": run_update,
        "mfac transform step (donated)": run_step,
    }
    t = _time_interleaved(cases, args.repeats)
    two, one = t["floor: G @ x + G.T @ c"], t["floor: one pass G @ g"]
    rows = [
        ("mfac_ihvp vs two passes", t["mfac_ihvp"], two, "<= 1.3"),
        ("mfac_ihvp refine=1 vs two passes", t["mfac_ihvp, refine=1"], two, "(4 more passes)"),
        ("mfac_update vs one pass", t["mfac_update (donated)"], one, "<= 1.5"),
        ("transform step vs two passes", t["mfac transform step (donated)"], two, "(fused)"),
    ]

    if args.mfac_repo:
        try:
            torch, ref = _load_reference(args.mfac_repo)
        except ImportError as e:
            print(f"(reference PyTorch comparison skipped: {e})")
        else:
            rows += _reference_rows(torch, ref, state, x, pushed, t, damping, args.repeats)
    else:
        print("(reference PyTorch comparison skipped: pass --mfac-repo PATH or LINJAX_MFAC_REPO)")
    gib = m * d * 4 / 2**30
    print(f"M-FAC, float32, d={d:,}, m={m}, window {gib:.2f} GiB, {jax.devices()[0].platform}")
    print(f"{'case':34} {'ours (ms)':>10} {'baseline (ms)':>14} {'ratio':>6}  target")
    for name, ours, base, target in rows:
        print(f"{name:34} {1e3 * ours:10.2f} {1e3 * base:14.2f} {ours / base:6.2f}  {target}")


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.asarray(a).reshape(-1) for a in jax.tree.leaves(tree)])


def _reference_rows(torch, ref, state, x, pushed, t, damping, repeats):
    cpu = torch.device("cpu")
    # A writable copy: the reference writes gradients into its window in place.
    window = torch.from_numpy(np.array(state.grads))
    hinv = ref.HInvFastUpMulti(window, cpu, [cpu], damp=damping)
    xt = torch.from_numpy(_flat(x))
    gts = [torch.from_numpy(_flat(g)) for g in pushed]
    # Same window, same maths: the reference's product equals ours to float32 accuracy.
    ours, theirs = _flat(cv.mfac_ihvp(state, x)), hinv.mul(xt).numpy()
    err = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    print(f"reference product vs ours on the same window: relative difference {err:.1e}")
    calls = [0]

    def next_grad():
        calls[0] += 1
        return gts[calls[0] % len(gts)]

    cases = {
        "mul": lambda: hinv.mul(xt),
        "update": lambda: hinv.update(next_grad()),
        "update_mul": lambda: hinv.update_mul(next_grad()),
    }
    r = _time_interleaved(cases, repeats)
    return [
        ("mfac_ihvp vs reference mul", t["mfac_ihvp"], r["mul"], "<= 1.0"),
        ("mfac_update vs reference update", t["mfac_update (donated)"], r["update"], "<= 1.0"),
        (
            "transform step vs update_mul",
            t["mfac transform step (donated)"],
            r["update_mul"],
            "<= 1.0",
        ),
    ]


if __name__ == "__main__":
    sys.exit(main())
