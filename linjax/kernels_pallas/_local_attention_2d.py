r"""2-D local attention (CLEAR): public entry point, validation and the dense oracle."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from linjax import _tree
from linjax.kernels_pallas import _checks, _compat
from linjax.kernels_pallas._local_attention_2d_schedule import (
    TileSchedule,
    capped_tile,
    max_visible_d2,
    xla_tile,
)
from linjax.kernels_pallas._local_attention_2d_xla import local_attention_2d_xla

# Pallas tile on accelerators: 8 x 16 = 128 tokens (reference/kernels.md §4.3, §5.2).
PALLAS_TILE = (8, 16)
MIN_PALLAS_TILE_TOKENS = 16  # Triton's smallest dot dimension


def _check_options(q, grid_shape: Any, radius: Any, num_global: Any) -> tuple[int, int, float, int]:
    if not isinstance(grid_shape, (tuple, list)) or len(grid_shape) != 2:
        raise TypeError(f"grid_shape={grid_shape!r} must be a pair (height, width) of ints")
    height = _tree.check_positive_int(grid_shape[0], "grid_shape[0] (height)")
    width = _tree.check_positive_int(grid_shape[1], "grid_shape[1] (width)")
    num_global = _tree.check_positive_int(num_global, "num_global", minimum=0)
    if isinstance(radius, jax.core.Tracer):
        raise TypeError(f"radius must be a static Python number, got a traced value {radius}")
    arr = np.asarray(radius)
    if isinstance(radius, bool) or arr.shape != () or not np.issubdtype(arr.dtype, np.number):
        raise TypeError(f"radius={radius!r} must be a real number (in grid cells)")
    if not (np.isfinite(arr) and arr > 0):
        raise ValueError(f"radius={radius!r} must be a finite number > 0")
    seq = q.shape[1]
    if seq != num_global + height * width:
        raise ValueError(
            f"sequence length {seq} (q.shape={q.shape}) must equal num_global + height * width "
            f"= {num_global} + {height} * {width} = {num_global + height * width}"
        )
    radius = int(radius) if float(radius).is_integer() else float(radius)
    return height, width, radius, num_global


def _check_tile(tile_shape: Any) -> tuple[int, int]:
    if not isinstance(tile_shape, (tuple, list)) or len(tile_shape) != 2:
        raise TypeError(f"tile_shape={tile_shape!r} must be a pair (tile_h, tile_w) of ints")
    th = _tree.check_positive_int(tile_shape[0], "tile_shape[0]")
    tw = _tree.check_positive_int(tile_shape[1], "tile_shape[1]")
    if th & (th - 1) or tw & (tw - 1) or th * tw < 8:
        raise ValueError(
            f"tile_shape={tuple(tile_shape)} must be powers of two with at least 8 tokens "
            "(e.g. (4, 4) or (8, 16))"
        )
    return th, tw


def local_attention_2d_mask(grid_shape: tuple[int, int], radius: float, num_global: int = 0):
    """Boolean ``[seq, seq]`` numpy mask ``visible[i, j]`` of the CLEAR rule (exact predicate)."""
    height, width = grid_shape
    y, x = np.divmod(np.arange(height * width), width)
    d2 = (y[:, None] - y[None]) ** 2 + (x[:, None] - x[None]) ** 2
    visible = np.ones((num_global + height * width,) * 2, bool)
    visible[num_global:, num_global:] = d2 < radius * radius
    return visible


def local_attention_2d_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    grid_shape: tuple[int, int],
    radius: float,
    num_global: int = 0,
    scale: float | None = None,
) -> jax.Array:
    r"""Dense masked softmax attention: the pure-jnp oracle for :func:`local_attention_2d`.

    Builds the full ``[seq, seq]`` scores and the exact boolean mask (memory $O(T^2)$), in
    float32 (float64 for float64 inputs) at highest matmul precision. Tests and small
    grids only.

    Examples:
        >>> import jax.numpy as jnp
        >>> from linjax import kernels_pallas as kp
        >>> x = jnp.ones((1, 2 + 3 * 4, 2, 8))
        >>> kp.local_attention_2d_reference(x, x, x, grid_shape=(3, 4), radius=2,
        ...                                 num_global=2).shape
        (1, 14, 2, 8)
    """
    _checks.check_qkv(q, k, v)
    height, width, radius, num_global = _check_options(q, grid_shape, radius, num_global)
    scale = _checks.check_scale(scale, q.shape[-1])
    acc = _checks.accum_dtype(q.dtype)
    b, t, h, d = q.shape
    hk = k.shape[2]
    qg = q.astype(acc).reshape(b, t, hk, h // hk, d)
    s = jnp.einsum("bthgd,bshd->bhgts", qg, k.astype(acc), precision=lax.Precision.HIGHEST)
    # Every image token sees itself (radius > 0), so no row is all -inf.
    mask = local_attention_2d_mask((height, width), radius, num_global)
    p = jax.nn.softmax(jnp.where(mask, s * scale, -jnp.inf), axis=-1)
    o = jnp.einsum("bhgts,bshe->bthge", p, v.astype(acc), precision=lax.Precision.HIGHEST)
    return o.reshape(b, t, h, v.shape[-1]).astype(q.dtype)


def local_attention_2d(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    grid_shape: tuple[int, int],
    radius: float,
    num_global: int = 0,
    scale: float | None = None,
    impl: str = "auto",
    tile_shape: tuple[int, int] | None = None,
) -> jax.Array:
    r"""CLEAR's circular 2-D local attention over a prefix of global tokens and an image grid.

    The sequence is ``num_global`` prefix tokens (e.g. text) followed by a
    ``height x width`` grid in raster order. Image tokens $p, p'$ at ``(y, x)``,
    ``(y', x')`` see each other iff $(y - y')^2 + (x - x')^2 < r^2$ (strict, a disc, cut
    at the borders); prefix tokens see, and are seen by, every token. ``radius`` beyond
    the grid diagonal is full attention. Cost $O(T \cdot r^2)$ instead of $O(T^2)$.
    Grouped-query attention as in :func:`local_attention`.

    Implementations (``impl``):

    * ``"xla"``: queries in 2-D tiles, each scored against exactly the keys that some
      query of the tile sees (gathered; 452 keys per 8 x 8 tile at r = 8) plus the prefix
      keys, as batched matmuls (a ``[seq, seq]`` matrix never exists); prefix queries
      densely; groups of tile rows one after another so scratch memory stays a few MiB.
      Differentiated by autodiff. The default on CPU; the tile balances keys scored
      against matmul size (8 x 8 at r = 8). About 10x faster than dense masked attention
      on a 64 x 64 grid at r = 8 (``benchmarks/kernels.py``).
    * ``"pallas"``: flash attention over the tokens permuted into 2-D tiles
      (``8 x 16`` by default): each query tile's key loop visits the prefix blocks and,
      per tile row, the contiguous run of key tiles within reach, with the disc mask
      computed in-kernel from coordinates; ``custom_vjp`` backward with ``dq`` and
      ``dk, dv`` kernels over the same (symmetric) schedule. Default on GPU/TPU;
      interpreted on CPU.
    * ``"reference"``: :func:`local_attention_2d_reference`.

    Args:
        q: queries ``[batch, num_global + height * width, heads, head_dim]``.
        k: keys ``[batch, seq, kv_heads, head_dim]``, same dtype; ``heads % kv_heads == 0``.
        v: values ``[batch, seq, kv_heads, value_dim]``.
        grid_shape: ``(height, width)`` of the image grid (static ints).
        radius: window radius in grid cells (static number ``> 0``); CLEAR uses 8, 16, 32.
        num_global: number of prefix tokens (static int ``>= 0``).
        scale: logit scale, default ``head_dim ** -0.5``.
        impl: ``"auto"`` | ``"pallas"`` | ``"xla"`` | ``"reference"``.
        tile_shape: ``(tile_h, tile_w)``, powers of two with at least 8 tokens (16 for
            ``impl="pallas"``); default
            as described above (shrunk to small grids).

    Returns:
        ``[batch, seq, heads, value_dim]`` in the input dtype.

    Examples:
        >>> import jax, jax.numpy as jnp
        >>> from linjax import kernels_pallas as kp
        >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 4 + 12 * 10, 2, 16))
        >>> kw = dict(grid_shape=(12, 10), radius=3, num_global=4)
        >>> o = kp.local_attention_2d(q, k, v, **kw)
        >>> bool(jnp.allclose(o, kp.local_attention_2d_reference(q, k, v, **kw), atol=1e-5))
        True

    References:
        Liu, Tan, Wang (2025), "CLEAR: Conv-Like Linearization Revs Pre-Trained Diffusion
        Transformers Up", https://arxiv.org/abs/2412.16112;
        Hassani et al. (2023), "Neighborhood Attention Transformer",
        https://arxiv.org/abs/2204.07143
    """
    _checks.check_qkv(q, k, v)
    height, width, radius, num_global = _check_options(q, grid_shape, radius, num_global)
    scale = _checks.check_scale(scale, q.shape[-1])
    if tile_shape is not None:
        tile_shape = _check_tile(tile_shape)
    impl = _compat.resolve_impl(impl)
    if impl == "reference":
        return local_attention_2d_reference(
            q, k, v, grid_shape=grid_shape, radius=radius, num_global=num_global, scale=scale
        )
    max_d2 = max_visible_d2(radius)
    if impl == "xla":
        tile = tile_shape or xla_tile(height, width, max_d2)
        sched = TileSchedule(height, width, num_global, max_d2, *tile)
        return local_attention_2d_xla(q, k, v, sched=sched, scale=scale)
    from linjax.kernels_pallas._local_attention_2d_pallas import local_attention_2d_pallas

    if tile_shape is not None and tile_shape[0] * tile_shape[1] < MIN_PALLAS_TILE_TOKENS:
        # Triton's dot needs every dimension >= 16; an H100 gave wrong bf16 results for
        # 8-token tiles (float32 and the CPU interpreter were fine).
        raise ValueError(
            f"tile_shape={tile_shape} has {tile_shape[0] * tile_shape[1]} tokens; "
            f'impl="pallas" needs at least {MIN_PALLAS_TILE_TOKENS} (e.g. (4, 4) or (8, 16))'
        )
    tile = tile_shape or capped_tile(height, width, *PALLAS_TILE, MIN_PALLAS_TILE_TOKENS)
    sched = TileSchedule(height, width, num_global, max_d2, *tile)
    return local_attention_2d_pallas(q, k, v, sched=sched, scale=scale)
