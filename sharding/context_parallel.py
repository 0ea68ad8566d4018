"""shard_map islands around the attention kernels: batch and heads split as the rules say, and the sequence split
over the `length` mesh axis (context parallelism).

GSPMD cannot partition a Pallas call, so under a mesh every kernel call runs inside jax.shard_map on its local
block. With the sequence split over n shards:

* Lightning: each shard scans its part from a zero state. The state entering shard j is the exclusive scan over
  shards of the affine maps S -> A_i S + B_i (A_i: the decay over shard i, zero if a document starts inside it;
  B_i: shard i's own final state), computed in log2(n) collective-permute rounds. Each token then adds what
  the entering state contributes to it, scale · exp(g·(t+1)) · q_t S_in, if no document starts between the
  shard's start and t.
* MLA: the compressed latent (kv_lora_rank + rope values per token) is all-gathered, never per-head K/V; each
  shard expands K/V for its heads. The gathered keys are rolled so that this shard's queries sit at the end
  (the kernels align queries bottom-right), and the keys rolled around from the future are masked with a segment
  id no query has. Every shard attends to all T keys, so the work is balanced across shards (at the cost of the
  masked half); a zig-zag chunk order would save it, see docs/sharding.md.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from pallas_kernels import lightning_attention as lightning_kernel
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


def _exclusive_affine_scan(a_bh, b_bhkv, state0_bhkv, axis: str):
    """State entering each shard: the maps S -> a_i S + b_i of shards 0..j-1 applied to state0 (Hillis-Steele
    over collective permutes). Returns (entering state, state after the last shard on every shard)."""
    n, idx = lax.axis_size(axis), lax.axis_index(axis)
    b_bhkv = jnp.where(idx == 0, b_bhkv + a_bh[..., None, None] * state0_bhkv, b_bhkv)
    d = 1
    while d < n:
        shift = [(i, i + d) for i in range(n - d)]
        a_prev, b_prev = lax.ppermute(a_bh, axis, shift), lax.ppermute(b_bhkv, axis, shift)
        has_prev = idx >= d
        b_bhkv = jnp.where(has_prev, a_bh[..., None, None] * b_prev + b_bhkv, b_bhkv)
        a_bh = jnp.where(has_prev, a_bh * a_prev, a_bh)
        d *= 2
    entering = lax.ppermute(b_bhkv, axis, [(i, i + 1) for i in range(n - 1)])
    entering = jnp.where(idx == 0, state0_bhkv, entering)
    final = lax.psum(jnp.where(idx == n - 1, b_bhkv, 0.0), axis)
    return entering, final


def _lightning_local(q, k, v, log_decay, state0, segment_ids, *, axis, impl, interpret):
    if axis is None:
        return lightning_kernel(q, k, v, log_decay, initial_state=state0, segment_ids=segment_ids, impl=impl,
                                interpret=interpret)
    o_bthv, own_bhkv = lightning_kernel(q, k, v, log_decay, segment_ids=segment_ids, impl=impl, interpret=interpret)
    b, t, h, dk = q.shape
    idx = lax.axis_index(axis)
    if segment_ids is None:
        connected_bt = jnp.ones((b, t), bool)
    else:
        n = lax.axis_size(axis)
        prev_last_b = lax.ppermute(segment_ids[:, -1], axis, [(i, i + 1) for i in range(n - 1)])
        starts_bt = jnp.concatenate([((segment_ids[:, 0] != prev_last_b) & (idx > 0))[:, None],
                                     segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
        connected_bt = jnp.cumsum(starts_bt, axis=1) == 0
    g_h = log_decay.astype(jnp.float32)
    through_bh = jnp.where(connected_bt[:, -1:], jnp.exp(g_h * t)[None], 0.0)
    state0 = jnp.zeros_like(own_bhkv) if state0 is None else state0.astype(jnp.float32)
    entering_bhkv, final_bhkv = _exclusive_affine_scan(through_bh, own_bhkv, state0, axis)
    steps_t = jnp.arange(1, t + 1, dtype=jnp.float32)
    into_bth = jnp.where(connected_bt[..., None], jnp.exp(g_h[None, None] * steps_t[None, :, None]), 0.0)
    q_scaled = q.astype(jnp.float32) * (dk ** -0.5 * into_bth)[..., None]
    o_bthv = o_bthv.astype(jnp.float32) + jnp.einsum("bthk,bhkv->bthv", q_scaled, entering_bhkv, precision=_HIGHEST)
    return o_bthv.astype(v.dtype), final_bhkv


def lightning_attention(q, k, v, log_decay, *, initial_state=None, segment_ids=None, impl="auto", interpret=False):
    """pallas_kernels.lightning_attention (same arguments and results), sharded under the active mesh.

    q, k [B, T, H, K]; v [B, T, H, V]; log_decay [H]; initial_state [B, H, K, V] or None; segment_ids [B, T] or
    None -> (o [B, T, H, V], final state [B, H, K, V] float32). Without a mesh it is the kernel call itself.
    """
    mesh = active_mesh()
    if mesh is None:
        return lightning_kernel(q, k, v, log_decay, initial_state=initial_state, segment_ids=segment_ids, impl=impl,
                                interpret=interpret)
    qkv_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q.shape, mesh)
    axis = _split_axis(qkv_spec, 1)
    batch, heads = qkv_spec[0], qkv_spec[2]
    state_spec = P(batch, heads, None, None)
    seg_spec = None if segment_ids is None else P(batch, axis)
    body = functools.partial(_lightning_local, axis=axis, impl=impl, interpret=interpret)
    island = jax.shard_map(body, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(heads),
                                           None if initial_state is None else state_spec, seg_spec),
                           out_specs=(qkv_spec, state_spec), check_vma=False)
    return island(q, k, v, log_decay, initial_state, segment_ids)


def _mla_local(q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, segment_ids, *, attend, axis):
    if axis is None:
        return attend(q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, segment_ids=segment_ids)
    b, t = latent_btr.shape[:2]
    n, idx = lax.axis_size(axis), lax.axis_index(axis)
    gather = functools.partial(lax.all_gather, axis_name=axis, axis=1, tiled=True)
    # Roll the gathered keys so this shard's own keys end the sequence: the causal mask, aligned bottom-right,
    # then lets query i (global position idx·t + i) see exactly the keys up to its position.
    shift = n * t - (idx + 1) * t
    roll = functools.partial(jnp.roll, shift=shift, axis=1)
    q_seg_bt = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    kv_seg_bt = roll(gather(q_seg_bt))
    wrapped_t = jnp.arange(n * t) < shift  # keys rolled around from after this shard's last query
    kv_seg_bt = jnp.where(wrapped_t[None], jnp.min(kv_seg_bt) - 1, kv_seg_bt)
    return attend(q_nope, q_rot, roll(gather(latent_btr)), roll(gather(k_rot_btp)), w_uk, w_uv,
                  segment_ids=(q_seg_bt, kv_seg_bt))


def mla_attention(attend, q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, *, segment_ids=None):
    """Causal MLA from the compressed latent, sharded under the active mesh.

    attend(q_nope, q_rot, latent, k_rot, w_uk, w_uv, segment_ids=...) -> o is the per-shard attention (it expands
    K/V from the latent and calls the kernel). q_nope [B, T, H, N], q_rot [B, T, H, R]; latent [B, T, C];
    k_rot [B, T, R]; w_uk [C, H, N], w_uv [C, H, V]; segment_ids [B, T] or None -> o [B, T, H, V].
    """
    mesh = active_mesh()
    if mesh is None:
        return attend(q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, segment_ids=segment_ids)
    q_spec = logical_to_spec(("batch", "length", "heads", "head_dim"), q_nope.shape, mesh)
    batch, axis, heads = q_spec[0], _split_axis(q_spec, 1), q_spec[2]
    tok_spec, w_spec = P(batch, axis, None), P(None, heads, None)
    body = functools.partial(_mla_local, attend=attend, axis=axis)
    island = jax.shard_map(body, in_specs=(q_spec, q_spec, tok_spec, tok_spec, w_spec, w_spec,
                                           None if segment_ids is None else P(batch, axis)),
                           out_specs=q_spec, check_vma=False)
    return island(q_nope, q_rot, latent_btr, k_rot_btp, w_uk, w_uv, segment_ids)

