"""local_attention_2d (CLEAR): every implementation against the dense oracle, the strict disc,
full-attention radius, odd grids, the tile schedule's completeness, errors."""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

from linjax import kernels_pallas as kp
from linjax.kernels_pallas import _compat, _sequential
from linjax.kernels_pallas._local_attention_2d import local_attention_2d_mask
from linjax.kernels_pallas._local_attention_2d_schedule import TileSchedule, max_visible_d2

# rel-RMS tolerances (reference/kernels.md §7): forward, gradients.
TOL = {jnp.float32: (1e-4, 1e-3), jnp.bfloat16: (5e-3, 1e-2)}
B, H, HKV, D, DV = 1, 4, 2, 16, 8  # grouped-query attention with 2 groups
PALLAS_TILE = (4, 4)  # small tiles: several tile rows and columns on tiny grids


def rel_rms(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def make_qkv(key, dtype, seq, *, h=H, hkv=HKV, dv=DV):
    kq, kk, kv = jr.split(key, 3)
    # Drawn in bfloat16 so that the float32 inputs hold the same values.
    q = jr.normal(kq, (B, seq, h, D), jnp.bfloat16)
    k = jr.normal(kk, (B, seq, hkv, D), jnp.bfloat16)
    v = jr.normal(kv, (B, seq, hkv, dv), jnp.bfloat16)
    return tuple(x.astype(dtype) for x in (q, k, v))


def attend(impl, **kw):
    tile = PALLAS_TILE if impl == "pallas" else None
    return lambda q, k, v: kp.local_attention_2d(q, k, v, impl=impl, tile_shape=tile, **kw)


@pytest.mark.parametrize(
    "impl, dtype", list(itertools.product(["xla", "pallas"], [jnp.float32, jnp.bfloat16]))
)
def test_matches_reference_forward_and_vjp(impl, dtype, getkey):
    kw = dict(grid_shape=(7, 5), radius=3, num_global=3)  # 7 x 5: no multiple of any tile
    seq = 3 + 7 * 5
    q, k, v = make_qkv(getkey(), dtype, seq)
    ct = jr.normal(getkey(), (B, seq, H, DV), dtype)

    @jax.jit
    def run(q, k, v, ct):
        o, vjp = jax.vjp(attend(impl, **kw), q, k, v)
        return o, vjp(ct)

    @jax.jit
    def oracle(q, k, v, ct):
        o, vjp = jax.vjp(lambda *a: kp.local_attention_2d_reference(*a, **kw), q, k, v)
        return o, vjp(ct)

    o, grads = run(q, k, v, ct)
    up = lambda x: x.astype(jnp.float64)
    o_ref, grads_ref = oracle(up(q), up(k), up(v), up(ct))
    assert o.dtype == dtype and all(g.dtype == dtype for g in grads)
    fwd_tol, grad_tol = TOL[dtype]
    assert rel_rms(o, o_ref) <= fwd_tol
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert rel_rms(g, g_ref) <= grad_tol, name


# (grid, radius, num_global, pallas tile): odd grids, no prefix / a prefix longer than a block
# (two prefix blocks, the second padded), a fractional radius.
GRIDS = [((9, 13), 4, 0, (4, 4)), ((5, 7), 2.5, 11, (2, 8))]


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_odd_grids_prefixes_and_radii(impl, getkey):
    inputs = [make_qkv(getkey(), jnp.float32, g + h * w) for (h, w), _, g, _ in GRIDS]

    @jax.jit
    def run(inputs):
        outs, refs = [], []
        for (q, k, v), (grid, r, g, tile) in zip(inputs, GRIDS, strict=True):
            kw = dict(grid_shape=grid, radius=r, num_global=g)
            t = tile if impl == "pallas" else None
            outs.append(kp.local_attention_2d(q, k, v, impl=impl, tile_shape=t, **kw))
            refs.append(kp.local_attention_2d_reference(q, k, v, **kw))
        return outs, refs

    for o, ref, case in zip(*run(inputs), GRIDS, strict=True):
        assert rel_rms(o, ref) <= 1e-5, case


@pytest.mark.parametrize("num_global", [0, 3])
@pytest.mark.parametrize("rows_per_step", [1, 2])
def test_xla_groups_of_tile_rows_in_sequence(rows_per_step, num_global, getkey, monkeypatch):
    """Tile rows in sequential groups (a 9 x 13 grid in 4 x 4 tiles: 3 tile rows, so two rows
    per step leave a padded one): forward and VJP equal the oracle, with and without prefix."""
    grid, tile = (9, 13), (4, 4)
    sched = TileSchedule(*grid, num_global, max_visible_d2(4), *tile)
    # Scores of one tile row: B * HKV, 4 tiles across, (H / HKV) * 16 queries per tile.
    row = B * HKV * 4 * (H // HKV) * 16 * (num_global + sched.key_region.shape[0])
    monkeypatch.setattr(_sequential, "STEP_ELEMENTS", rows_per_step * row)
    kw = dict(grid_shape=grid, radius=4, num_global=num_global)
    seq = num_global + grid[0] * grid[1]
    q, k, v = make_qkv(getkey(), jnp.float32, seq)
    ct = jr.normal(getkey(), (B, seq, H, DV), jnp.float32)

    @jax.jit
    def run(q, k, v, ct):
        fn = lambda *a: kp.local_attention_2d(*a, impl="xla", tile_shape=tile, **kw)
        o, vjp = jax.vjp(fn, q, k, v)
        o_ref, vjp_ref = jax.vjp(lambda *a: kp.local_attention_2d_reference(*a, **kw), q, k, v)
        return (o, *vjp(ct)), (o_ref, *vjp_ref(ct))

    for name, x, ref in zip(["o", "dq", "dk", "dv"], *run(q, k, v, ct), strict=True):
        assert rel_rms(x, ref) <= 1e-5, name


def test_xla_scratch_memory_is_one_group_of_tile_rows():
    """At 128 x 128, r = 8 the whole image's scores would be [16384, 2, 452] floats (59 MB)."""
    x = jnp.zeros((1, 128 * 128, 2, 16), jnp.float32)
    fn = jax.jit(lambda x: kp.local_attention_2d(x, x, x, grid_shape=(128, 128), radius=8))
    temp = fn.lower(x).compile().memory_analysis().temp_size_in_bytes
    assert temp < 128 * 128 * 2 * 452 * 4 / 2  # the unblocked path held several such arrays


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_pairs_at_exactly_the_radius_are_excluded(impl):
    """r = 5: (0,0)-(3,4), (0,0)-(4,3) and (0,0)-(0,5) are 3-4-5 / axis pairs at distance 5."""
    grid = (5, 6)
    seq = grid[0] * grid[1]
    q = jnp.zeros((1, seq, 1, 8), jnp.float32)  # uniform weights over the visible keys
    v = np.zeros((1, seq, 1, 8), np.float32)
    for y, x in ((3, 4), (4, 3), (0, 5)):
        v[0, y * grid[1] + x] = 1.0
    o = attend(impl, grid_shape=grid, radius=5)(q, q, jnp.asarray(v))
    o = np.asarray(o[0, :, 0, 0]).reshape(grid)
    assert o[0, 0] == 0.0  # all three keys lie exactly on the circle: excluded
    assert o[0, 1] > 0 and o[1, 1] > 0  # from (0,1) or (1,1) they are strictly inside
    # the same radius a hair larger includes them
    o_in = attend(impl, grid_shape=grid, radius=5.01)(q, q, jnp.asarray(v))
    assert float(o_in[0, 0, 0, 0]) > 0


@pytest.mark.parametrize("impl", ["xla", "pallas", "reference"])
def test_radius_beyond_the_diagonal_is_full_attention(impl, getkey):
    grid, g = (6, 5), 2  # diagonal sqrt(5^2 + 4^2) ~ 6.4
    q, k, v = make_qkv(getkey(), jnp.float32, g + 30, h=HKV, dv=D)

    @jax.jit
    def run(q, k, v):
        return [attend(impl, grid_shape=grid, radius=r, num_global=g)(q, k, v) for r in (7, 50)]

    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls
        full = jax.nn.dot_product_attention(q, k, v)
    for o in run(q, k, v):
        np.testing.assert_allclose(o, full, rtol=2e-5, atol=2e-5)


@functools.lru_cache
def _tiled_positions(sched: TileSchedule) -> np.ndarray:
    """Original token index at each position of the tiled order (-1: padding)."""
    seq = sched.num_global + sched.height * sched.width
    return np.asarray(sched.to_tiled(jnp.arange(1, seq + 1)[None])[0]) - 1


def _block_visibility(sched: TileSchedule, radius) -> np.ndarray:
    """Brute force: block pairs (tiled order) holding at least one visible token pair."""
    pos = _tiled_positions(dataclasses.replace(sched, max_d2=0))  # the order ignores r
    mask = local_attention_2d_mask((sched.height, sched.width), radius, sched.num_global)
    real = pos >= 0
    tiled = np.zeros((len(pos), len(pos)), bool)
    tiled[np.ix_(real, real)] = mask[np.ix_(pos[real], pos[real])]
    nb, bs = sched.num_blocks, sched.block
    return tiled.reshape(nb, bs, nb, bs).any(axis=(1, 3))


@pytest.mark.parametrize("grid", [(7, 5), (9, 13), (16, 24), (37, 21)])
def test_schedule_visits_every_tile_pair_with_a_visible_entry(grid):
    n_ranges = jax.jit(lambda s, n: s.kv_ranges(n), static_argnums=0)
    for radius, g, tile in itertools.product((1, 2, 2.5, 5, 8), (0, 7), ((2, 4), (4, 4), (8, 16))):
        sched = TileSchedule(*grid, g, max_visible_d2(radius), *tile)
        visited = sched.visited()
        needed = _block_visibility(sched, radius)
        missing = np.argwhere(needed & ~visited)
        assert missing.size == 0, (grid, radius, g, tile, missing[:5])
        np.testing.assert_array_equal(visited, visited.T)  # the backward reuses the ranges
        # Tight: on the grid padded to whole tiles, a tile pair is visited iff it holds a
        # visible pair (the schedule is the same; only the padding cells become real).
        th, tw = tile
        padded = TileSchedule(sched.tiles_y * th, sched.tiles_x * tw, g, sched.max_d2, th, tw)
        gb = sched.global_blocks
        np.testing.assert_array_equal(
            padded.visited(), visited, err_msg=str((grid, radius, g, tile))
        )
        np.testing.assert_array_equal(
            _block_visibility(padded, radius)[gb:, gb:], visited[gb:, gb:]
        )
    # The traced ranges (as the kernels compute them from the program id) equal the host ones.
    sched = TileSchedule(*grid, 7, max_visible_d2(5), 2, 4)
    for n in range(sched.num_blocks):
        traced = [(int(lo), int(hi)) for lo, hi in n_ranges(sched, jnp.int32(n))]
        host = [(lo, hi if hi > lo else lo) for lo, hi in sched.kv_ranges(n)]
        assert [(lo, hi) for lo, hi in traced if hi > lo] == [(a, b) for a, b in host if b > a]


@pytest.mark.parametrize("grid, tile", [((7, 5), (4, 8)), ((9, 13), (8, 8)), ((16, 24), (2, 16))])
def test_xla_key_region_is_exact(grid, tile):
    """The XLA path scores a query tile against ``key_region``: it must hold every key that a
    query of the tile sees, and nothing that no query of the tile (on an unbounded grid)
    sees."""
    h, w = grid
    for radius in (1, 2.5, 5, 8):
        sched = TileSchedule(h, w, 0, max_visible_d2(radius), *tile)
        region = {tuple(c) for c in sched.key_region.tolist()}
        mask = local_attention_2d_mask(grid, radius)
        qy, qx = np.divmod(np.arange(h * w), w)
        for i, j in zip(*np.nonzero(mask), strict=True):
            oy, ox = qy[i] // tile[0] * tile[0], qx[i] // tile[1] * tile[1]
            assert (qy[j] - oy, qx[j] - ox) in region, (grid, radius, i, j)
        ty, tx = np.divmod(np.arange(sched.block), tile[1])
        for ry, rx in region:
            assert ((ty - ry) ** 2 + (tx - rx) ** 2 < radius**2).any(), (ry, rx)


def test_tiled_order_round_trip_and_layout():
    sched = TileSchedule(5, 7, 3, max_visible_d2(2), 2, 4)
    x = jnp.arange(3 + 35)[None, :, None] * jnp.ones((2, 1, 3))
    tiled = sched.to_tiled(x)
    assert tiled.shape == (2, sched.padded_len, 3)
    np.testing.assert_array_equal(sched.from_tiled(tiled), x)
    # tile (ty=1, tx=1), in-tile row 1, column 2 -> grid (3, 6) -> token 3 + 3 * 7 + 6
    block = sched.global_blocks + 1 * sched.tiles_x + 1
    assert int(tiled[0, block * sched.block + 1 * 4 + 2, 0]) == 3 + 3 * 7 + 6


def test_pallas_composes_with_vmap_checkpoint_and_grad(getkey):
    """vmap over an extra axis (the kernels' platform-dependent call batches), remat, grad."""
    kw = dict(grid_shape=(5, 6), radius=2.5, num_global=2)
    q, k, v = (jr.normal(getkey(), (2, 1, 32, 2, 16), jnp.float32) for _ in range(3))
    pallas = jax.checkpoint(attend("pallas", **kw))

    def loss(f):
        return lambda q, k, v: jnp.sum(jax.vmap(f)(q, k, v) ** 2)

    val, grads = jax.jit(jax.value_and_grad(loss(pallas), argnums=(0, 1, 2)))(q, k, v)
    ref = lambda q, k, v: kp.local_attention_2d_reference(q, k, v, **kw)
    val_ref, grads_ref = jax.jit(jax.value_and_grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)
    assert abs(float(val) - float(val_ref)) <= 1e-5 * abs(float(val_ref))
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert rel_rms(g, g_ref) <= 1e-5


def test_auto_and_reference_dispatch(getkey):
    kw = dict(grid_shape=(4, 6), radius=2)
    q, k, v = make_qkv(getkey(), jnp.float32, 24)
    auto, resolved = jax.jit(
        lambda q, k, v: (
            kp.local_attention_2d(q, k, v, **kw),
            kp.local_attention_2d(q, k, v, impl=_compat.resolve_impl("auto"), **kw),
        )
    )(q, k, v)
    np.testing.assert_array_equal(auto, resolved)
    ref = kp.local_attention_2d(q, k, v, impl="reference", scale=0.3, **kw)
    np.testing.assert_array_equal(ref, kp.local_attention_2d_reference(q, k, v, scale=0.3, **kw))


def test_bad_inputs_raise_clear_errors():
    x = jnp.zeros((1, 14, 4, 16))
    kv = jnp.zeros((1, 14, 2, 16))
    kw = dict(grid_shape=(3, 4), radius=2, num_global=2)
    with pytest.raises(ValueError, match=r"q must have rank 4 .*\(14, 4, 16\)"):
        kp.local_attention_2d(x[0], kv, kv, **kw)
    with pytest.raises(ValueError, match="4 heads, which must be a multiple of the 3 heads"):
        kp.local_attention_2d(x, jnp.zeros((1, 14, 3, 16)), jnp.zeros((1, 14, 3, 16)), **kw)
    with pytest.raises(ValueError, match="q has seq length 14 but k and v have 12"):
        kp.local_attention_2d(x, kv[:, :12], kv[:, :12], **kw)
    with pytest.raises(ValueError, match=r"sequence length 14 .* must equal num_global \+ height"):
        kp.local_attention_2d(x, kv, kv, grid_shape=(3, 4), radius=2, num_global=1)
    with pytest.raises(ValueError, match=r"= 2 \+ 4 \* 4 = 18"):
        kp.local_attention_2d_reference(x, kv, kv, grid_shape=(4, 4), radius=2, num_global=2)
    for radius in (0, -1.5, float("inf")):
        with pytest.raises(ValueError, match="radius=.* must be a finite number > 0"):
            kp.local_attention_2d(x, kv, kv, grid_shape=(3, 4), radius=radius, num_global=2)
    with pytest.raises(TypeError, match="radius=.* must be a real number"):
        kp.local_attention_2d(x, kv, kv, grid_shape=(3, 4), radius="2", num_global=2)
    with pytest.raises(TypeError, match="grid_shape=12 must be a pair"):
        kp.local_attention_2d(x, kv, kv, grid_shape=12, radius=2, num_global=2)
    with pytest.raises(ValueError, match=r"grid_shape\[0\] \(height\)=0 must be >= 1"):
        kp.local_attention_2d(x, kv, kv, grid_shape=(0, 4), radius=2, num_global=14)
    with pytest.raises(ValueError, match="num_global=-1 must be >= 0"):
        kp.local_attention_2d(x, kv, kv, grid_shape=(3, 4), radius=2, num_global=-1)
    with pytest.raises(ValueError, match=r"tile_shape=\(2, 4\) has 8 tokens; impl=\"pallas\""):
        kp.local_attention_2d(x, kv, kv, tile_shape=(2, 4), impl="pallas", **kw)
    with pytest.raises(ValueError, match="tile_shape=.* must be powers of two"):
        kp.local_attention_2d(x, kv, kv, tile_shape=(3, 4), **kw)
    with pytest.raises(TypeError, match="share one dtype"):
        kp.local_attention_2d(x, kv.astype(jnp.bfloat16), kv, **kw)
    with pytest.raises(ValueError, match="impl='cuda' must be one of"):
        kp.local_attention_2d(x, kv, kv, impl="cuda", **kw)
