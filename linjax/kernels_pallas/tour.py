"""The ``kernels`` section of ``linjax tour``: local and gated linear attention, Liger.

1. **Scaling.** Forward time and memory against sequence length of
   :func:`~linjax.kernels_pallas.local_attention` (1-D sliding window) and
   :func:`~linjax.kernels_pallas.gated_linear_attention` against dense causal attention
   (``jax.nn.dot_product_attention``), and of
   :func:`~linjax.kernels_pallas.local_attention_2d` (CLEAR) against dense attention with the
   same boolean mask. Memory is XLA's compiled buffer assignment
   (``compiled.memory_analysis().temp_size_in_bytes``: the scratch the forward pass needs
   beyond its inputs and outputs), measured, not estimated.
2. **Linearizing a tiny language model.** A character-level transformer with softmax
   attention is trained on real English text shipped with Python (``pydoc_data.topics``,
   the text of ``help()``), each attention layer is turned into a
   :class:`~linjax.kernels_pallas.layers.LigerAttention` by
   :func:`~linjax.kernels_pallas.layers.linearize` (same weights), and the result is briefly
   fine-tuned: held-out perplexity before, right after, and after fine-tuning.
3. **Decoding.** Tokens per second of one attention layer decoding with a KV cache (softmax),
   with the GLA state (:func:`~linjax.kernels_pallas.gla_decode_step`) and with Liger's state
   plus window ring buffer, against the context length; and of the two language models.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
from flax import nnx

from linjax import kernels_pallas as kp
from linjax._tour import TourContext, section
from linjax._tour_fit import fit
from linjax.kernels_pallas import layers
from linjax.kernels_pallas._local_attention_2d import local_attention_2d_mask

# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def median_time(fn: Callable, *args: Any, repeats: int = 3) -> float:
    """Median wall-clock seconds of ``fn(*args)`` after one warm-up (compiling) call."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_and_memory(fn: Callable, *args: Any) -> tuple[float, int]:
    """Median seconds of ``jit(fn)(*args)`` and the scratch bytes XLA assigns to it.

    One compilation serves both: the memory is the compiled executable's
    ``memory_analysis().temp_size_in_bytes`` (buffers beyond inputs and outputs).
    """
    compiled = jax.jit(fn).lower(*args).compile()
    analysis = compiled.memory_analysis()
    temp = int(analysis.temp_size_in_bytes) if analysis is not None else -1
    return median_time(compiled, *args), temp


def scaling_1d(
    seq_lens: list[int],
    *,
    window: int,
    dense_max: int,
    heads: int = 4,
    head_dim: int = 64,
    progress: Callable[[str], None] = print,
) -> dict[str, dict[int, tuple[float, int]]]:
    """``{method: {T: (seconds, temp bytes)}}`` for dense causal, sliding window and GLA."""
    methods = {
        "dense causal (XLA)": lambda q, k, v, g: jax.nn.dot_product_attention(
            q, k, v, is_causal=True
        ),
        f"local_attention (window {window})": lambda q, k, v, g: kp.local_attention(
            q, k, v, window=window
        ),
        "gated_linear_attention": lambda q, k, v, g: kp.gated_linear_attention(q, k, v, g)[0],
    }
    out: dict[str, dict[int, tuple[float, int]]] = {name: {} for name in methods}
    for t in seq_lens:
        q, k, v, x = jr.normal(jr.key(t), (4, 1, t, heads, head_dim), jnp.float32)
        g = jax.nn.log_sigmoid(x) / 16
        for name, fn in methods.items():
            if name.startswith("dense") and t > dense_max:
                continue
            progress(f"  T={t}: {name}")
            out[name][t] = time_and_memory(fn, q, k, v, g)
    return out


def scaling_2d(
    sides: list[int],
    *,
    radius: int,
    num_global: int,
    heads: int = 4,
    head_dim: int = 64,
    progress: Callable[[str], None] = print,
) -> dict[str, dict[int, tuple[float, int]]]:
    """``{method: {tokens: (seconds, temp bytes)}}`` for CLEAR vs dense masked, square grids."""
    out: dict[str, dict[int, tuple[float, int]]] = {
        "dense masked (XLA)": {},
        f"local_attention_2d (r={radius})": {},
    }
    for side in sides:
        t = num_global + side * side
        q, k, v = jr.normal(jr.key(side), (3, 1, t, heads, head_dim), jnp.float32)
        mask = jnp.asarray(local_attention_2d_mask((side, side), radius, num_global))
        fns = {
            "dense masked (XLA)": lambda q, k, v, mask=mask: jax.nn.dot_product_attention(
                q, k, v, mask=mask[None, None]
            ),
            f"local_attention_2d (r={radius})": lambda q, k, v, side=side: kp.local_attention_2d(
                q, k, v, grid_shape=(side, side), radius=radius, num_global=num_global
            ),
        }
        for name, fn in fns.items():
            progress(f"  {side}x{side} grid: {name}")
            out[name][t] = time_and_memory(fn, q, k, v)
    return out


# ---------------------------------------------------------------------------------------------
# A character-level language model
# ---------------------------------------------------------------------------------------------


def load_text() -> str:
    """The English text of Python's ``help()`` topics (``pydoc_data.topics``), ~465k chars."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


class Block(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.RMSNorm(dim, rngs=rngs)
        self.attn = layers.SoftmaxAttention(heads, dim, use_bias=False, rope_theta=1e4, rngs=rngs)
        self.norm2 = nnx.RMSNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def mlp(self, x):
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

    def __call__(self, x):
        return self.mlp(x + self.attn(self.norm1(x)))

    def prefill(self, x, max_len):
        h = self.norm1(x)
        if isinstance(self.attn, layers.SoftmaxAttention):
            y, cache = self.attn.prefill(h, max_len)
        else:
            y, cache = self.attn.prefill(h)
        return self.mlp(x + y), cache

    def decode_step(self, x, cache):
        y, cache = self.attn.decode_step(self.norm1(x), cache)
        return self.mlp(x + y), cache


class CharLM(nnx.Module):
    """Embedding, ``depth`` blocks, final norm, linear read-out to character logits."""

    def __init__(self, vocab: int, dim: int, depth: int, heads: int, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.RMSNorm(dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def prefill(self, tokens, max_len):
        x, caches = self.embed(tokens), []
        for block in self.blocks:
            x, cache = block.prefill(x, max_len)
            caches.append(cache)
        return self.head(self.norm(x)), caches

    def decode_step(self, token, caches):
        x, new = self.embed(token), []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.decode_step(x, cache)
            new.append(cache)
        return self.head(self.norm(x)), new


def linearize_lm(model: CharLM, *, window: int) -> CharLM:
    """A copy of ``model`` whose attention layers are :func:`layers.linearize`-d."""
    graphdef, state = nnx.split(model)
    new = nnx.merge(graphdef, state)  # a separate module tree on the same arrays
    for block in new.blocks:
        block.attn = layers.linearize(block.attn, window=window)
    return new


def windows(tokens: jax.Array, starts: jax.Array, length: int) -> jax.Array:
    return jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (length,)))(starts)


def train_lm(
    model: CharLM,
    tokens: jax.Array,
    *,
    steps: int,
    lr: float,
    batch: int,
    context: int,
    key: jax.Array,
) -> tuple[CharLM, np.ndarray]:
    """AdamW (cosine schedule, clipping) on next-character cross-entropy; one jitted scan."""
    graphdef, params = nnx.split(model, nnx.Param)
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(
            optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, 0.1 * lr),
            weight_decay=0.01,
        ),
    )

    def loss_fn(params, key):
        starts = jr.randint(key, (batch,), 0, tokens.shape[0] - context - 1)
        w = windows(tokens, starts, context + 1)
        logits = nnx.merge(graphdef, params)(w[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()

    params, losses = fit(loss_fn, params, opt, steps=steps, key=key)
    return nnx.merge(graphdef, params), losses


def perplexity(model: CharLM, eval_windows: jax.Array) -> float:
    """``exp`` of the mean next-character cross-entropy over ``[n, context + 1]`` windows."""
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def ce(params):
        logits = nnx.merge(graphdef, params)(eval_windows[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, eval_windows[:, 1:]).mean()

    return float(np.exp(ce(params)))


def generation_fns(model: CharLM, *, max_len: int, temperature: float = 0.8):
    """Jitted ``prefill(params, prompt)`` and ``decode(params, caches, token, key, n)``."""
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def prefill(params, prompt):
        logits, caches = nnx.merge(graphdef, params).prefill(prompt, max_len)
        return jnp.argmax(logits[:, -1], -1), caches

    def decode(params, caches, token, key, num):
        m = nnx.merge(graphdef, params)

        def step(carry, k):
            token, caches = carry
            logits, caches = m.decode_step(token, caches)
            token = jr.categorical(k, logits / temperature)
            return (token, caches), token

        (_, caches), out = jax.lax.scan(step, (token, caches), jr.split(key, num))
        return out.T

    return params, prefill, jax.jit(decode, static_argnums=4)


# ---------------------------------------------------------------------------------------------
# Decoding throughput of one layer against the context length
# ---------------------------------------------------------------------------------------------


def layer_decode_rate(layer: nnx.Module, *, batch: int, context: int, steps: int) -> float:
    """Tokens/s of ``steps`` decode steps of ``layer`` at ``context`` tokens of history."""
    graphdef, params = nnx.split(layer, nnx.Param)
    if isinstance(layer, layers.SoftmaxAttention):
        cache = layer.init_cache(batch, context)._replace(
            index=jnp.asarray(context - steps, jnp.int32)
        )
    else:
        cache = layer.init_cache(batch)
    xs = jr.normal(jr.key(0), (steps, batch, layer.in_features), jnp.float32)

    @jax.jit
    def run(params, cache, xs):
        m = nnx.merge(graphdef, params)
        return jax.lax.scan(lambda c, x: m.decode_step(x, c)[::-1], cache, xs)[1]

    return batch * steps / median_time(run, params, cache, xs)


# ---------------------------------------------------------------------------------------------
# The section
# ---------------------------------------------------------------------------------------------


def _part_scaling(ctx: TourContext) -> None:
    import matplotlib.pyplot as plt

    quick = ctx.quick
    seq_lens = [256, 1024, 2048] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    window = 128 if quick else 256
    dense_max = 2048 if quick else 8192
    ctx.progress("1-D scaling: dense causal vs sliding window vs GLA (forward, float32)")
    res1 = scaling_1d(seq_lens, window=window, dense_max=dense_max, progress=ctx.progress)
    sides = [16, 32] if quick else [16, 32, 48, 64]
    radius, num_global = (4 if quick else 8), 16
    ctx.progress(f"2-D scaling: CLEAR r={radius} vs dense masked (forward, float32)")
    res2 = scaling_2d(sides, radius=radius, num_global=num_global, progress=ctx.progress)

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (res, xlabel) in enumerate(
        [(res1, "sequence length T"), (res2, f"tokens ({num_global} global + side² grid)")]
    ):
        for name, pts in res.items():
            ts = sorted(pts)
            axes[0, col].loglog(ts, [1e3 * pts[t][0] for t in ts], "o-", label=name)
            axes[1, col].loglog(ts, [pts[t][1] / 2**20 for t in ts], "o-", label=name)
        axes[0, col].set(xlabel=xlabel, ylabel="forward time (ms, median)")
        axes[1, col].set(xlabel=xlabel, ylabel="XLA temp buffers (MiB, compiled)")
        ticks = sorted({t for pts in res.values() for t in pts})
        for ax in axes[:, col]:
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.xaxis.set_minor_locator(plt.NullLocator())
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    axes[0, 0].set_title("1-D causal: B=1, 4 heads, head_dim 64")
    axes[0, 1].set_title(f"2-D CLEAR window r={radius}: B=1, 4 heads, head_dim 64")
    fig.suptitle(
        f"CPU ({jax.devices()[0].device_kind}), impl='auto'; memory = "
        "compiled.memory_analysis().temp_size_in_bytes",
        fontsize=9,
    )
    fig.tight_layout()
    ctx.savefig(fig, "kernels_scaling.png")

    names1 = list(res1)
    t_cmp = max(t for t in seq_lens if t <= dense_max)
    dense, local, gla = (res1[n][t_cmp] for n in names1)
    ctx.headline(
        f"local attention speed-up over dense causal, T={t_cmp}", dense[0] / local[0], fmt=".1f"
    )
    ctx.headline(f"GLA speed-up over dense causal, T={t_cmp}", dense[0] / gla[0], fmt=".1f")
    ctx.headline(
        f"dense / local attention temp memory, T={t_cmp}", dense[1] / max(local[1], 1), fmt=".1f"
    )
    names2 = list(res2)
    t2 = max(res2[names2[0]])
    d2, l2 = res2[names2[0]][t2], res2[names2[1]][t2]
    ctx.headline(
        f"CLEAR 2-D speed-up over dense masked, {sides[-1]}x{sides[-1]} grid",
        d2[0] / l2[0],
        fmt=".1f",
    )
    t_big = seq_lens[-1]
    ratio = res1[names1[2]][t_big][0] / res1[names1[2]][seq_lens[0]][0]
    rows = "\n".join(
        f"| {t} | "
        + " | ".join(
            f"{1e3 * res1[n][t][0]:.1f} ms / {res1[n][t][1] / 2**20:.1f} MiB"
            if t in res1[n]
            else "—"
            for n in names1
        )
        + " |"
        for t in seq_lens
    )
    ctx.markdown(
        "**Scaling** (forward, float32, CPU, `impl='auto'`, median of 3 after compiling). "
        "Memory is XLA's compiled scratch (`memory_analysis().temp_size_in_bytes`), i.e. "
        "what the forward pass allocates beyond its inputs and output: dense attention "
        "materialises the `[T, T]` logits per head, the sliding window only `T x (window + "
        "block)` and GLA `T x chunk` plus the `[K, V]` states.\n\n"
        "| T | " + " | ".join(names1) + " |\n|---|---|---|---|\n" + rows + "\n\n"
        f"GLA time grows {ratio:.1f}x from T={seq_lens[0]} to T={t_big} "
        f"({t_big // seq_lens[0]}x the tokens): linear in T."
    )


def _part_lm(ctx: TourContext) -> tuple[CharLM, CharLM, jax.Array, list[str]]:
    import matplotlib.pyplot as plt

    quick = ctx.quick
    text = load_text()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    tokens = jnp.asarray([lookup[c] for c in text], jnp.int32)
    split = int(0.9 * tokens.shape[0])
    train_tokens, test_tokens = tokens[:split], tokens[split:]
    dim, depth, heads = 64, 2, 4
    context, window = (64, 8) if quick else (128, 16)
    steps, ft_steps = (150, 60) if quick else (800, 200)
    batch = 32
    eval_starts = jnp.arange(0, test_tokens.shape[0] - context - 1, context + 1)
    eval_starts = eval_starts[:: max(1, eval_starts.shape[0] // (64 if quick else 256))]
    eval_windows = windows(test_tokens, eval_starts, context + 1)

    ctx.progress(
        f"training a {depth}-layer softmax char LM (dim {dim}, context {context}, "
        f"{steps} steps) on pydoc_data.topics ({len(text):,} chars)"
    )
    t0 = time.perf_counter()
    model = CharLM(len(chars), dim, depth, heads, rngs=nnx.Rngs(0))
    model, losses = train_lm(
        model, train_tokens, steps=steps, lr=3e-3, batch=batch, context=context, key=jr.key(1)
    )
    t_train = time.perf_counter() - t0
    ppl_soft = perplexity(model, eval_windows)

    ctx.progress(f"linearize -> LigerAttention (window {window}), fine-tune {ft_steps} steps")
    liger = linearize_lm(model, window=window)
    ppl_lin = perplexity(liger, eval_windows)
    t0 = time.perf_counter()
    liger, ft_losses = train_lm(
        liger, train_tokens, steps=ft_steps, lr=1e-3, batch=batch, context=context, key=jr.key(2)
    )
    t_ft = time.perf_counter() - t0
    ppl_ft = perplexity(liger, eval_windows)
    ctx.progress("control: the softmax model trained for the same extra steps")
    soft_more, more_losses = train_lm(
        model, train_tokens, steps=ft_steps, lr=1e-3, batch=batch, context=context, key=jr.key(2)
    )
    ppl_more = perplexity(soft_more, eval_windows)
    gap = ppl_lin - ppl_soft  # > 0 unless linearizing cost nothing
    recovered = (ppl_lin - ppl_ft) / gap if gap > 0 else float("nan")

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    smooth = lambda a: np.convolve(a, np.ones(20) / 20, mode="valid")
    axes[0].plot(
        19 + np.arange(len(losses) - 19), np.exp(smooth(losses)), label="softmax pre-training"
    )
    x_ft = steps + 19 + np.arange(len(ft_losses) - 19)
    axes[0].plot(x_ft, np.exp(smooth(ft_losses)), label="Liger fine-tuning (after linearize)")
    axes[0].plot(x_ft, np.exp(smooth(more_losses)), label="softmax, same extra steps")
    axes[0].set(xlabel="step", ylabel="train perplexity (20-step mean)", yscale="log")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    bars = {
        "softmax": ppl_soft,
        "linearized\n(no training)": ppl_lin,
        f"Liger +{ft_steps}\nsteps": ppl_ft,
        f"softmax +{ft_steps}\nsteps": ppl_more,
    }
    axes[1].bar(list(bars), list(bars.values()), color=["C0", "C3", "C1", "C2"])
    for i, val in enumerate(bars.values()):
        axes[1].text(i, val, f"{val:.2f}", ha="center", va="bottom", fontsize=9)
    axes[1].set(ylabel="held-out perplexity", title=f"recovered {recovered:.0%} of the gap")
    fig.tight_layout()
    ctx.savefig(fig, "kernels_linearize.png")

    ctx.headline("char LM held-out perplexity: softmax", ppl_soft, fmt=".3f")
    ctx.headline("char LM held-out perplexity: linearized (Liger), no training", ppl_lin, fmt=".3f")
    ctx.headline(
        f"char LM held-out perplexity: Liger after {ft_steps} fine-tuning steps", ppl_ft, fmt=".3f"
    )
    ctx.headline("fraction of the perplexity gap recovered by fine-tuning", recovered, fmt=".1%")
    ctx.markdown(
        f"**Linearizing a character LM.** {depth} pre-norm blocks, width {dim}, {heads} heads, "
        f"rotary embeddings, context {context}, vocabulary {len(chars)} characters, trained "
        f"{steps} AdamW steps (batch {batch}, {t_train:.0f} s with compilation) on the first "
        f"90 % of `pydoc_data.topics` ({len(text):,} characters of English help text); "
        f"perplexity on {eval_windows.shape[0]} windows of the held-out last 10 %. "
        f"`linearize` replaces every attention layer by `LigerAttention` (window {window} keys "
        "including self, GLA gates from the key projection, same q/k/v/o arrays, no new "
        f"parameters); all parameters are then fine-tuned {ft_steps} steps ({t_ft:.0f} s; "
        "Liger itself uses LoRA).\n\n"
        "| model | held-out perplexity |\n|---|---|\n"
        f"| softmax | {ppl_soft:.3f} |\n| linearized, no training | {ppl_lin:.3f} |\n"
        f"| Liger + {ft_steps} steps | {ppl_ft:.3f} |\n"
        f"| softmax + {ft_steps} steps (control) | {ppl_more:.3f} |\n\n"
        f"Fraction of the gap recovered: (lin - ft) / (lin - softmax) = {recovered:.1%}. "
        "The control shows how much of that is just more training: the fair comparison for "
        f"the fine-tuned Liger model is the softmax model with the same extra steps "
        f"({ppl_more:.3f})."
    )
    return model, liger, test_tokens, chars


def _part_decode(
    ctx: TourContext, model: CharLM, liger: CharLM, test_tokens: jax.Array, chars: list[str]
) -> None:
    import matplotlib.pyplot as plt

    quick = ctx.quick
    dim, heads, batch, steps = 256, 4, 8, 32
    contexts = [256, 2048] if quick else [256, 1024, 4096, 16384, 32768]
    rngs = nnx.Rngs(0)
    layer_set = {
        "softmax + KV cache": layers.SoftmaxAttention(heads, dim, rope_theta=1e4, rngs=rngs),
        "GLA (gla_decode_step)": layers.GatedLinearAttention(
            heads, dim, key_dim=dim // heads, rngs=rngs
        ),
        "Liger (GLA + 64-key ring buffer)": layers.LigerAttention(
            heads, dim, rope_theta=1e4, window=64, rngs=rngs
        ),
    }
    ctx.progress(f"decode throughput of one layer (width {dim}, batch {batch}) vs context")
    rates: dict[str, dict[int, float]] = {n: {} for n in layer_set}
    for n, layer in layer_set.items():
        for c in contexts if n.startswith("softmax") else contexts[:1]:
            rates[n][c] = layer_decode_rate(layer, batch=batch, context=c, steps=steps)
        for c in contexts[1:]:
            rates[n].setdefault(c, rates[n][contexts[0]])  # O(1) state: same cost at any c

    prompt_len, num_new = 32, 64 if quick else 256
    max_len = prompt_len + num_new
    prompt = windows(test_tokens, jnp.arange(batch) * 997, prompt_len)
    lm_rates, samples = {}, {}
    for name, m in (("softmax + KV cache", model), ("Liger", liger)):
        params, prefill, decode = generation_fns(m, max_len=max_len)
        token, caches = prefill(params, prompt)
        secs = median_time(decode, params, caches, token, jr.key(3), num_new)
        lm_rates[name] = batch * num_new / secs
        out = np.asarray(decode(params, caches, token, jr.key(3), num_new))
        samples[name] = (
            "".join(chars[i] for i in np.asarray(prompt[0]))
            + "⟨"
            + "".join(chars[i] for i in out[0])
            + "⟩"
        )

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for n, pts in rates.items():
        cs = sorted(pts)
        ax.loglog(cs, [pts[c] for c in cs], "o-", label=n)
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.set(
        xlabel="context length (tokens of history)",
        ylabel="decode tokens / s",
        title=f"one attention layer, width {dim}, {heads} heads, batch {batch}",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    ctx.savefig(fig, "kernels_decode.png")
    c_max = contexts[-1]
    soft = rates["softmax + KV cache"][c_max]
    gla = rates["GLA (gla_decode_step)"][c_max]
    ctx.headline(f"decode tokens/s at context {c_max}: softmax + KV cache", soft, fmt=".0f")
    ctx.headline(f"decode tokens/s at context {c_max}: GLA state", gla, fmt=".0f")
    ctx.headline(
        "char LM decode tokens/s, Liger / softmax+KV cache",
        lm_rates["Liger"] / lm_rates["softmax + KV cache"],
        fmt=".2f",
    )
    ctx.markdown(
        f"**Decoding.** One layer, {steps} steps in a jitted `lax.scan`, batch {batch}: the "
        "softmax layer attends to a fixed-size KV cache of `context` tokens (cost grows with "
        "the context); GLA updates a `[heads, key_dim, value_dim]` state with "
        "`gla_decode_step` and Liger adds a 64-key ring buffer, so both cost the same at any "
        "context (measured once, drawn flat).\n\n"
        "| context | "
        + " | ".join(rates)
        + " |\n|---|---|---|---|\n"
        + "\n".join(
            f"| {c} | " + " | ".join(f"{rates[n][c]:,.0f}" for n in rates) + " |" for c in contexts
        )
        + f"\n\nThe char LMs at their short context ({max_len} tokens, KV cache barely "
        f"matters): softmax {lm_rates['softmax + KV cache']:,.0f} tokens/s, Liger "
        f"{lm_rates['Liger']:,.0f} tokens/s. Samples (prompt, then ⟨generated⟩, temperature "
        "0.8):\n\n" + "\n".join(f"* {n}: `{s!r}`" for n, s in samples.items())
    )


@section(
    "kernels", title="Kernels: local and gated linear attention, Liger linearization", order=50
)
def run(ctx: TourContext) -> None:
    """Scaling plots, linearize a char LM to Liger and fine-tune, decode throughput."""
    timings = {}
    t0 = time.perf_counter()
    _part_scaling(ctx)
    timings["scaling"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model, liger, test_tokens, chars = _part_lm(ctx)
    timings["char LM + linearize + fine-tune"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    _part_decode(ctx, model, liger, test_tokens, chars)
    timings["decoding"] = time.perf_counter() - t0
    ctx.markdown(
        "Time per part (with compilation): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
        + "."
    )
