"""shard_map islands around the attention kernels: batch and heads split as the rules say, and the sequence split
over the `length` mesh axis (context parallelism).

GSPMD cannot partition a Pallas call, so under a mesh every kernel call runs inside jax.shard_map on its local
block. With the sequence split over n shards:

* Token order. A full forward whose length 2n divides runs in zig-zag order (`zigzag_shards`, `to_zigzag`,
  `from_zigzag`): the sequence is cut into 2n chunks and shard j holds chunks j and 2n-1-j, so every shard has
  the same causal attention work. Token-wise layers do not care about the order; the two islands below do.
  Otherwise shard j holds the contiguous chunk j.
* Lightning: each shard scans its piece(s) from a zero state. The state entering a piece is the exclusive scan,
  along the chain of pieces in sequence order, of the affine maps S -> A_i S + B_i (A_i: the decay over piece i,
  zero if a document starts inside it; B_i: piece i's own final state), computed in log2(n) collective-permute
  rounds. In zig-zag order the first pieces (chunks 0..n-1) chain up the shards and the second pieces (chunks
  n..2n-1) chain down them, starting from the state after chunk n-1. Each token then adds what the entering state
  contributes to it, scale · exp(g·(t+1)) · q_t S_in, if no document starts between the piece's start and t.
* MLA: the compressed latent (kv_lora_rank + rope values per token) is all-gathered, never per-head K/V, and put
  back in sequence order; each shard expands K/V for its heads and attends with each query piece's position as
  the kernel's causal `q_offset`, so the kernels skip the key blocks after it.

With a decode cache (serving), the MLA page pools are whole on every shard: cached prefill attends each shard's
query piece to the whole cache window at its offset, and the decode kernel runs on each shard's batch rows and
heads.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels import lightning_attention as lightning_kernel
from pallas_kernels import mla_decode as mla_decode_kernel
from sharding.mesh import active_mesh
from sharding.rules import logical_to_spec

_HIGHEST = lax.Precision.HIGHEST


def _split_axis(spec: P, dim: int) -> str | None:
    """The mesh axis dim `dim` of `spec` is split over; context parallelism passes state along a single axis."""
    entry = spec[dim] if dim < len(spec) else None
    if entry is None or isinstance(entry, str):
        return entry
    if len(entry) > 1:
        raise ValueError(f"the sequence is split over several mesh axes {entry}; context parallelism needs one")
    return entry[0]


def _token_head_spec(x_bthd, mesh):
    """(spec, batch axes, sequence axis, head axes) of a [B, T, H, D] activation under the rules."""
    spec = logical_to_spec(("batch", "length", "heads", "head_dim"), x_bthd.shape, mesh)
    return spec, spec[0], _split_axis(spec, 1), spec[2]


# ----- zig-zag token order -----

def zigzag_shards(shape_bt) -> int:
    """n when a full forward over a [B, T] batch runs in zig-zag order under the active mesh (the sequence is
    split over n > 1 shards and 2n divides T), else 0."""
    mesh = active_mesh()
    if mesh is None:
        return 0
    axis = _split_axis(logical_to_spec(("batch", "length"), shape_bt, mesh), 1)
    n = 0 if axis is None else mesh.shape[axis]
    return n if n > 1 and shape_bt[1] % (2 * n) == 0 else 0


def _owner(chunk: int, n: int) -> int:
    """The shard holding `chunk` (of 2n) in zig-zag order."""
    return chunk if chunk < n else 2 * n - 1 - chunk


def _reorder_local(x, *, axis, to_zigzag):
    """Natural <-> zig-zag on one shard's [b, 2c, ...] block: two collective permutes, each a bijection (every
    shard holds one even and one odd chunk in both orders), so every token moves once."""
    n, idx = lax.axis_size(axis), lax.axis_index(axis)
    first, second = jnp.split(x, 2, axis=1)
    j_even = idx % 2 == 0
    if to_zigzag:  # natural shard s holds chunks (2s, 2s+1)
        even = lax.ppermute(first, axis, [(s, _owner(2 * s, n)) for s in range(n)])
        odd = lax.ppermute(second, axis, [(s, _owner(2 * s + 1, n)) for s in range(n)])
        return jnp.where(j_even, jnp.concatenate([even, odd], 1), jnp.concatenate([odd, even], 1))
    even = lax.ppermute(jnp.where(j_even, first, second), axis, [(_owner(2 * s, n), s) for s in range(n)])
    odd = lax.ppermute(jnp.where(j_even, second, first), axis, [(_owner(2 * s + 1, n), s) for s in range(n)])
    return jnp.concatenate([even, odd], 1)


def _reorder(x, to_zigzag: bool):
    mesh = active_mesh()
    spec = logical_to_spec(("batch", "length") + (None,) * (x.ndim - 2), x.shape, mesh)
    body = functools.partial(_reorder_local, axis=_split_axis(spec, 1), to_zigzag=to_zigzag)
    return jax.shard_map(body, in_specs=spec, out_specs=spec, check_vma=False)(x)


def to_zigzag(x):
    """[B, T, ...] in sequence order -> zig-zag order (see zigzag_shards; call only when it is nonzero)."""
    return _reorder(x, True)


def from_zigzag(x):
    """Inverse of to_zigzag."""
    return _reorder(x, False)


# ----- Lightning -----

def _chain(axis: str, reverse: bool):
    """A chain of pieces, one per shard, up the shards (or down them if `reverse`): (this shard's rank in the
    chain, shift) where shift(d) are the collective-permute pairs from rank r to rank r + d."""
    n, idx = lax.axis_size(axis), lax.axis_index(axis)
    dev = (lambda r: n - 1 - r) if reverse else (lambda r: r)
    return (n - 1 - idx if reverse else idx), (lambda d: [(dev(r), dev(r + d)) for r in range(n - d)])


def _exclusive_affine_scan(a_bh, b_bhkv, state0_bhkv, axis: str, reverse: bool):
    """State entering each shard's piece: the maps S -> a_i S + b_i of the pieces before it in the chain (up the
    shards, or down them if `reverse`) applied to state0, by Hillis-Steele over collective permutes. Returns
    (entering state, state after the chain's last piece, on every shard)."""
    n = lax.axis_size(axis)
    rank, shift = _chain(axis, reverse)
    b_bhkv = jnp.where(rank == 0, b_bhkv + a_bh[..., None, None] * state0_bhkv, b_bhkv)
    d = 1
    while d < n:
        a_prev, b_prev = lax.ppermute(a_bh, axis, shift(d)), lax.ppermute(b_bhkv, axis, shift(d))
        has_prev = rank >= d
        b_bhkv = jnp.where(has_prev, a_bh[..., None, None] * b_prev + b_bhkv, b_bhkv)
        a_bh = jnp.where(has_prev, a_bh * a_prev, a_bh)
        d *= 2
    entering = lax.ppermute(b_bhkv, axis, shift(1))
    entering = jnp.where(rank == 0, state0_bhkv, entering)
    final = lax.psum(jnp.where(rank == n - 1, b_bhkv, 0.0), axis)
    return entering, final


def _chain_piece(o_bthv, own_bhkv, q_bthk, seg_bt, g_h, state0_bhkv, seg_before_b, *, axis, reverse):
    """Correct one piece per shard (chained up or down the shards) for the state entering it. seg_before_b: the
    segment id just before the chain's first piece (None: the chain starts the sequence)."""
    b, t, h, dk = q_bthk.shape
    rank, shift = _chain(axis, reverse)
    if seg_bt is None:
        connected_bt = jnp.ones((b, t), bool)
    else:
        prev_last_b = lax.ppermute(seg_bt[:, -1], axis, shift(1))
        first_starts_b = seg_bt[:, 0] != prev_last_b
        if seg_before_b is None:
            first_starts_b &= rank > 0
        else:
            first_starts_b = jnp.where(rank > 0, first_starts_b, seg_bt[:, 0] != seg_before_b)
        starts_bt = jnp.concatenate([first_starts_b[:, None], seg_bt[:, 1:] != seg_bt[:, :-1]], axis=1)
        connected_bt = jnp.cumsum(starts_bt, axis=1) == 0
    through_bh = jnp.where(connected_bt[:, -1:], jnp.exp(g_h * t)[None], 0.0)
    entering_bhkv, final_bhkv = _exclusive_affine_scan(through_bh, own_bhkv, state0_bhkv, axis, reverse)
    steps_t = jnp.arange(1, t + 1, dtype=jnp.float32)
    into_bth = jnp.where(connected_bt[..., None], jnp.exp(g_h[None, None] * steps_t[None, :, None]), 0.0)
    q_scaled = q_bthk.astype(jnp.float32) * (dk ** -0.5 * into_bth)[..., None]
    o_bthv = o_bthv.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", q_scaled, entering_bhkv, precision=_HIGHEST)
    return o_bthv, final_bhkv


def _lightning_local(q, k, v, log_decay, state0, segment_ids, *, axis, zigzag, impl, interpret):
    if axis is None:
        return lightning_kernel(q, k, v, log_decay, initial_state=state0, segment_ids=segment_ids, impl=impl,
                                interpret=interpret)
    # The local tokens are one piece (contiguous order) or two (zig-zag: chunk j, then chunk 2n-1-j); one kernel
    # call runs every piece from a zero state, the pieces stacked on the batch axis.
    chains = (False, True) if zigzag else (False,)
    pieces = lambda a: None if a is None else jnp.split(a, len(chains), axis=1)
    stack = lambda a: None if a is None else jnp.concatenate(pieces(a), axis=0)
    o_all, own_all = lightning_kernel(stack(q), stack(k), stack(v), log_decay, segment_ids=stack(segment_ids),
                                      impl=impl, interpret=interpret)
    b = q.shape[0]
    g_h = log_decay.astype(jnp.float32)
    state = jnp.zeros_like(own_all[:b]) if state0 is None else state0.astype(jnp.float32)
    q_p, seg_p = pieces(q), pieces(segment_ids) or [None] * len(chains)
    outs, seg_before = [], None
    for p, reverse in enumerate(chains):
        o_bthv, state = _chain_piece(o_all[p * b:(p + 1) * b], own_all[p * b:(p + 1) * b], q_p[p], seg_p[p], g_h,
                                     state, seg_before, axis=axis, reverse=reverse)
        outs.append(o_bthv)
        # The down chain starts at the last shard right after its first piece (chunk n-1, then chunk n).
        seg_before = None if seg_p[p] is None else seg_p[p][:, -1]
    return jnp.concatenate(outs, axis=1).astype(v.dtype), state


def lightning_attention(q, k, v, log_decay, *, initial_state=None, segment_ids=None, zigzag=False, impl="auto",
                        interpret=False):
    """pallas_kernels.lightning_attention (same arguments and results), sharded under the active mesh.

    q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H]; initial_state [B, H, K, V] or None; segment_ids [B, T] or
    None -> (o [B, T, H, V], final state [B, H, K, V] float32). zigzag: the tokens are in zig-zag order
    (`to_zigzag`). Without a mesh it is the kernel call itself.
    """
    mesh = active_mesh()
    if mesh is None:
        return lightning_kernel(q, k, v, log_decay, initial_state=initial_state, segment_ids=segment_ids, impl=impl,
                                interpret=interpret)
    qkv_spec, batch, axis, heads = _token_head_spec(q, mesh)
    state_spec = P(batch, heads, None, None)
    seg_spec = None if segment_ids is None else P(batch, axis)
    body = functools.partial(_lightning_local, axis=axis, zigzag=zigzag and axis is not None, impl=impl,
                             interpret=interpret)
    island = jax.shard_map(body, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(heads),
                                           None if initial_state is None else state_spec, seg_spec),
                           out_specs=(qkv_spec, state_spec), check_vma=False)
    return island(q, k, v, log_decay, initial_state, segment_ids)


def _mla_local(q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, segment_ids, *, attend, axis, zigzag):
    if axis is None:
        return attend(q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, segment_ids=segment_ids)
    t = latent_btr.shape[1]
    n, idx = lax.axis_size(axis), lax.axis_index(axis)
    if zigzag:
        # Gathered shard-major, the chunks come as 0, 2n-1, 1, 2n-2, ...; put them back in sequence order.
        c = t // 2
        slot = [2 * _owner(m, n) + (m >= n) for m in range(2 * n)]  # shard-major position of chunk m
        order = np.concatenate([np.arange(c) + c * s for s in slot])
        starts = (idx * c, (2 * n - 1 - idx) * c)
    else:
        order, starts = None, (idx * t,)
    gather = lambda x: lax.all_gather(x, axis, axis=1, tiled=True)
    in_order = lambda x: gather(x) if order is None else jnp.take(gather(x), order, axis=1)
    latent, k_rot = in_order(latent_btr), in_order(k_rot_btp)
    kv_seg_bt = None if segment_ids is None else in_order(segment_ids)
    width = t // len(starts)
    outs = []
    for p, start in enumerate(starts):
        piece = lambda x: x[:, p * width:(p + 1) * width]
        segs = None if segment_ids is None else (piece(segment_ids), kv_seg_bt)
        outs.append(attend(piece(q_nope), piece(q_rot), latent, k_rot, w_uk, w_uv, segment_ids=segs,
                           q_offset=start))
    return jnp.concatenate(outs, axis=1)


def mla_attention(attend, q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, *, segment_ids=None, zigzag=False):
    """Causal MLA from the compressed latent, sharded under the active mesh.

    attend(q_nope, q_rot, latent, k_rot, w_uk, w_uv, segment_ids=..., q_offset=None) -> o is the per-shard
    attention (it expands K/V from the latent and calls the kernel; q_offset is the key position of query 0).
    q_nope [B, T, H, N], q_rot [B, T, H, R]; latent [B, T, C]; k_rot [B, T, R]; w_uk [C, H, N], w_uv [C, H, V];
    segment_ids [B, T] or None; zigzag: the tokens are in zig-zag order -> o [B, T, H, V].
    """
    mesh = active_mesh()
    if mesh is None:
        return attend(q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, segment_ids=segment_ids)
    q_spec, batch, axis, heads = _token_head_spec(q_nope, mesh)
    tok_spec, w_spec = P(batch, axis, None), P(None, heads, None)
    body = functools.partial(_mla_local, attend=attend, axis=axis, zigzag=zigzag and axis is not None)
    island = jax.shard_map(body, in_specs=(q_spec, q_spec, tok_spec, tok_spec, w_spec, w_spec,
                                           None if segment_ids is None else P(batch, axis)),
                           out_specs=q_spec, check_vma=False)
    return island(q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, segment_ids)


def mla_attention_cached(attend, q_nope, q_rot, latent_bwc, k_rot_bwr, w_uk, w_uv, *, segment_ids):
    """Causal MLA of a chunk of T new tokens against a cache window of W >= T keys ending with them, sharded
    under the active mesh: batch and heads split, the queries split over `length` (each shard attending at its
    piece's causal offset), the window whole on every shard (it is read from the replicated page pools).

    attend as for mla_attention; q_nope [B, T, H, N], q_rot [B, T, H, R]; latent [B, W, C]; k_rot [B, W, R];
    segment_ids (q [B, T], kv [B, W]) -> o [B, T, H, V].
    """
    mesh = active_mesh()
    if mesh is None:
        return attend(q_nope, q_rot, latent_bwc, k_rot_bwr, w_uk, w_uv, segment_ids=segment_ids)
    q_spec, batch, axis, heads = _token_head_spec(q_nope, mesh)
    window = latent_bwc.shape[1]

    def body(q_nope, q_rot, latent, k_rot, w_uk, w_uv, segs):
        t = q_nope.shape[1]
        start = window - t * (1 if axis is None else lax.axis_size(axis) - lax.axis_index(axis))
        return attend(q_nope, q_rot, latent, k_rot, w_uk, w_uv, segment_ids=segs, q_offset=start)

    island = jax.shard_map(body, in_specs=(q_spec, q_spec, P(batch, None, None), P(batch, None, None),
                                           P(None, heads, None), P(None, heads, None), (P(batch, axis), P(batch))),
                           out_specs=q_spec, check_vma=False)
    return island(q_nope, q_rot, latent_bwc, k_rot_bwr, w_uk, w_uv, segment_ids)


def mla_decode(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths, *, scale, impl, interpret):
    """pallas_kernels.mla_decode (same arguments and result) under the active mesh: batch rows and heads split as
    the rules say, every shard reading the page pools (whole on each shard) through its own rows' page tables.
    q_latent [B, H, C], q_rope [B, H, R] -> o_latent [B, H, C]."""
    decode = functools.partial(mla_decode_kernel, scale=scale, impl=impl, interpret=interpret)
    mesh = active_mesh()
    if mesh is None:
        return decode(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths)
    q_spec = logical_to_spec(("batch", "heads", None), q_latent.shape, mesh)
    batch = q_spec[0]
    island = jax.shard_map(decode, in_specs=(q_spec, q_spec, P(), P(), P(batch, None), P(batch)),
                           out_specs=q_spec, check_vma=False)
    return island(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths)
