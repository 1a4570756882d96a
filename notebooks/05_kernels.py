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
# # Kernels: local attention, gated linear attention and linearizing a language model
#
# `linjax.kernels_pallas` has three attention kernels, each with a Pallas kernel (GPU/TPU,
# interpreted on CPU), a blocked XLA implementation that `impl="auto"` picks on CPU, and a
# pure-jnp oracle:
#
# * `local_attention`: 1-D sliding-window softmax attention, $O(T \cdot w)$;
# * `local_attention_2d`: CLEAR's circular window over an image grid plus global tokens;
# * `gated_linear_attention` / `gla_decode_step`: GLA, a linear recurrence with per-channel
#   forget gates, chunkwise for training and one state update per token for decoding.
#
# `kp.layers` wraps them in flax (nnx) modules, and `linearize` turns a pretrained softmax
# attention layer into Liger attention ($0.5\cdot$sliding window $+\ 0.5\cdot$GLA) on the
# same weights. This notebook
#
# 1. measures time and memory against the sequence length, against dense attention;
# 2. trains a tiny character-level language model on real English text, linearizes it, and
#    fine-tunes it briefly, tracking held-out perplexity;
# 3. measures decoding throughput: KV cache vs a constant-size GLA state.

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
import statistics
import time

import jax
import jax.numpy as jnp
import jax.random as jr
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

from linjax import kernels_pallas as kp
from linjax.kernels_pallas import layers

QUICK = os.environ.get("LINJAX_NOTEBOOK_QUICK") == "1"
print("backend:", jax.default_backend(), "| quick mode:", QUICK)

# %% [markdown]
# ## The ops and their conventions
#
# Layouts are `[batch, seq, heads, head_dim]`, as in `jax.nn.dot_product_attention`.
# `window` counts the visible keys *including the query itself*: query $i$ sees keys
# $i - w + 1, \dots, i$. Every op agrees with its oracle.

# %%
q, k, v, x = jr.normal(jr.key(0), (4, 1, 300, 2, 32))
o = kp.local_attention(q, k, v, window=64)
print(
    "local_attention vs dense oracle:",
    float(jnp.max(jnp.abs(o - kp.local_attention_reference(q, k, v, window=64)))),
)

g = jax.nn.log_sigmoid(x) / 16  # log forget gates <= 0, as in GLA and Liger
o, state = kp.gated_linear_attention(q, k, v, g, chunk_size=64)
o_ref, state_ref = kp.gated_linear_attention_reference(q, k, v, g)  # one lax.scan step per token
print(
    "chunkwise GLA vs naive scan:", float(jnp.max(jnp.abs(o - o_ref))), "| final state", state.shape
)

# decoding continues from the state: the next token costs O(1) in the context length
o_next, state = kp.gla_decode_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], state)
print("decode step output:", o_next.shape)

# %% [markdown]
# ## 1. Time and memory against the sequence length
#
# Forward pass, float32, one sequence, 4 heads of 64. The baseline is
# `jax.nn.dot_product_attention` (causal, or with CLEAR's boolean mask for the 2-D case),
# which builds the `[T, T]` logits. Memory is *measured* from XLA's compiled buffer
# assignment: `jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes`, the scratch
# a call needs beyond its inputs and output.


# %%
def median_time(fn, *args, repeats=3):
    jax.block_until_ready(fn(*args))  # compile
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_and_memory(fn, *args):
    """Median time and XLA scratch (MiB) of jit(fn)(*args), from one compilation."""
    compiled = jax.jit(fn).lower(*args).compile()
    mib = compiled.memory_analysis().temp_size_in_bytes / 2**20
    return median_time(compiled, *args), mib


WINDOW = 128 if QUICK else 256
SEQ_LENS = [256, 1024, 2048] if QUICK else [512, 1024, 2048, 4096, 8192, 16384]
DENSE_MAX = 2048 if QUICK else 8192
methods_1d = {
    "dense causal": lambda q, k, v, g: jax.nn.dot_product_attention(q, k, v, is_causal=True),
    f"local_attention (w={WINDOW})": lambda q, k, v, g: kp.local_attention(q, k, v, window=WINDOW),
    "gated_linear_attention": lambda q, k, v, g: kp.gated_linear_attention(q, k, v, g)[0],
}
res_1d = {name: {} for name in methods_1d}
for t in SEQ_LENS:
    q, k, v, x = jr.normal(jr.key(t), (4, 1, t, 4, 64))
    g = jax.nn.log_sigmoid(x) / 16
    for name, fn in methods_1d.items():
        if name.startswith("dense") and t > DENSE_MAX:
            continue
        res_1d[name][t] = time_and_memory(fn, q, k, v, g)

RADIUS, NUM_GLOBAL = (4 if QUICK else 8), 16
SIDES = [16, 32] if QUICK else [16, 32, 48, 64]
res_2d = {"dense masked": {}, f"local_attention_2d (r={RADIUS})": {}}
for side in SIDES:
    t = NUM_GLOBAL + side * side
    q, k, v = jr.normal(jr.key(side), (3, 1, t, 4, 64))
    # CLEAR's rule: image tokens see each other iff dy^2 + dx^2 < r^2; global tokens see all
    yy, xx = np.divmod(np.arange(side * side), side)
    mask = np.ones((t, t), bool)
    mask[NUM_GLOBAL:, NUM_GLOBAL:] = (yy[:, None] - yy) ** 2 + (xx[:, None] - xx) ** 2 < RADIUS**2
    mask = jnp.asarray(mask)
    fns = {
        "dense masked": lambda q, k, v, mask=mask: jax.nn.dot_product_attention(
            q, k, v, mask=mask[None, None]
        ),
        f"local_attention_2d (r={RADIUS})": lambda q, k, v, side=side: kp.local_attention_2d(
            q, k, v, grid_shape=(side, side), radius=RADIUS, num_global=NUM_GLOBAL
        ),
    }
    for name, fn in fns.items():
        res_2d[name][t] = time_and_memory(fn, q, k, v)

fig, axes = plt.subplots(2, 2, figsize=(11, 8))
for col, (res, xlabel) in enumerate(
    [(res_1d, "sequence length T"), (res_2d, f"tokens ({NUM_GLOBAL} global + side² grid)")]
):
    for name, pts in res.items():
        ts = sorted(pts)
        axes[0, col].loglog(ts, [1e3 * pts[t][0] for t in ts], "o-", label=name)
        axes[1, col].loglog(ts, [pts[t][1] for t in ts], "o-", label=name)
    axes[0, col].set(xlabel=xlabel, ylabel="forward time (ms)")
    axes[1, col].set(xlabel=xlabel, ylabel="XLA temp buffers (MiB, compiled)")
    ticks = sorted({t for pts in res.values() for t in pts})
    for ax in axes[:, col]:
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_locator(plt.NullLocator())
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
for name, pts in res_1d.items():
    print(
        f"{name:28s}",
        "  ".join(f"T={t}: {1e3 * s:7.1f} ms {m:7.1f} MiB" for t, (s, m) in pts.items()),
    )

# %% [markdown]
# Dense attention's time and memory grow as $T^2$; the sliding window and GLA grow linearly.
# The 2-D window pays off once the grid is large against the disc ($\pi r^2$ keys per query
# instead of all of them).
#
# ## 2. Linearizing a tiny character-level language model
#
# The text is the documentation of Python's `help()` topics, shipped with every Python as
# `pydoc_data.topics`: about 465 000 characters of English with code. A small pre-norm
# transformer with rotary embeddings and `layers.SoftmaxAttention` learns to predict the next
# character; we hold out the last 10 % of the text for perplexity.

# %%
from pydoc_data.topics import topics

text = "\n".join(topics[key] for key in sorted(topics))
chars = sorted(set(text))
lookup = {c: i for i, c in enumerate(chars)}
tokens = jnp.asarray([lookup[c] for c in text], jnp.int32)
split = int(0.9 * len(text))
train_tokens, test_tokens = tokens[:split], tokens[split:]
print(f"{len(text):,} characters, vocabulary {len(chars)}")
print(text[20000:20300])


# %%
class Block(nnx.Module):
    def __init__(self, dim, heads, *, rngs):
        self.norm1, self.norm2 = nnx.RMSNorm(dim, rngs=rngs), nnx.RMSNorm(dim, rngs=rngs)
        self.attn = layers.SoftmaxAttention(heads, dim, use_bias=False, rope_theta=1e4, rngs=rngs)
        self.up, self.down = (
            nnx.Linear(dim, 4 * dim, rngs=rngs),
            nnx.Linear(4 * dim, dim, rngs=rngs),
        )

    def mlp(self, x):
        return x + self.down(jax.nn.gelu(self.up(self.norm2(x))))

    def __call__(self, x):
        return self.mlp(x + self.attn(self.norm1(x)))

    def prefill(self, x, max_len):  # the softmax layer's KV cache needs its final size
        h = self.norm1(x)
        is_softmax = isinstance(self.attn, layers.SoftmaxAttention)
        y, cache = self.attn.prefill(h, max_len) if is_softmax else self.attn.prefill(h)
        return self.mlp(x + y), cache

    def decode_step(self, x, cache):
        y, cache = self.attn.decode_step(self.norm1(x), cache)
        return self.mlp(x + y), cache


class CharLM(nnx.Module):
    def __init__(self, vocab, dim, depth, heads, *, rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.blocks = nnx.List([Block(dim, heads, rngs=rngs) for _ in range(depth)])
        self.norm, self.head = nnx.RMSNorm(dim, rngs=rngs), nnx.Linear(dim, vocab, rngs=rngs)

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


def windows(tokens, starts, length):
    return jax.vmap(lambda s: jax.lax.dynamic_slice(tokens, (s,), (length,)))(starts)


def train_lm(model, *, steps, lr, key, batch=32):
    """AdamW on next-character cross-entropy, all steps in one jitted lax.scan."""
    graphdef, params = nnx.split(model, nnx.Param)
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), steps, 0.1 * lr)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))

    def loss_fn(params, key):
        starts = jr.randint(key, (batch,), 0, train_tokens.shape[0] - CONTEXT - 1)
        w = windows(train_tokens, starts, CONTEXT + 1)
        logits = nnx.merge(graphdef, params)(w[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, w[:, 1:]).mean()

    @jax.jit
    def run(params, key):
        def step(carry, k):
            params, state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, k)
            updates, state = opt.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), jr.split(key, steps))
        return params, losses

    params, losses = run(params, key)
    return nnx.merge(graphdef, params), np.asarray(losses)


def perplexity(model):
    graphdef, params = nnx.split(model, nnx.Param)
    logits = jax.jit(lambda p: nnx.merge(graphdef, p)(eval_windows[:, :-1]))(params)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, eval_windows[:, 1:]).mean()
    return float(jnp.exp(ce))


DIM, DEPTH, HEADS = 64, 2, 4
CONTEXT, WINDOW_LM = (64, 8) if QUICK else (128, 16)
STEPS, FT_STEPS = (150, 60) if QUICK else (800, 200)
eval_starts = jnp.arange(0, test_tokens.shape[0] - CONTEXT - 1, CONTEXT + 1)
eval_windows = windows(test_tokens, eval_starts[:: max(1, len(eval_starts) // 256)], CONTEXT + 1)

t0 = time.perf_counter()
softmax_lm, losses = train_lm(
    CharLM(len(chars), DIM, DEPTH, HEADS, rngs=nnx.Rngs(0)), steps=STEPS, lr=3e-3, key=jr.key(1)
)
ppl_soft = perplexity(softmax_lm)
print(f"{STEPS} steps in {time.perf_counter() - t0:.0f} s; held-out perplexity {ppl_soft:.3f}")

# %% [markdown]
# ### `linearize`: softmax attention → Liger attention on the same weights
#
# Liger attention reuses the query, key and value projections twice: a sliding-window
# softmax branch (here `WINDOW_LM` keys including self; `liger_compatible_window=True`
# counts one more, as Liger's Hugging Face models do) and a GLA branch with feature maps
# $\phi(q) = \mathrm{softmax}(q)$, $\phi(k) = \mathrm{softmax}(k)$ over the head dimension
# and log forget gates *from the key projection*, $g = \log\sigma(k)/16$. The output is
# $0.5\cdot\mathrm{SWA} + 0.5\cdot\mathrm{GLA}$, then the same output projection. No
# parameters are added, so the converted model starts from the pretrained one; a short
# fine-tune (Liger uses LoRA; here all parameters) adapts it. As a control, the softmax model
# is trained for the same extra steps.

# %%
graphdef, state = nnx.split(softmax_lm)
liger_lm = nnx.merge(graphdef, state)  # a second module tree on the same arrays
for block in liger_lm.blocks:
    block.attn = layers.linearize(block.attn, window=WINDOW_LM)
print(
    liger_lm.blocks[0].attn.num_window_keys,
    "window keys;",
    "query weights shared:",
    liger_lm.blocks[0].attn.query.kernel.get_value()
    is softmax_lm.blocks[0].attn.query.kernel.get_value(),
)

ppl_lin = perplexity(liger_lm)
liger_lm, ft_losses = train_lm(liger_lm, steps=FT_STEPS, lr=1e-3, key=jr.key(2))
ppl_ft = perplexity(liger_lm)
softmax_more, more_losses = train_lm(softmax_lm, steps=FT_STEPS, lr=1e-3, key=jr.key(2))
ppl_more = perplexity(softmax_more)
recovered = (ppl_lin - ppl_ft) / (ppl_lin - ppl_soft)

print(f"softmax                 {ppl_soft:8.3f}")
print(f"linearized (no tuning)  {ppl_lin:8.3f}")
print(f"Liger + {FT_STEPS} steps      {ppl_ft:8.3f}   recovered {recovered:.1%} of the gap")
print(f"softmax + {FT_STEPS} steps    {ppl_more:8.3f}   (control)")

fig, ax = plt.subplots(figsize=(6, 3.5))
smooth = lambda a: np.convolve(a, np.ones(20) / 20, mode="valid")
ax.plot(19 + np.arange(len(losses) - 19), np.exp(smooth(losses)), label="softmax pre-training")
x_ft = STEPS + 19 + np.arange(len(ft_losses) - 19)
ax.plot(x_ft, np.exp(smooth(ft_losses)), label="Liger fine-tuning")
ax.plot(x_ft, np.exp(smooth(more_losses)), label="softmax, same extra steps")
ax.set(xlabel="step", ylabel="train perplexity", yscale="log")
ax.legend()
plt.show()

# %% [markdown]
# Right after `linearize` the perplexity jumps (half of every attention output is now a
# recurrence the model has never seen); a few fine-tuning steps bring it back to the
# softmax model's level. The control matters: part of the improvement is just more
# training, so compare the fine-tuned Liger model with the softmax model trained equally
# long. Numbers vary with the training length; `linjax tour --only kernels` records them.
#
# ## 3. Decoding: KV cache against a constant-size state
#
# Every causal layer has `prefill(x) -> (y, cache)` and `decode_step(x_t, cache)`, with
# the cache an explicit pytree, so generation is a jitted `lax.scan`. The softmax layer's
# `KVCache` is a fixed buffer of `max_len` keys and values, read in full at every step; the
# GLA layer keeps a `[heads, key_dim, value_dim]` state (`gla_decode_step`), and Liger adds a
# ring buffer of the last `window` keys. First one layer, against the context length:


# %%
def decode_rate(layer, context, batch=8, steps=32):
    graphdef, params = nnx.split(layer, nnx.Param)
    if isinstance(layer, layers.SoftmaxAttention):  # a full cache of `context` tokens
        cache = layer.init_cache(batch, context)._replace(
            index=jnp.asarray(context - steps, jnp.int32)
        )
    else:
        cache = layer.init_cache(batch)
    xs = jr.normal(jr.key(0), (steps, batch, layer.in_features))

    @jax.jit
    def run(params, cache, xs):
        m = nnx.merge(graphdef, params)
        return jax.lax.scan(lambda c, x: m.decode_step(x, c)[::-1], cache, xs)[1]

    return batch * steps / median_time(run, params, cache, xs)


CONTEXTS = [256, 2048] if QUICK else [256, 1024, 4096, 16384, 32768]
rngs = nnx.Rngs(0)
soft_layer = layers.SoftmaxAttention(4, 256, rope_theta=1e4, rngs=rngs)
gla_layer = layers.GatedLinearAttention(4, 256, key_dim=64, rngs=rngs)
liger_layer = layers.LigerAttention(4, 256, rope_theta=1e4, window=64, rngs=rngs)
soft_rates = [decode_rate(soft_layer, c) for c in CONTEXTS]
gla_rate, liger_rate = decode_rate(gla_layer, 0), decode_rate(liger_layer, 0)

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.loglog(CONTEXTS, soft_rates, "o-", label="softmax + KV cache")
ax.loglog(CONTEXTS, [gla_rate] * len(CONTEXTS), "o-", label="GLA state (gla_decode_step)")
ax.loglog(CONTEXTS, [liger_rate] * len(CONTEXTS), "o-", label="Liger: GLA + 64-key ring")
ax.set_xticks(CONTEXTS, [str(c) for c in CONTEXTS])
ax.xaxis.set_minor_locator(plt.NullLocator())
ax.set(xlabel="context length", ylabel="decode tokens/s (batch 8)")
ax.legend()
plt.show()

# %% [markdown]
# And the two language models, generating from a prompt out of the held-out text (their
# context is short, so the KV cache costs little here; Liger does the work of two branches):

# %%
PROMPT, NEW = 32, 64 if QUICK else 256
prompt = windows(test_tokens, jnp.arange(4) * 997, PROMPT)


def generation_fns(model):
    """Jitted prefill(params, prompt) and generate(params, logits, caches, key)."""
    graphdef, params = nnx.split(model, nnx.Param)
    prefill = jax.jit(lambda p, t: nnx.merge(graphdef, p).prefill(t, PROMPT + NEW))

    @jax.jit
    def generate(params, logits, caches, key):
        m = nnx.merge(graphdef, params)

        def step(carry, k):
            token, caches = carry
            logits, caches = m.decode_step(token, caches)
            token = jr.categorical(k, logits / 0.8)
            return (token, caches), token

        first = jnp.argmax(logits[:, -1], -1)
        return jax.lax.scan(step, (first, caches), jr.split(key, NEW))[1].T

    return params, prefill, generate


for name, model in (("softmax", softmax_lm), ("Liger", liger_lm)):
    params, prefill, generate = generation_fns(model)
    logits, caches = prefill(params, prompt)
    secs = median_time(generate, params, logits, caches, jr.key(3))
    out = np.asarray(generate(params, logits, caches, jr.key(3)))
    print(f"{name}: {prompt.shape[0] * NEW / secs:,.0f} tokens/s")
    print(
        "   ",
        repr("".join(chars[i] for i in np.asarray(prompt[0]))),
        "->",
        repr("".join(chars[i] for i in out[0])),
    )

# %% [markdown]
# ## CLEAR's window as a layer
#
# `layers.LocalAttention2D` is softmax attention restricted to a disc on the image grid
# (plus a dense prefix of global tokens), and `LocalAttention2D.from_attention` reuses a
# pretrained attention layer's weights, which is how CLEAR converts a diffusion transformer.
# The attention weights of one query show the disc (strict: distance exactly $r$ is out):

# %%
H, W, R, G = 12, 16, 4, 2
clear = layers.LocalAttention2D(2, 32, radius=R, rngs=nnx.Rngs(0))
x_img = jr.normal(jr.key(5), (1, G + H * W, 32))
y = clear(x_img, grid_shape=(H, W), num_global=G)
# which keys does the image query at (6, 8) see? differentiate its output w.r.t. the input
query = G + 6 * W + 8
sens = jax.jacrev(lambda x: clear(x, grid_shape=(H, W), num_global=G)[0, query].sum())(x_img)
seen = np.asarray(jnp.abs(sens[0, G:]).sum(-1) > 1e-7).reshape(H, W)
plt.figure(figsize=(4, 3))
plt.imshow(seen, cmap="Greys")
plt.title(f"keys influencing query (6, 8), r = {R}: {seen.sum()} of {H * W}")
plt.show()

# %% [markdown]
# ## On a GPU
#
# With an accelerator, `impl="auto"` runs the Pallas kernels. This cell compares the
# sliding-window kernel with `jax.nn.dot_product_attention` (cuDNN where available) at a
# long sequence; it is skipped on CPU.

# %%
if jax.default_backend() == "gpu":
    t, w = 8192, 256
    q, k, v = jr.normal(jr.key(0), (3, 1, t, 32, 128), jnp.bfloat16)
    ours = jax.jit(lambda q, k, v: kp.local_attention(q, k, v, window=w))
    dense = jax.jit(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, local_window_size=(w - 1, 0)
        )
    )
    print(
        f"local_attention {1e3 * median_time(ours, q, k, v):.2f} ms, "
        f"dot_product_attention {1e3 * median_time(dense, q, k, v):.2f} ms"
    )
else:
    print("no GPU: skipped")
