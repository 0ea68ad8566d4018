"""Lightning attention Triton-style GPU kernels (Pallas): forward, dq (forward loop) and dk/dv/d-state (reverse loop).

One program per (batch, head, V block) runs a lax.fori_loop over chunks with the [K, block_v] float32 state (or its
cotangent) as the loop carry. Tensors keep their [B, T, H, D] layout (a block is the strided [T, D] slab of one
head) and the ragged last chunk uses masked loads and stores, so no padded copy of the sequence is made. Triton
tiles need power-of-2 sizes, so K and V are zero padded up to one when they are not. Splitting V into blocks
repeats the q k^T work but multiplies the parallelism; dq and dk are then summed over the V blocks outside.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.lightning.reference import chunk_decays, tile_dot

_F32 = jnp.float32


def _load_chunk(ci, refs, rel_ref, g, *, chunk_size, length, transposed=False):
    """The chunk's [C, D] tiles of `refs` (zeros past `length`), its decay factors and the row validity mask.
    g is read before the loop: interpret mode only maps a program_id at the kernel's top level."""
    start = pl.multiple_of(ci * chunk_size, chunk_size)
    rows = pl.ds(start, chunk_size)
    valid = start + lax.broadcasted_iota(jnp.int32, (chunk_size,), 0) < length
    tiles = [plgpu.load(r.at[rows, :], mask=jnp.broadcast_to(valid[:, None], (chunk_size, r.shape[1])), other=0)
             for r in refs]
    # Runs never decrease within a chunk and padded rows read 0, so the max is the last valid position's run.
    rel = plgpu.load(rel_ref.at[rows], mask=valid, other=0)
    d = chunk_decays(g, rel[:, None], rel[None, :], jnp.max(rel), start, chunk_size, length, transposed=transposed)
    return tiles, d, valid[:, None]


def _store(ref, ci, chunk_size, x, valid):
    rows = pl.ds(pl.multiple_of(ci * chunk_size, chunk_size), chunk_size)
    plgpu.store(ref.at[rows, :], x.astype(ref.dtype), mask=jnp.broadcast_to(valid, x.shape))


def _fwd_kernel(ld_ref, q_ref, k_ref, v_ref, rel_ref, s0_ref, o_ref, sf_ref, *, scale, chunk_size, length):
    dt = q_ref.dtype
    g = ld_ref[pl.program_id(1)]
    load = functools.partial(_load_chunk, chunk_size=chunk_size, length=length)

    def body(ci, s):
        (q, k, v), d, valid = load(ci, (q_ref, k_ref, v_ref), rel_ref, g)
        scores = tile_dot(q, k, dt, trans_b=True) * (scale * d.intra)
        o = tile_dot(scores, v, dt) + tile_dot(q.astype(_F32) * (scale * d.into), s, dt)
        _store(o_ref, ci, chunk_size, o, valid)
        return d.through * s + tile_dot(k.astype(_F32) * d.out, v, dt, trans_a=True)

    sf_ref[...] = lax.fori_loop(0, pl.cdiv(length, chunk_size), body, s0_ref[...])


def _dq_kernel(ld_ref, k_ref, v_ref, do_ref, rel_ref, s0_ref, dq_ref, *, scale, chunk_size, length):
    dt = k_ref.dtype
    g = ld_ref[pl.program_id(1)]
    load = functools.partial(_load_chunk, chunk_size=chunk_size, length=length)

    def body(ci, s):
        (k, v, do), d, valid = load(ci, (k_ref, v_ref, do_ref), rel_ref, g)
        dp = tile_dot(do, v, dt, trans_b=True) * d.intra
        dq = tile_dot(dp, k, dt) + tile_dot(do.astype(_F32) * d.into, s, dt, trans_b=True)
        _store(dq_ref, ci, chunk_size, scale * dq, valid)
        return d.through * s + tile_dot(k.astype(_F32) * d.out, v, dt, trans_a=True)

    lax.fori_loop(0, pl.cdiv(length, chunk_size), body, s0_ref[...])


def _dkv_kernel(ld_ref, q_ref, k_ref, v_ref, do_ref, rel_ref, dsf_ref, dk_ref, dv_ref, ds0_ref, *, scale, chunk_size,
                length):
    dt = q_ref.dtype
    num_chunks = pl.cdiv(length, chunk_size)
    g = ld_ref[pl.program_id(1)]
    load = functools.partial(_load_chunk, chunk_size=chunk_size, length=length, transposed=True)

    def body(i, ds):
        ci = num_chunks - 1 - i
        (q, k, v, do), d, valid = load(ci, (q_ref, k_ref, v_ref, do_ref), rel_ref, g)
        dp_t = tile_dot(v, do, dt, trans_b=True) * (scale * d.intra)
        dk = tile_dot(dp_t, q, dt) + tile_dot(v.astype(_F32) * d.out, ds, dt, trans_b=True)
        scores_t = tile_dot(k, q, dt, trans_b=True) * (scale * d.intra)
        dv = tile_dot(scores_t, do, dt) + tile_dot(k.astype(_F32) * d.out, ds, dt)
        _store(dk_ref, ci, chunk_size, dk, valid)
        _store(dv_ref, ci, chunk_size, dv, valid)
        return d.through * ds + tile_dot(q.astype(_F32) * (scale * d.into), do, dt, trans_a=True)

    ds0_ref[...] = lax.fori_loop(0, num_chunks, body, dsf_ref[...])


def _pow2_pad(x, axis):
    """Zero pads `axis` to a power of 2 of at least 16 (the smallest Triton dot operand)."""
    size = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, max(16, pl.next_power_of_2(size)) - size)
    return jnp.pad(x, pad)


def _call(kernel, ld, full_k, v_blocked, rel, state, outs, *, block_v, chunk_size, scale, num_warps, num_stages,
          interpret, name):
    """Grid (B, H, V blocks). full_k: [B, T, H, Kp] tensors seen whole by every V block; v_blocked: [B, T, H, Vp]
    tensors split into V blocks; state [B, H, Kp, Vp]. outs: (shape, kind) with kind "k_partial" ([NV, B, T, H, Kp],
    one slab per V block), "v" ([B, T, H, Vp]) or "state"."""
    b, t, h, dk = full_k[0].shape
    nv = state.shape[-1] // block_v
    k_spec = pl.BlockSpec((None, t, None, dk), lambda bi, hi, j: (bi, 0, hi, 0))
    v_spec = pl.BlockSpec((None, t, None, block_v), lambda bi, hi, j: (bi, 0, hi, j))
    state_spec = pl.BlockSpec((None, None, dk, block_v), lambda bi, hi, j: (bi, hi, 0, j))
    out_specs = {"k_partial": pl.BlockSpec((None, None, t, None, dk), lambda bi, hi, j: (j, bi, 0, hi, 0)),
                 "v": v_spec, "state": state_spec}
    return pl.pallas_call(
        functools.partial(kernel, scale=scale, chunk_size=chunk_size, length=t),
        grid=(b, h, nv),
        in_specs=[pl.BlockSpec(memory_space=None)] + [k_spec] * len(full_k) + [v_spec] * len(v_blocked)
        + [pl.BlockSpec((None, t), lambda bi, hi, j: (bi, 0)), state_spec],
        out_specs=[out_specs[kind] for _, kind in outs],
        out_shape=[shape for shape, _ in outs],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=name,
    )(ld, *full_k, *v_blocked, rel, state)


def _prepare(q, k, v, state, block_v, chunk_size):
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of 2 >= 16 for the GPU kernels (Triton tiles); got {chunk_size}")
    dk, dv = q.shape[3], v.shape[3]
    q, k, v, state = _pow2_pad(q, 3), _pow2_pad(k, 3), _pow2_pad(v, 3), _pow2_pad(_pow2_pad(state, 2), 3)
    block_v = min(block_v, v.shape[3])
    return q, k, v, state, block_v, state.shape[3] // block_v, (dk, dv)


def lightning_fwd_gpu(q, k, v, log_decay, rel_bt, state0_bhkv, *, scale, chunk_size, interpret=False, block_v=64,
                      num_warps=8, num_stages=2):
    """Forward. q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H]; rel_bt [B, T] (reference.chunk_relative_runs);
    state0 [B, H, K, V] float32 -> (o [B, T, H, V] in v's dtype, final state [B, H, K, V] float32)."""
    q_, k_, v_, s0, block_v, _, (dk, dv) = _prepare(q, k, v, state0_bhkv.astype(_F32), block_v, chunk_size)
    o, sf = _call(_fwd_kernel, log_decay.astype(_F32), (q_, k_), (v_,), rel_bt, s0,
                  [(jax.ShapeDtypeStruct(v_.shape, v.dtype), "v"), (jax.ShapeDtypeStruct(s0.shape, _F32), "state")],
                  block_v=block_v, chunk_size=chunk_size, scale=scale, num_warps=num_warps, num_stages=num_stages,
                  interpret=interpret, name="lightning_fwd")
    return o[..., :dv], sf[:, :, :dk, :dv]


def lightning_bwd_gpu(q, k, v, log_decay, rel_bt, state0_bhkv, do_bthv, dfinal_bhkv, *, scale, chunk_size,
                      interpret=False, block_v=64, num_warps=8, num_stages=2):
    """Backward of lightning_fwd_gpu given do [B, T, H, V] and d final state [B, H, K, V]: (dq, dk, dv in the input
    dtypes, d state0 [B, H, K, V] float32)."""
    q_, k_, v_, s0, block_v, nv, (dk, dv) = _prepare(q, k, v, state0_bhkv.astype(_F32), block_v, chunk_size)
    do_ = _pow2_pad(do_bthv.astype(v.dtype), 3)
    dsf = _pow2_pad(_pow2_pad(dfinal_bhkv.astype(_F32), 2), 3)
    partial_dt = q.dtype if nv == 1 else _F32  # V-block partials are summed in float32
    k_partial = jax.ShapeDtypeStruct((nv,) + q_.shape, partial_dt)
    common = dict(block_v=block_v, chunk_size=chunk_size, scale=scale, num_warps=num_warps, num_stages=num_stages,
                  interpret=interpret)
    ld = log_decay.astype(_F32)
    (dq,) = _call(_dq_kernel, ld, (k_,), (v_, do_), rel_bt, s0, [(k_partial, "k_partial")], name="lightning_bwd_dq",
                  **common)
    dk_, dv_, ds0 = _call(_dkv_kernel, ld, (q_, k_), (v_, do_), rel_bt, dsf,
                          [(k_partial, "k_partial"), (jax.ShapeDtypeStruct(v_.shape, v.dtype), "v"),
                           (jax.ShapeDtypeStruct(dsf.shape, _F32), "state")], name="lightning_bwd_dkv", **common)
    total = lambda x, like: x.sum(0, dtype=_F32).astype(like.dtype)[..., :dk]
    return total(dq, q), total(dk_, k), dv_[..., :dv], ds0[:, :, :dk, :dv]
