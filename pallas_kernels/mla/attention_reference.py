"""Exact jnp MLA attention: the twin every kernel is tested against.

Queries are processed in blocks with the full-key fp32 softmax per block, so memory is
O(B·H·block·Tk) rather than O(Tq·Tk); each block is rematerialised in the backward pass for the
same reason.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST


def split_segment_ids(segment_ids, tq: int, tk: int, batch: int):
  """Normalises `segment_ids` to (q_segment_ids [B, Tq], kv_segment_ids [B, Tk]) int32, or None."""
  if segment_ids is None:
    return None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError(f"segment_ids tuple must be (q_segment_ids, kv_segment_ids), got {len(segment_ids)} items")
    q_seg_bt, kv_seg_bt = segment_ids
  else:
    if tq != tk:
      raise ValueError(f"a single segment_ids array needs Tq == Tk, got Tq={tq}, Tk={tk}; pass a "
                       "(q_segment_ids, kv_segment_ids) tuple")
    q_seg_bt = kv_seg_bt = segment_ids
  if q_seg_bt.shape != (batch, tq):
    raise ValueError(f"q_segment_ids must have shape {(batch, tq)}, got {q_seg_bt.shape}")
  if kv_seg_bt.shape != (batch, tk):
    raise ValueError(f"kv_segment_ids must have shape {(batch, tk)}, got {kv_seg_bt.shape}")
  return q_seg_bt.astype(jnp.int32), kv_seg_bt.astype(jnp.int32)


def check_qkv(q, k, v) -> None:
  """Raises ValueError unless q [B,Tq,H,Dqk], k [B,Tk,H,Dqk], v [B,Tk,H,Dv] agree."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"q, k, v must be rank 4 [B, T, H, D], got q{q.shape}, k{k.shape}, v{v.shape}")
  b, tq, h, dqk = q.shape
  if k.shape[0] != b or k.shape[2] != h or k.shape[3] != dqk:
    raise ValueError(f"k must be [B={b}, Tk, H={h}, Dqk={dqk}] to match q{q.shape}, got k{k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must be [B, Tk, H, Dv] with k's leading dims {k.shape[:3]}, got v{v.shape}")
  if tq > k.shape[1]:
    raise ValueError(f"Tq must be <= Tk, got q{q.shape} and k{k.shape}")


def resolve_q_offset(q_offset, tq: int, tk: int):
  """The key position of query 0 for the causal mask: Tk - Tq (bottom-right aligned) when None.

  `q_offset` may be a Python int or an int scalar array, traced or not; a concrete value must lie in
  [0, Tk - Tq] so every query sees key 0 and no query lies past the last key. A traced value (e.g.
  `lax.axis_index(axis) * chunk` under `shard_map`) cannot be checked and is returned as is.
  """
  if q_offset is None:
    return tk - tq
  if jnp.ndim(q_offset) != 0 or not jnp.issubdtype(jnp.result_type(q_offset), jnp.integer):
    raise ValueError(f"q_offset must be an int or an int scalar, got {type(q_offset).__name__} of shape "
                     f"{jnp.shape(q_offset)} and dtype {jnp.result_type(q_offset)}")
  if not isinstance(q_offset, jax.core.Tracer) and not 0 <= int(q_offset) <= tk - tq:
    raise ValueError(f"q_offset must lie in [0, Tk - Tq] = [0, {tk - tq}] for Tq={tq}, Tk={tk}, "
                     f"got {int(q_offset)}")
  return q_offset


def _attend_block(q_bqhd, q_seg_bq, q_pos_q, k_bkhd, v_bkhd, kv_seg_bk, *, scale, causal):
  s_bhqk = jnp.einsum("bqhd,bkhd->bhqk", q_bqhd, k_bkhd, precision=_HIGHEST,
                      preferred_element_type=jnp.float32) * scale
  mask_bhqk = jnp.ones(s_bhqk.shape, jnp.bool_)
  if causal:
    k_pos_k = jnp.arange(k_bkhd.shape[1])
    mask_bhqk &= (q_pos_q[:, None] >= k_pos_k[None, :])[None, None]
  if q_seg_bq is not None:
    mask_bhqk &= (q_seg_bq[:, :, None] == kv_seg_bk[:, None, :])[:, None]
  s_bhqk = jnp.where(mask_bhqk, s_bhqk, -jnp.inf)
  m_bhq = lax.stop_gradient(jnp.max(s_bhqk, axis=-1, keepdims=True))
  # A row with no visible key has max -inf: shift by 0 so exp gives zeros, not NaN.
  m_bhq = jnp.where(jnp.isfinite(m_bhq), m_bhq, 0.0)
  p_bhqk = jnp.exp(s_bhqk - m_bhq)
  l_bhq = jnp.sum(p_bhqk, axis=-1, keepdims=True)
  p_bhqk = p_bhqk / jnp.where(l_bhq == 0.0, 1.0, l_bhq)
  return jnp.einsum("bhqk,bkhd->bqhd", p_bhqk, v_bkhd.astype(jnp.float32), precision=_HIGHEST)


def mla_attention_reference(q, k, v, *, scale: float, segment_ids=None, causal: bool = True,
                            q_offset=None, block_q: int = 512):
  """Softmax attention with Dqk != Dv allowed, in fp32 with exact matmuls.

  Args:
    q: [B, Tq, H, Dqk]; k: [B, Tk, H, Dqk]; v: [B, Tk, H, Dv], Tq <= Tk.
    scale: multiplies q·k before the softmax.
    segment_ids: None, [B, T] int (Tq == Tk), or (q_segment_ids [B, Tq], kv_segment_ids [B, Tk]);
      a query sees only keys of its own segment.
    causal: query i sees keys at positions <= q_offset + i.
    q_offset: key position of query 0, a Python int or an int32 scalar that may be traced, in
      [0, Tk - Tq] (checked when concrete); None means Tk - Tq, the queries being the last Tq keys.
      Only the causal mask uses it.
    block_q: queries per block of the memory-bounded scan.
  Returns:
    o: [B, Tq, H, Dv] in q's dtype; rows with no visible key are zeros.
  """
  check_qkv(q, k, v)
  b, tq, h, _ = q.shape
  tk = k.shape[1]
  segs = split_segment_ids(segment_ids, tq, tk, b)
  q_offset = resolve_q_offset(q_offset, tq, tk)
  block_q = min(block_q, tq)
  n_blocks = -(-tq // block_q)
  pad = n_blocks * block_q - tq
  q_pos_t = jnp.arange(n_blocks * block_q) + q_offset
  q_nbqhd = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  q_nbqhd = q_nbqhd.reshape(b, n_blocks, block_q, h, -1).swapaxes(0, 1)
  xs = [q_nbqhd, q_pos_t.reshape(n_blocks, block_q)]
  if segs is not None:
    q_seg_bt = jnp.pad(segs[0], ((0, 0), (0, pad)), constant_values=-1)
    xs.append(q_seg_bt.reshape(b, n_blocks, block_q).swapaxes(0, 1))

  @functools.partial(jax.checkpoint, prevent_cse=False)
  def step(q_bqhd, q_pos_q, q_seg_bq=None):
    return _attend_block(q_bqhd, q_seg_bq, q_pos_q, k, v, None if segs is None else segs[1],
                         scale=scale, causal=causal)

  o_nbqhd = lax.map(lambda x: step(*x), tuple(xs))
  o_bthd = o_nbqhd.swapaxes(0, 1).reshape(b, n_blocks * block_q, h, -1)[:, :tq]
  return o_bthd.astype(q.dtype)
