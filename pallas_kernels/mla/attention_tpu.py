"""MLA flash attention on TPU (Mosaic): forward, and the flash-attention-2 backward as two kernels.

Kernels see [B, H, T, D] so a block's last two dims are (time, full head dim), which satisfies the
(8, 128) tiling rule for any Dqk / Dv. Time is padded to the block size outside the kernels and padded
keys are masked by their static length. Per-row vectors (logsumexp, delta, segment ids) travel as
[B, (H,) 1, T] rows, lane-dense in HBM. The causal offset (key position of query 0) arrives by scalar
prefetch, so it may be a traced value, e.g. a context-parallel shard's position. Causally invisible
blocks skip compute with `pl.when`, and their index maps, which read the offset too, repeat the last
useful block so the pipeline issues no DMA for them.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla.attention_reference import resolve_q_offset

_LANES = 128
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class _Tiling:
  tq: int
  tk: int
  block_q: int
  block_k: int

  @property
  def nq(self):
    return pl.cdiv(self.tq, self.block_q)

  @property
  def nk(self):
    return pl.cdiv(self.tk, self.block_k)

  # `offset` below is the key position of query 0, a traced int32 scalar read from the prefetch ref.
  def visible(self, i, j, offset):
    """Whether kv block j holds any key that causally precedes some query of q block i."""
    return j * self.block_k <= offset + (i + 1) * self.block_q - 1

  def last_kv_block(self, i, offset):
    return jnp.minimum(self.nk - 1, lax.div(offset + (i + 1) * self.block_q - 1, self.block_k))

  def first_q_block(self, j, offset):
    # Keys past the last query (offset < Tk - Tq) are seen by no q block: clamp to the last one so the
    # index map stays in bounds; the kernel then skips every step and writes zero dk, dv.
    return jnp.minimum(self.nq - 1, lax.div(jnp.maximum(0, j * self.block_k - offset), self.block_q))


def _tiling(tq, tk, block_q, block_k):
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block % _LANES:
      raise ValueError(f"{name} must be a multiple of {_LANES} on TPU, got {block}")
  round_up = lambda t: pl.cdiv(t, _LANES) * _LANES
  return _Tiling(tq, tk, min(block_q, round_up(tq)), min(block_k, round_up(tk)))


def _dot(a, b, dims):
  precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _mask(t: _Tiling, offset, i, j, q_seg, kv_seg, *, causal, kv_major):
  """Visibility of a (block_q, block_k) score block, or its transpose when kv_major; None if all visible."""
  shape, q_axis = ((t.block_k, t.block_q), 1) if kv_major else ((t.block_q, t.block_k), 0)
  q_pos = offset + i * t.block_q + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  k_pos = j * t.block_k + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
  conds = []
  if causal:
    conds.append(q_pos >= k_pos)
  if t.tk % t.block_k:
    conds.append(k_pos < t.tk)
  if q_seg is not None:
    conds.append(q_seg == kv_seg)
  return functools.reduce(jnp.logical_and, conds) if conds else None


def _fwd_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, t: _Tiling, scale, causal, has_segments):
  q_seg_ref, kv_seg_ref = refs[:2] if has_segments else (None, None)
  o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[2:] if has_segments else refs
  i, j = pl.program_id(2), pl.program_id(3)
  offset = offset_ref[0]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  @pl.when(t.visible(i, j, offset) if causal else True)
  def _step():
    s = _dot(q_ref[...], k_ref[...], _NT) * scale
    segs = (q_seg_ref[0][:, None], kv_seg_ref[...]) if has_segments else (None, None)
    mask = _mask(t, offset, i, j, *segs, causal=causal, kv_major=False)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    m_prev = m_ref[...]  # [block_q, 128], replicated over lanes
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    # Rows with nothing visible yet keep m = -inf; shifting them by 0 keeps exp() NaN-free.
    m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp(m_prev - m_shift)
    p = jnp.exp(s - m_shift[:, :1])
    m_ref[...] = m_next
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[...]
    acc_ref[...] = acc_ref[...] * alpha[:, :1] + _dot(p.astype(v.dtype), v, _NN)

  @pl.when(j == t.nk - 1)
  def _finish():
    l = l_ref[...]
    empty = l == 0.0
    o_ref[...] = (acc_ref[...] / jnp.where(empty, 1.0, l)[:, :1]).astype(o_ref.dtype)
    # +inf makes exp(s - lse) vanish in the backward pass for rows that saw no key.
    lse = jnp.where(empty, jnp.inf, m_ref[...] + jnp.log(l))
    lse_ref[...] = lse.T[:1]


def _dq_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, t: _Tiling, scale, causal, has_segments):
  q_seg_ref, kv_seg_ref = refs[:2] if has_segments else (None, None)
  lse_ref, delta_ref, do_ref, dq_ref, dq_acc_ref = refs[2:] if has_segments else refs
  i, j = pl.program_id(2), pl.program_id(3)
  offset = offset_ref[0]

  @pl.when(j == 0)
  def _init():
    dq_acc_ref[...] = jnp.zeros(dq_acc_ref.shape, jnp.float32)

  @pl.when(t.visible(i, j, offset) if causal else True)
  def _step():
    k = k_ref[...]
    s = _dot(q_ref[...], k, _NT) * scale
    segs = (q_seg_ref[0][:, None], kv_seg_ref[...]) if has_segments else (None, None)
    mask = _mask(t, offset, i, j, *segs, causal=causal, kv_major=False)
    if mask is not None:
      s = jnp.where(mask, s, -jnp.inf)
    p = jnp.exp(s - lse_ref[0][:, None])
    dp = _dot(do_ref[...], v_ref[...], _NT)
    ds = p * (dp - delta_ref[0][:, None])
    dq_acc_ref[...] += _dot(ds.astype(k.dtype), k, _NN)

  @pl.when(j == t.nk - 1)
  def _finish():
    dq_ref[...] = (dq_acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(offset_ref, q_ref, k_ref, v_ref, *refs, t: _Tiling, scale, causal, has_segments):
  q_seg_ref, kv_seg_ref = refs[:2] if has_segments else (None, None)
  lse_ref, delta_ref, do_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs[2:] if has_segments else refs
  j, i = pl.program_id(2), pl.program_id(3)
  offset = offset_ref[0]

  @pl.when(i == 0)
  def _init():
    dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
    dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

  # Scores are kept transposed, [block_k, block_q], so every matmul is a plain or NT dot.
  @pl.when(t.visible(i, j, offset) if causal else True)
  def _step():
    q, do = q_ref[...], do_ref[...]
    s_t = _dot(k_ref[...], q, _NT) * scale
    segs = (q_seg_ref[...], kv_seg_ref[0][:, None]) if has_segments else (None, None)
    mask = _mask(t, offset, i, j, *segs, causal=causal, kv_major=True)
    if mask is not None:
      s_t = jnp.where(mask, s_t, -jnp.inf)
    p_t = jnp.exp(s_t - lse_ref[...])
    dv_acc_ref[...] += _dot(p_t.astype(do.dtype), do, _NN)
    dp_t = _dot(v_ref[...], do, _NT)
    ds_t = p_t * (dp_t - delta_ref[...])
    dk_acc_ref[...] += _dot(ds_t.astype(q.dtype), q, _NN)

  @pl.when(i == t.nq - 1)
  def _finish():
    dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _to_bhtd(x_bthd, t_pad):
  x_bhtd = x_bthd.transpose(0, 2, 1, 3)
  return jnp.pad(x_bhtd, ((0, 0), (0, 0), (0, t_pad - x_bhtd.shape[2]), (0, 0)))


def _row(x_bxt, t_pad, fill=0):
  """[B, (H,) T] -> [B, (H,) 1, T_pad], the lane-dense form of a per-row vector."""
  pad = [(0, 0)] * (x_bxt.ndim - 1) + [(0, t_pad - x_bxt.shape[-1])]
  return jnp.expand_dims(jnp.pad(x_bxt, pad, constant_values=fill), -2)


def _call(kernel, grid, offset, in_specs, in_arrays, out_specs, out_shape, scratch, interpret, name):
  """Runs `kernel` with the int32 [1] `offset` prefetched to SMEM: the kernel gets its ref first, every
  index map last."""
  grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid, in_specs=in_specs,
                                           out_specs=out_specs, scratch_shapes=scratch)
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=out_shape, interpret=interpret, name=name,
      compiler_params=pltpu.CompilerParams(
          dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
  )(offset, *in_arrays)


def _offset(q_offset, tq, tk):
  """The causal offset as the int32 [1] scalar-prefetch operand."""
  return jnp.asarray(resolve_q_offset(q_offset, tq, tk), jnp.int32).reshape(1)


def _operands(q, k, v, segment_ids, t: _Tiling, *, causal: bool, kv_major: bool):
  """Padded [B, H, T, D] operands and BlockSpecs; kv_major grids are (B, H, nk, nq), else (B, H, nq, nk).

  Index maps take the offset's prefetch ref last; causally invisible steps map to the last (kv_major:
  first) useful block of their row, so the pipeline sees an unchanged block index and skips the DMA.
  """
  tq_pad, tk_pad = t.nq * t.block_q, t.nk * t.block_k
  if kv_major:
    qi = lambda b, h, j, i, off: (b, h, jnp.maximum(i, t.first_q_block(j, off[0])) if causal else i, 0)
    kj = lambda b, h, j, i, off: (b, h, j, 0)
  else:
    qi = lambda b, h, i, j, off: (b, h, i, 0)
    kj = lambda b, h, i, j, off: (b, h, jnp.minimum(j, t.last_kv_block(i, off[0])) if causal else j, 0)
  arrays = [_to_bhtd(q, tq_pad), _to_bhtd(k, tk_pad), _to_bhtd(v, tk_pad)]
  specs = [pl.BlockSpec((None, None, t.block_q, q.shape[3]), qi),
           pl.BlockSpec((None, None, t.block_k, k.shape[3]), kj),
           pl.BlockSpec((None, None, t.block_k, v.shape[3]), kj)]
  row = lambda index_map: (lambda *idx: (index_map(*idx)[0], 0, index_map(*idx)[2]))
  if segment_ids is not None:
    arrays += [_row(segment_ids[0], tq_pad), _row(segment_ids[1], tk_pad)]
    specs += [pl.BlockSpec((None, 1, t.block_q), row(qi)), pl.BlockSpec((None, 1, t.block_k), row(kj))]
  q_row_spec = pl.BlockSpec((None, None, 1, t.block_q), lambda *idx: (*qi(*idx)[:2], 0, qi(*idx)[2]))
  return arrays, specs, q_row_spec


def mla_flash_fwd_tpu(q, k, v, segment_ids=None, *, scale: float, causal: bool = True, q_offset=None,
                      block_q: int = 512, block_k: int = 512, interpret=False):
  """Flash attention forward on TPU.

  Args:
    q: [B, Tq, H, Dqk]; k: [B, Tk, H, Dqk]; v: [B, Tk, H, Dv]; Tq <= Tk.
    segment_ids: None or (q_segment_ids [B, Tq], kv_segment_ids [B, Tk]) int32.
    causal: query i sees keys at positions <= q_offset + i.
    q_offset: key position of query 0, a Python int or an int32 scalar that may be traced, in
      [0, Tk - Tq]; None means Tk - Tq (bottom-right aligned). Blocks it hides are skipped.
    block_q, block_k: tile sizes, multiples of 128 (clipped to the padded sequence).
    interpret: False, True or a `pltpu.InterpretParams`.
  Returns:
    o: [B, Tq, H, Dv] in q's dtype; lse: [B, H, Tq] float32 logsumexp, +inf where no key is visible.
  """
  b, tq, h, _ = q.shape
  tk, dv = k.shape[1], v.shape[3]
  t = _tiling(tq, tk, block_q, block_k)
  arrays, specs, q_row_spec = _operands(q, k, v, segment_ids, t, causal=causal, kv_major=False)
  kernel = functools.partial(_fwd_kernel, t=t, scale=scale, causal=causal,
                             has_segments=segment_ids is not None)
  o_bhtd, lse_bh1t = _call(
      kernel, (b, h, t.nq, t.nk), _offset(q_offset, tq, tk), specs, arrays,
      out_specs=[pl.BlockSpec((None, None, t.block_q, dv), lambda b, h, i, j, off: (b, h, i, 0)), q_row_spec],
      out_shape=[jax.ShapeDtypeStruct((b, h, t.nq * t.block_q, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, 1, t.nq * t.block_q), jnp.float32)],
      scratch=[pltpu.VMEM((t.block_q, _LANES), jnp.float32), pltpu.VMEM((t.block_q, _LANES), jnp.float32),
               pltpu.VMEM((t.block_q, dv), jnp.float32)],
      interpret=interpret, name="mla_flash_fwd")
  return o_bhtd[:, :, :tq].transpose(0, 2, 1, 3), lse_bh1t[:, :, 0, :tq]


def mla_flash_bwd_tpu(q, k, v, segment_ids, lse, delta, do, *, scale: float, causal: bool = True,
                      q_offset=None, block_q: int = 512, block_k: int = 512, interpret=False):
  """Flash attention backward on TPU: (dq, dk, dv) shaped and typed like (q, k, v).

  lse: [B, H, Tq] from `mla_flash_fwd_tpu`; delta: [B, H, Tq] = rowsum(o * do) in float32;
  do: [B, Tq, H, Dv]. Other arguments as in `mla_flash_fwd_tpu`.
  """
  b, tq, h, dqk = q.shape
  tk, dv = k.shape[1], v.shape[3]
  t = _tiling(tq, tk, block_q, block_k)
  tq_pad, tk_pad = t.nq * t.block_q, t.nk * t.block_k
  has_segments = segment_ids is not None
  offset = _offset(q_offset, tq, tk)
  residuals = [_row(lse, tq_pad, fill=jnp.inf), _row(delta, tq_pad), _to_bhtd(do, tq_pad)]
  static = dict(t=t, scale=scale, causal=causal, has_segments=has_segments)

  arrays, specs, q_row_spec = _operands(q, k, v, segment_ids, t, causal=causal, kv_major=False)
  do_spec = pl.BlockSpec((None, None, t.block_q, dv), specs[0].index_map)
  dq_bhtd = _call(
      functools.partial(_dq_kernel, **static), (b, h, t.nq, t.nk), offset,
      specs + [q_row_spec, q_row_spec, do_spec], arrays + residuals,
      out_specs=specs[0], out_shape=jax.ShapeDtypeStruct((b, h, tq_pad, dqk), q.dtype),
      scratch=[pltpu.VMEM((t.block_q, dqk), jnp.float32)], interpret=interpret, name="mla_flash_dq")

  arrays, specs, q_row_spec = _operands(q, k, v, segment_ids, t, causal=causal, kv_major=True)
  do_spec = pl.BlockSpec((None, None, t.block_q, dv), specs[0].index_map)
  kv_out = lambda d: pl.BlockSpec((None, None, t.block_k, d), lambda b, h, j, i, off: (b, h, j, 0))
  dk_bhtd, dv_bhtd = _call(
      functools.partial(_dkv_kernel, **static), (b, h, t.nk, t.nq), offset,
      specs + [q_row_spec, q_row_spec, do_spec], arrays + residuals,
      out_specs=[kv_out(dqk), kv_out(dv)],
      out_shape=[jax.ShapeDtypeStruct((b, h, tk_pad, dqk), k.dtype),
                 jax.ShapeDtypeStruct((b, h, tk_pad, dv), v.dtype)],
      scratch=[pltpu.VMEM((t.block_k, dqk), jnp.float32), pltpu.VMEM((t.block_k, dv), jnp.float32)],
      interpret=interpret, name="mla_flash_dkv")
  back = lambda x_bhtd, n: x_bhtd[:, :, :n].transpose(0, 2, 1, 3)
  return back(dq_bhtd, tq), back(dk_bhtd, tk), back(dv_bhtd, tk)
