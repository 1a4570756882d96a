"""IBP and CROWN on an MLP and a small CNN against auto_LiRPA (PyTorch, CPU), same weights.

Networks (ReLU, float32, random He-scaled weights from a fixed seed, identical in both):

* MLP 784-256-256-256-10;
* CNN 1x28x28 -> conv 16 4x4 stride 2 pad 1 -> conv 32 4x4 stride 2 pad 1 -> fc 100 -> 10.

Each is bounded on a batch of l_inf boxes (``--batch``, default 32) around uniform inputs:
ours with ``jax.jit(jax.vmap(lambda x: vf.crown(net, vf.Box.from_eps(x, eps))))`` (and
``vf.ibp``), auto_LiRPA with ``BoundedModule(...).compute_bounds(method="IBP" | "CROWN")``
on a ``BoundedTensor`` with ``PerturbationLpNorm(norm=inf, eps)``. Both use CROWN with
CROWN intermediate bounds and the adaptive ReLU lower slope. The bounds must agree:
``max |ours - theirs| <= 1e-5 * max |theirs|`` for every case, or the script fails.

Times are medians of ``--repeats`` calls after a warm-up call (``block_until_ready``;
torch is synchronous on CPU), rounds alternating ours and theirs for one method at a time
(so background load hits both alike, and auto_LiRPA never switches methods between
calls); our compile time is reported apart. The ratio column is ours / theirs (target
<= 1.0). A second table gives our boxes per second at ``--throughput-batch`` (256), CROWN
in chunks of 32 boxes (one jitted ``vmap`` call per chunk, as a data loader would feed
it; median of 3 passes for IBP, one pass for CROWN, after the compiling call). A
``jax.lax.map`` over the chunks inside one jit was 2.5x slower for the CNN with XLA:CPU
(jax 0.10.2), so it is not used.

auto_LiRPA is not a dependency of linjax: when ``import auto_LiRPA`` fails, the baseline
columns are skipped (install it from its repository checkout with ``pip install --no-deps``
plus ``tqdm appdirs graphviz onnx onnxscript``; its setup pins an older torch, but it runs).

Run: ``python benchmarks/verify.py [--quick] [--batch 32] [--eps 0.01]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from linjax import verify as vf

MLP_SIZES = (784, 256, 256, 256, 10)
RTOL = 1e-5


def make_weights(seed: int = 0) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """He-scaled random weights (float64 numpy) for both networks."""
    rng = np.random.default_rng(seed)

    def layer(shape, fan_in):
        return rng.normal(size=shape) / np.sqrt(fan_in), 0.1 * rng.normal(size=shape[0])

    mlp = [layer((o, i), i) for i, o in zip(MLP_SIZES[:-1], MLP_SIZES[1:], strict=True)]
    cnn = [
        layer((16, 1, 4, 4), 16),
        layer((32, 16, 4, 4), 256),
        layer((100, 32 * 7 * 7), 32 * 7 * 7),
        layer((10, 100), 100),
    ]
    return {"mlp": mlp, "cnn": cnn}


def jax_net(name: str, weights, dtype) -> Callable[[jax.Array], jax.Array]:
    """The network as a plain JAX function of one (unbatched) input."""
    params = [(jnp.asarray(w, dtype), jnp.asarray(b, dtype)) for w, b in weights]
    if name == "mlp":

        def mlp(x):
            h = x
            for i, (w, b) in enumerate(params):
                h = w @ h + b
                if i < len(params) - 1:
                    h = jax.nn.relu(h)
            return h

        return mlp

    def conv(x, w, b):
        y = jax.lax.conv_general_dilated(
            x[None], w, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")
        )[0]
        return y + b[:, None, None]

    (k1, c1), (k2, c2), (w3, b3), (w4, b4) = params

    def cnn(x):
        h = jax.nn.relu(conv(x, k1, c1))
        h = jax.nn.relu(conv(h, k2, c2))
        h = jax.nn.relu(w3 @ h.reshape(-1) + b3)
        return w4 @ h + b4

    return cnn


def torch_net(name: str, weights):
    """The same network as a ``torch.nn.Sequential`` (float32)."""
    import torch
    from torch import nn

    def set_(layer, w, b):
        layer.weight.data = torch.tensor(w, dtype=torch.float32)
        layer.bias.data = torch.tensor(b, dtype=torch.float32)
        return layer

    if name == "mlp":
        mods = []
        for i, (w, b) in enumerate(weights):
            mods.append(set_(nn.Linear(w.shape[1], w.shape[0]), w, b))
            if i < len(weights) - 1:
                mods.append(nn.ReLU())
        return nn.Sequential(*mods)
    (k1, c1), (k2, c2), (w3, b3), (w4, b4) = weights
    return nn.Sequential(
        set_(nn.Conv2d(1, 16, 4, 2, 1), k1, c1),
        nn.ReLU(),
        set_(nn.Conv2d(16, 32, 4, 2, 1), k2, c2),
        nn.ReLU(),
        nn.Flatten(),
        set_(nn.Linear(32 * 7 * 7, 100), w3, b3),
        nn.ReLU(),
        set_(nn.Linear(100, 10), w4, b4),
    )


def _load_auto_lirpa():
    if importlib.util.find_spec("auto_LiRPA") is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import auto_LiRPA
    logging.getLogger("auto_LiRPA").setLevel(logging.ERROR)
    return auto_LiRPA


def _time_interleaved(
    cases: dict[str, Callable[[], object]], repeats: int, warm_up: bool = True
) -> dict[str, float]:
    for fn in cases.values():
        if warm_up:
            jax.block_until_ready(fn())  # warm-up (compiled already)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            time.sleep(0.05)  # let the other library's worker threads go idle (not timed)
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _ms(t: float | None) -> str:
    return "-" if t is None else f"{1e3 * t:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eps", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--throughput-batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="batch 8, 256 -> 64 (smoke run)")
    parser.add_argument("--no-baseline", action="store_true", help="skip auto_LiRPA")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error(f"--repeats={args.repeats} must be >= 3")
    batch = 8 if args.quick else args.batch
    big = 64 if args.quick else args.throughput_batch
    eps = args.eps
    lirpa = None if args.no_baseline else _load_auto_lirpa()
    if lirpa is None:
        print("auto_LiRPA is not importable (or --no-baseline): baseline columns skipped\n")
    else:
        import torch

        print(
            f"baseline: auto_LiRPA {lirpa.__version__}, torch {torch.__version__} CPU, "
            f"{torch.get_num_threads()} threads"
        )
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, float32, eps = {eps}\n")

    weights = make_weights()
    rng = np.random.default_rng(1)
    shapes = {"mlp": (784,), "cnn": (1, 28, 28)}
    names = {"mlp": "MLP 784-256-256-256-10", "cnn": "CNN conv16-conv32-fc100-fc10"}
    methods = {"IBP": vf.ibp, "CROWN": vf.crown}
    rows, failures, throughput = [], [], []
    for net_name, shape in shapes.items():
        net = jax_net(net_name, weights[net_name], jnp.float32)
        x_np = rng.uniform(size=(big, *shape)).astype(np.float32)
        x = jnp.asarray(x_np[:batch])
        cases, ours = {}, {}
        for m_name, method in methods.items():

            def one(xi, method=method, net=net):
                return method(net, vf.Box.from_eps(xi, eps))

            f = jax.jit(jax.vmap(one))
            t0 = time.perf_counter()
            ours[m_name] = jax.block_until_ready(f(x))
            compile_s = time.perf_counter() - t0
            cases[("ours", m_name)] = lambda f=f, x=x: f(x)
            rows.append([names[net_name], m_name, compile_s])

            chunk = big if m_name == "IBP" else min(big, 32)
            g = jax.jit(jax.vmap(one))
            xb = [jnp.asarray(x_np[i : i + chunk]) for i in range(0, big, chunk)]

            def run_all(g=g, xb=xb):  # one jitted call per chunk
                return [g(xc) for xc in xb]

            jax.block_until_ready(run_all())  # compile + warm-up
            reps = 3 if m_name == "IBP" else 1
            t = _time_interleaved({"big": run_all}, reps, warm_up=False)
            throughput.append((names[net_name], m_name, big, chunk, big / t["big"]))
        if lirpa is not None:
            import torch

            model = torch_net(net_name, weights[net_name])
            with torch.no_grad():
                diff = np.abs(model(torch.tensor(x_np[:batch])).numpy() - jax.vmap(net)(x)).max()
            assert diff < 1e-4, f"{net_name}: the two networks differ by {diff}"
            bms = {}  # one BoundedModule per method: no state carried from one to the other
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for m_name in methods:
                    bms[m_name] = lirpa.BoundedModule(model, torch.zeros(1, *shape), device="cpu")
            bx = lirpa.BoundedTensor(
                torch.tensor(x_np[:batch]), lirpa.PerturbationLpNorm(norm=float("inf"), eps=eps)
            )

            def theirs(m_name, bms=bms, bx=bx):
                with torch.no_grad():
                    return bms[m_name].compute_bounds(x=(bx,), method=m_name)

            for m_name in methods:
                lo, hi = (v.numpy() for v in theirs(m_name))
                mine = ours[m_name]
                scale = max(np.abs(lo).max(), np.abs(hi).max())
                low, high = np.asarray(mine.lower), np.asarray(mine.upper)
                err = max(np.abs(low - lo).max(), np.abs(high - hi).max()) / scale
                if not err <= RTOL:
                    failures.append(f"{names[net_name]} {m_name}: relative difference {err:.2e}")
                cases[("theirs", m_name)] = lambda m_name=m_name, theirs=theirs: theirs(m_name)
                for r in rows:
                    if r[0] == names[net_name] and r[1] == m_name:
                        r.append(err)
                        r.append(float(np.mean(hi - lo)))
        times = {}
        for m_name in methods:  # interleave ours and theirs, one method at a time
            pair = {k: f for k, f in cases.items() if k[1] == m_name}
            times.update(_time_interleaved(pair, args.repeats))
        for r in rows:
            if r[0] == names[net_name]:
                r.insert(2, times[("ours", r[1])])
                r.insert(3, times.get(("theirs", r[1])))
        print(f"{names[net_name]}: done", flush=True)

    print(f"\n## Batch of {batch} boxes, eps = {eps} (median of {args.repeats}, after compile)\n")
    print(
        "| network | method | ours (ms) | auto_LiRPA (ms) | ratio | our compile (s) "
        "| rel. diff of bounds | mean width |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name, m_name, t_ours, t_theirs, compile_s = r[:5]
        err, width = (r[5], r[6]) if len(r) > 5 else (None, None)
        ratio = "-" if t_theirs is None else f"{t_ours / t_theirs:.2f}"
        print(
            f"| {name} | {m_name} | {_ms(t_ours)} | {_ms(t_theirs)} | {ratio} | "
            f"{compile_s:.1f} | {'-' if err is None else f'{err:.1e}'} | "
            f"{'-' if width is None else f'{width:.4g}'} |"
        )
    print(f"\n## Throughput at batch {big} (ours)\n")
    print("| network | method | boxes | chunk | boxes / s |")
    print("| --- | --- | --- | --- | --- |")
    for name, m_name, n, chunk, bps in throughput:
        print(f"| {name} | {m_name} | {n} | {chunk} | {bps:,.0f} |")
    if failures:
        raise SystemExit("bounds differ from auto_LiRPA:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
