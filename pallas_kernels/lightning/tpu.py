"""Lightning attention Mosaic TPU kernels: forward, dq (forward scan over chunks) and dk/dv/d-state (reverse scan).

Grid (B, H, chunks) with the chunk axis "arbitrary": the [K, V] float32 state (or its cotangent) lives in VMEM
scratch and is carried from one chunk to the next. Inputs are transposed to [B, H, T, D] outside the kernel so that
a block is a (C, D) tile: C a multiple of 8 and D the full head dim, which satisfies the (8, 128) tiling rule.
Segment runs come in twice, as a (1, C) row and a (C, 1) column, to build the [C, C] mask without a transpose.
"""
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.lightning.reference import chunk_decays, tile_dot

_F32 = jnp.float32


def _decays(ld_ref, rel_row_ref, rel_col_ref, chunk_idx, chunk_size, length, *, transposed=False):
    rel_col = rel_col_ref[...]
    return chunk_decays(ld_ref[pl.program_id(1)], rel_col, rel_row_ref[...], rel_col[chunk_size - 1:, :],
                        chunk_idx * chunk_size, chunk_size, length, transposed=transposed)


def _fwd_kernel(ld_ref, q_ref, k_ref, v_ref, rel_row_ref, rel_col_ref, s0_ref, o_ref, sf_ref, s_scr, *,
                scale, chunk_size, length):
    ci = pl.program_id(2)

    @pl.when(ci == 0)
    def _():
        s_scr[...] = s0_ref[...]

    d = _decays(ld_ref, rel_row_ref, rel_col_ref, ci, chunk_size, length)
    dt = q_ref.dtype
    q, k, v, s = q_ref[...], k_ref[...], v_ref[...], s_scr[...]
    scores = tile_dot(q, k, dt, trans_b=True) * (scale * d.intra)
    o = tile_dot(scores, v, dt) + tile_dot(q.astype(_F32) * (scale * d.into), s, dt)
    o_ref[...] = o.astype(o_ref.dtype)
    s_scr[...] = d.through * s + tile_dot(k.astype(_F32) * d.out, v, dt, trans_a=True)

    @pl.when(ci == pl.num_programs(2) - 1)
    def _():
        sf_ref[...] = s_scr[...]


def _dq_kernel(ld_ref, k_ref, v_ref, do_ref, rel_row_ref, rel_col_ref, s0_ref, dq_ref, s_scr, *,
               scale, chunk_size, length):
    ci = pl.program_id(2)

    @pl.when(ci == 0)
    def _():
        s_scr[...] = s0_ref[...]

    d = _decays(ld_ref, rel_row_ref, rel_col_ref, ci, chunk_size, length)
    dt = k_ref.dtype
    k, v, do, s = k_ref[...], v_ref[...], do_ref[...], s_scr[...]
    dp = tile_dot(do, v, dt, trans_b=True) * d.intra
    dq = tile_dot(dp, k, dt) + tile_dot(do.astype(_F32) * d.into, s, dt, trans_b=True)
    dq_ref[...] = (scale * dq).astype(dq_ref.dtype)
    s_scr[...] = d.through * s + tile_dot(k.astype(_F32) * d.out, v, dt, trans_a=True)


def _dkv_kernel(ld_ref, q_ref, k_ref, v_ref, do_ref, rel_row_ref, rel_col_ref, dsf_ref, dk_ref, dv_ref, ds0_ref,
                ds_scr, *, scale, chunk_size, length):
    step = pl.program_id(2)
    num_chunks = pl.num_programs(2)

    @pl.when(step == 0)
    def _():
        ds_scr[...] = dsf_ref[...]

    d = _decays(ld_ref, rel_row_ref, rel_col_ref, num_chunks - 1 - step, chunk_size, length, transposed=True)
    dt = q_ref.dtype
    q, k, v, do, ds = q_ref[...], k_ref[...], v_ref[...], do_ref[...], ds_scr[...]
    dp_t = tile_dot(v, do, dt, trans_b=True) * (scale * d.intra)
    dk = tile_dot(dp_t, q, dt) + tile_dot(v.astype(_F32) * d.out, ds, dt, trans_b=True)
    scores_t = tile_dot(k, q, dt, trans_b=True) * (scale * d.intra)
    dv = tile_dot(scores_t, do, dt) + tile_dot(k.astype(_F32) * d.out, ds, dt)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
    ds_scr[...] = d.through * ds + tile_dot(q.astype(_F32) * (scale * d.into), do, dt, trans_a=True)

    @pl.when(step == num_chunks - 1)
    def _():
        ds0_ref[...] = ds_scr[...]


def _layout(x_bthd, num_chunks, chunk_size):
    """[B, T, H, D] -> zero padded [B, H, N*C, D]."""
    pad = num_chunks * chunk_size - x_bthd.shape[1]
    return jnp.pad(x_bthd, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)


def _call(kernel, ld, tiles, runs, state, tile_outs, state_outs, *, chunk_size, length, scale, reverse,
          interpret, name):
    """Runs `kernel` over grid (B, H, N): ld [H] in SMEM, tiles [B, H, N*C, D] as (C, D) blocks (chunks visited in
    reverse order if `reverse`), the (row, column) runs, one [B, H, K, V] state; outputs tile_outs then state_outs."""
    b, h, tp, dk = tiles[0].shape
    num_chunks = tp // chunk_size
    dv = state.shape[-1]
    chunk = (lambda i: num_chunks - 1 - i) if reverse else (lambda i: i)
    tile = lambda x: pl.BlockSpec((None, None, chunk_size, x.shape[-1]), lambda bi, hi, i: (bi, hi, chunk(i), 0))
    state_spec = pl.BlockSpec((None, None, dk, dv), lambda bi, hi, i: (bi, hi, 0, 0))
    run_specs = [pl.BlockSpec((None, None, 1, chunk_size), lambda bi, hi, i: (bi, chunk(i), 0, 0)),
                 pl.BlockSpec((None, None, chunk_size, 1), lambda bi, hi, i: (bi, chunk(i), 0, 0))]
    return pl.pallas_call(
        functools.partial(kernel, scale=scale, chunk_size=chunk_size, length=length),
        grid=(b, h, num_chunks),
        in_specs=[pl.BlockSpec(memory_space=pltpu.SMEM)] + [tile(x) for x in tiles] + run_specs + [state_spec],
        out_specs=[tile(x) for x in tile_outs] + [state_spec] * len(state_outs),
        out_shape=list(tile_outs) + list(state_outs),
        scratch_shapes=[pltpu.VMEM((dk, dv), _F32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name=name,
    )(ld, *tiles, *runs, state)


def _prepare(q, k, v, rel_bt, chunk_size):
    """Padded [B, H, N*C, D] layouts of q, k, v and the (row, column) run blocks."""
    if chunk_size % 8:
        raise ValueError(f"chunk_size must be a multiple of 8 for the TPU kernels (sublane tiling); got {chunk_size}")
    b, t = rel_bt.shape
    n = -(-t // chunk_size)
    rel = jnp.pad(rel_bt, ((0, 0), (0, n * chunk_size - t)), mode="edge").reshape(b, n, chunk_size)
    layout = functools.partial(_layout, num_chunks=n, chunk_size=chunk_size)
    return (layout(q), layout(k), layout(v)), (rel[:, :, None, :], rel[:, :, :, None]), n


def lightning_fwd_tpu(q, k, v, log_decay, rel_bt, state0_bhkv, *, scale, chunk_size, interpret=False):
    """Forward. q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H]; rel_bt [B, T] (reference.chunk_relative_runs);
    state0 [B, H, K, V] float32 -> (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32)."""
    (q_, k_, v_), runs, _ = _prepare(q, k, v, rel_bt, chunk_size)
    o, state = _call(_fwd_kernel, log_decay.astype(_F32), (q_, k_, v_), runs, state0_bhkv.astype(_F32),
                     [jax.ShapeDtypeStruct(v_.shape, v.dtype)], [jax.ShapeDtypeStruct(state0_bhkv.shape, _F32)],
                     chunk_size=chunk_size, length=q.shape[1], scale=scale, reverse=False, interpret=interpret,
                     name="lightning_fwd")
    return o.transpose(0, 2, 1, 3)[:, :q.shape[1]], state


def lightning_bwd_tpu(q, k, v, log_decay, rel_bt, state0_bhkv, do_bthv, dfinal_bhkv, *, scale, chunk_size,
                      interpret=False):
    """Backward of lightning_fwd_tpu given do [B, T, H, V] and d final state [B, H, K, V]: (dq, dk, dv in the input
    dtypes, d state0 [B, H, K, V] float32)."""
    (q_, k_, v_), runs, n = _prepare(q, k, v, rel_bt, chunk_size)
    do_ = _layout(do_bthv.astype(v.dtype), n, chunk_size)
    t = q.shape[1]
    common = dict(chunk_size=chunk_size, length=t, scale=scale, interpret=interpret)
    ld = log_decay.astype(_F32)
    (dq,) = _call(_dq_kernel, ld, (k_, v_, do_), runs, state0_bhkv.astype(_F32),
                  [jax.ShapeDtypeStruct(q_.shape, q.dtype)], [], reverse=False, name="lightning_bwd_dq", **common)
    dk, dv, ds0 = _call(_dkv_kernel, ld, (q_, k_, v_, do_), runs, dfinal_bhkv.astype(_F32),
                        [jax.ShapeDtypeStruct(k_.shape, k.dtype), jax.ShapeDtypeStruct(v_.shape, v.dtype)],
                        [jax.ShapeDtypeStruct(dfinal_bhkv.shape, _F32)],
                        reverse=True, name="lightning_bwd_dkv", **common)
    back = lambda x: x.transpose(0, 2, 1, 3)[:, :t]
    return back(dq), back(dk), back(dv), ds0
