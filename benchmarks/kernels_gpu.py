"""GPU timings of the Pallas attention kernels against cuDNN / XLA attention and the roofline.

Shapes and targets from reference/kernels.md §6 (H100: 989 TFLOP/s bf16, 3.35 TB/s HBM):

* sliding-window attention (Liger's SWA), B=1, T=8192, H=32, D=128, window 64, bf16: memory
  bound; target <= 2x the HBM roofline of reading q, k, v and writing o (~0.16 ms). Baselines:
  ``jax.nn.dot_product_attention(..., local_window_size=(w - 1, 0))`` with cuDNN and with XLA.
* gated linear attention, B=1, T=8192, H=32, K=V=128, chunk 64, bf16: target forward
  <= 0.3 ms, forward + backward <= 3x forward. Baselines: our blocked XLA implementation and
  causal full attention (cuDNN).
* ``gla_decode_step``: achieved bandwidth on the state (read + write, fp32), target >= 70 %
  of HBM.
* ``local_attention_2d`` (CLEAR) on a 64x64 and a 128x128 grid, r = 8, 8 heads, D = 128:
  speed-up over cuDNN dense attention (which cannot express the circular mask, so it is a
  lower bound on the cost of dense masked attention).

Effective TFLOP/s count only the needed work (``4 D`` per visible query-key pair; GLA:
``2 T (C K + K V) H`` forward, the chunkwise count); GB/s count the minimal HBM traffic.
Median of ``--repeats`` runs after warm-up, ``block_until_ready``.

Run on a machine with a GPU: ``python benchmarks/kernels_gpu.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from linjax import kernels_pallas as kp

PEAK_TFLOPS = 989.0  # H100 SXM dense bf16
PEAK_TBS = 3.35


def _median_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _grad_all(fn, argnums):
    def loss(*args):
        out = fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in out)

    return jax.jit(jax.grad(loss, argnums=argnums))


def _row(name, ms, base_ms=None, flops=None, nbytes=None):
    tf = f"{flops / ms / 1e9:8.1f}" if flops else "       -"
    gb = f"{nbytes / ms / 1e6:8.0f}" if nbytes else "       -"
    ratio = f"{ms / base_ms:6.2f}" if base_ms else "     -"
    print(f"{name:58s} {ms:9.3f} {tf} {gb} {ratio}", flush=True)


def _header(title):
    print(f"\n{title}")
    print(f"{'case':58s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>8s} {'/base':>6s}")


def bench_local_attention(repeats: int, b=1, t=8192, h=32, d=128, w=64):
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q, k, v = (jax.random.normal(x, (b, t, h, d), jnp.bfloat16) for x in (kq, kk, kv))
    visible = w * t - w * (w - 1) // 2
    flops = 4 * d * h * b * visible
    nbytes = 4 * b * t * h * d * 2
    ours = jax.jit(lambda q, k, v: kp.local_attention(q, k, v, window=w, impl="pallas"))
    cases = {"pallas": ours}
    for impl in ("cudnn", "xla"):
        cases[impl] = jax.jit(
            lambda q, k, v, impl=impl: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, local_window_size=(w - 1, 0), implementation=impl
            )
        )
    _header(f"local_attention (causal SWA) B={b} T={t} H={h} D={d} w={w} bf16")
    fwd = {}
    for name, fn in cases.items():
        try:
            fwd[name] = _median_ms(fn, q, k, v, repeats=repeats)
        except Exception as e:  # a baseline the installed jax cannot run
            print(f"{name}: unavailable ({type(e).__name__}: {str(e)[:120]})")
    base = fwd.get("cudnn")
    for name, ms in fwd.items():
        _row(f"fwd {name}", ms, base, flops, nbytes)
    print(f"HBM roofline fwd {nbytes / PEAK_TBS / 1e9:.3f} ms; target <= 2x")
    for name, fn in cases.items():
        if name not in fwd:
            continue
        ms = _median_ms(_grad_all(fn, (0, 1, 2)), q, k, v, repeats=repeats)
        _row(f"fwd+bwd {name}", ms, None, 3.5 * flops, 3 * nbytes)


def bench_gla(repeats: int, b=1, t=8192, h=32, d=128, c=64):
    kq, kk, kv, kg = jax.random.split(jax.random.key(1), 4)
    q, k, v = (jax.random.normal(x, (b, t, h, d), jnp.bfloat16) for x in (kq, kk, kv))
    g = (jax.nn.log_sigmoid(jax.random.normal(kg, (b, t, h, d))) / 16).astype(jnp.bfloat16)
    flops = 2 * b * t * h * (c * d + d * d) * 2
    nbytes = 5 * b * t * h * d * 2
    _header(f"gated_linear_attention B={b} T={t} H={h} K=V={d} C={c} bf16")
    fns = {
        impl: jax.jit(
            lambda q, k, v, g, impl=impl: kp.gated_linear_attention(
                q, k, v, g, chunk_size=c, impl=impl
            )
        )
        for impl in ("pallas", "xla")
    }
    full = jax.jit(
        lambda q, k, v, g: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn"
        )
    )
    fwd = {}
    for name, fn in {**fns, "causal full attention (cudnn)": full}.items():
        try:
            fwd[name] = _median_ms(fn, q, k, v, g, repeats=repeats)
        except Exception as e:  # report and go on with the other cases
            print(f"{name}: failed ({type(e).__name__}: {str(e)[:160]})")
    for name, ms in fwd.items():
        _row(f"fwd {name}", ms, fwd.get("xla"), flops if "full" not in name else None, nbytes)
    print(f"HBM roofline fwd {nbytes / PEAK_TBS / 1e9:.3f} ms; target <= 0.3 ms")
    for name, fn in fns.items():
        if name not in fwd:
            continue
        ms = _median_ms(_grad_all(fn, (0, 1, 2, 3)), q, k, v, g, repeats=repeats)
        _row(f"fwd+bwd {name} (ratio: to own fwd)", ms, fwd[name], 3 * flops, 2 * nbytes)

    _header(f"gla_decode_step B=8 H={h} K=V={d} fp32 state")
    bd = 8
    state = jnp.zeros((bd, h, d, d), jnp.float32)
    xs = [
        x[:bd, 0] if x.shape[0] >= bd else jnp.broadcast_to(x[:, 0], (bd, h, d))
        for x in (q, k, v, g)
    ]
    step = jax.jit(lambda s, q, k, v, g: kp.gla_decode_step(q, k, v, g, s)[1])
    ms = _median_ms(step, state, *xs, repeats=repeats)
    _row("decode step (GB/s over state read + write)", ms, None, None, 2 * state.nbytes)
    print(
        f"{bd / ms * 1e3:.0f} tokens/s per layer at batch {bd}; target >= "
        f"{0.7 * PEAK_TBS * 1e3:.0f} GB/s"
    )


def bench_local_attention_2d(repeats: int, side: int, h=8, d=128, r=8):
    if not hasattr(kp, "local_attention_2d"):
        print("local_attention_2d: not available in this checkout")
        return
    t = side * side
    kq, kk, kv = jax.random.split(jax.random.key(2), 3)
    q, k, v = (jax.random.normal(x, (1, t, h, d), jnp.bfloat16) for x in (kq, kk, kv))
    ours = jax.jit(
        lambda q, k, v: kp.local_attention_2d(
            q, k, v, grid_shape=(side, side), radius=r, impl="pallas"
        )
    )
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn"))
    _header(f"local_attention_2d {side}x{side} grid, r={r}, H={h}, D={d} bf16")
    base = _median_ms(dense, q, k, v, repeats=repeats)
    ms = _median_ms(ours, q, k, v, repeats=repeats)
    _row("dense attention, no mask (cudnn)", base, None, 4 * d * h * t * t, 4 * t * h * d * 2)
    _row("pallas (ratio: to dense)", ms, base, None, 4 * t * h * d * 2)
    print(f"speed-up over dense: {base / ms:.1f}x (target >= 5x at 2048^2-like sizes)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--only", choices=("local", "gla", "2d"), default=None)
    args = parser.parse_args(argv)
    print(f"device {jax.devices()[0].device_kind}, jax {jax.__version__}")
    if args.only in (None, "local"):
        bench_local_attention(args.repeats)
    if args.only in (None, "gla"):
        bench_gla(args.repeats)
    if args.only in (None, "2d"):
        for side in (64, 128):
            bench_local_attention_2d(args.repeats, side)


if __name__ == "__main__":
    main()
