"""MLA flash attention on GPU (Triton-style Pallas): forward, and the flash-attention-2 backward.

Kernels read the [B, T, H, D] arrays in place, one program per (q or kv block, batch·head), looping
over the other sequence axis with `fori_loop` bounded by the causal mask. The causal offset (key
position of query 0) is an int32 [1] operand read in the kernel, so it may be a traced value, e.g. a
context-parallel shard's position, and the loop bounds still skip the blocks it hides. Triton needs
power-of-two tiles, so head dims are read as the next power of two through masked loads (zeros past
Dqk do not change q·k) and time is padded outside the kernels, padded keys masked by their static
length. Logits are kept in base 2 (exp2), the residual logsumexp in natural log. fp32 inputs multiply
on TF32 tensor cores (Triton's default), about 3e-4 relative error on an H200; bf16 is the fast path.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mla.attention_reference import resolve_q_offset

_LOG2E = math.log2(math.e)
# (block_q, block_k) per kernel, tuned on an H200 at Dqk=192, Dv=128 (benchmarks/mla_prefill.py). The
# dk/dv kernel holds fp32 accumulators for block_k keys, the dq kernel for block_q queries.
_FWD_BLOCKS = (128, 64)
_DKV_BLOCKS = (64, 64)
_DQ_BLOCKS = (128, 32)
_NUM_STAGES = 2


@dataclasses.dataclass(frozen=True)
class _Tiling:
  tq: int
  tk: int
  block_q: int
  block_k: int

  @property
  def tq_pad(self):
    return pl.cdiv(self.tq, self.block_q) * self.block_q

  @property
  def tk_pad(self):
    return pl.cdiv(self.tk, self.block_k) * self.block_k


def _tiling(tq, tk, block_q, block_k):
  for name, block in (("block_q", block_q), ("block_k", block_k)):
    if block < 16 or block & (block - 1):
      raise ValueError(f"{name} must be a power of two >= 16 on GPU, got {block}")
  return _Tiling(tq, tk, min(block_q, pl.next_power_of_2(max(tq, 16))),
                 min(block_k, pl.next_power_of_2(max(tk, 16))))


def _load(ref, rows, width):
  """Rows `rows` of a [T, D_pow2] block whose array is only `width` wide; zeros beyond."""
  d_pow2 = ref.shape[-1]
  return plgpu.load(ref.at[rows, :], mask=(jnp.arange(d_pow2) < width)[None, :], other=0.0)


def _logits2(q, k, q_start, k_start, q_seg, kv_seg, t: _Tiling, offset, *, scale, causal):
  """Masked base-2 logits [block_q, block_k]; -inf where a key is not visible."""
  s = plgpu.dot(q, k.T) * (scale * _LOG2E)
  q_pos = offset + q_start + jnp.arange(s.shape[0])[:, None]
  k_pos = k_start + jnp.arange(s.shape[1])[None, :]
  conds = []
  if causal:
    conds.append(q_pos >= k_pos)
  if t.tk != t.tk_pad:
    conds.append(k_pos < t.tk)
  if q_seg is not None:
    conds.append(q_seg[:, None] == kv_seg[None, :])
  return jnp.where(functools.reduce(jnp.logical_and, conds), s, -jnp.inf) if conds else s


def _fwd_kernel(offset_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, o_ref, lse_ref, *, t: _Tiling, scale,
                causal, dqk, dv):
  i, offset = pl.program_id(0), offset_ref[0]
  bq, bk = t.block_q, t.block_k
  q = _load(q_ref, slice(None), dqk)
  q_seg = None if q_seg_ref is None else q_seg_ref[...]

  def body(j, carry):
    acc, m, l = carry
    ks = pl.ds(j * bk, bk)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[ks]
    s = _logits2(q, _load(k_ref, ks, dqk), i * bq, j * bk, q_seg, kv_seg, t, offset, scale=scale,
                 causal=causal)
    m_next = jnp.maximum(m, jnp.max(s, axis=1))
    # Rows with nothing visible yet keep m = -inf; shifting them by 0 keeps exp2() NaN-free.
    m_shift = jnp.where(m_next == -jnp.inf, 0.0, m_next)
    alpha = jnp.exp2(m - m_shift)
    p = jnp.exp2(s - m_shift[:, None])
    v = _load(v_ref, ks, dv)
    acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v)
    return acc, m_next, l * alpha + jnp.sum(p, axis=1)

  n_kv = t.tk_pad // bk
  if causal:
    n_kv = jnp.minimum(n_kv, lax.div(offset + (i + 1) * bq + bk - 1, bk))
  init = (jnp.zeros((bq, o_ref.shape[-1]), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
          jnp.zeros((bq,), jnp.float32))
  acc, m, l = lax.fori_loop(0, n_kv, body, init)
  empty = l == 0.0
  # +inf makes exp(s - lse) vanish in the backward pass for rows that saw no key.
  lse_ref[...] = jnp.where(empty, jnp.inf, (m + jnp.log2(l)) / _LOG2E)
  o = acc / jnp.where(empty, 1.0, l)[:, None]
  plgpu.store(o_ref, o.astype(o_ref.dtype), mask=(jnp.arange(o_ref.shape[-1]) < dv)[None, :])


def _dkv_kernel(offset_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, lse_ref, delta_ref, do_ref, dk_ref,
                dv_ref, *, t: _Tiling, scale, causal, dqk, dv):
  j, offset = pl.program_id(0), offset_ref[0]
  bq, bk = t.block_q, t.block_k
  k, v = _load(k_ref, slice(None), dqk), _load(v_ref, slice(None), dv)
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]

  def body(i, carry):
    dk, dv_acc = carry
    qs = pl.ds(i * bq, bq)
    q, do = _load(q_ref, qs, dqk), _load(do_ref, qs, dv)
    q_seg = None if q_seg_ref is None else q_seg_ref[qs]
    s = _logits2(q, k, i * bq, j * bk, q_seg, kv_seg, t, offset, scale=scale, causal=causal)
    p = jnp.exp2(s - lse_ref[qs][:, None] * _LOG2E)
    dv_acc += plgpu.dot(p.astype(do.dtype).T, do)
    ds = p * (plgpu.dot(do, v.T) - delta_ref[qs][:, None])
    dk += plgpu.dot(ds.astype(q.dtype).T, q)
    return dk, dv_acc

  # Past the last query (offset < Tk - Tq) `first` exceeds the block count: the loop is empty, dk = dv = 0.
  first = lax.div(jnp.maximum(0, j * bk - offset), bq) if causal else 0
  init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  dk, dv_acc = lax.fori_loop(first, t.tq_pad // bq, body, init)
  plgpu.store(dk_ref, (dk * scale).astype(dk_ref.dtype), mask=(jnp.arange(k.shape[1]) < dqk)[None, :])
  plgpu.store(dv_ref, dv_acc.astype(dv_ref.dtype), mask=(jnp.arange(v.shape[1]) < dv)[None, :])


def _dq_kernel(offset_ref, q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, lse_ref, delta_ref, do_ref, dq_ref, *,
               t: _Tiling, scale, causal, dqk, dv):
  i, offset = pl.program_id(0), offset_ref[0]
  bq, bk = t.block_q, t.block_k
  q, do = _load(q_ref, slice(None), dqk), _load(do_ref, slice(None), dv)
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  lse2, delta = lse_ref[...] * _LOG2E, delta_ref[...]

  def body(j, dq):
    ks = pl.ds(j * bk, bk)
    k = _load(k_ref, ks, dqk)
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[ks]
    s = _logits2(q, k, i * bq, j * bk, q_seg, kv_seg, t, offset, scale=scale, causal=causal)
    p = jnp.exp2(s - lse2[:, None])
    ds = p * (plgpu.dot(do, _load(v_ref, ks, dv).T) - delta[:, None])
    return dq + plgpu.dot(ds.astype(k.dtype), k)

  n_kv = t.tk_pad // bk
  if causal:
    n_kv = jnp.minimum(n_kv, lax.div(offset + (i + 1) * bq + bk - 1, bk))
  dq = lax.fori_loop(0, n_kv, body, jnp.zeros(q.shape, jnp.float32))
  plgpu.store(dq_ref, (dq * scale).astype(dq_ref.dtype), mask=(jnp.arange(q.shape[1]) < dqk)[None, :])


def _specs(t: _Tiling, h: int, q, k, v, segment_ids, *, q_blocked: bool):
  """Padded operands and BlockSpecs for a (q or kv blocks, B·H) grid; one side blocked, the other whole."""
  qlen, klen = (t.block_q, t.tk_pad) if q_blocked else (t.tq_pad, t.block_k)
  bh = lambda bh_: (bh_ // h, bh_ % h)
  q_at = (lambda n, bh_: n) if q_blocked else (lambda n, bh_: 0)
  k_at = (lambda n, bh_: 0) if q_blocked else (lambda n, bh_: n)

  def seq_spec(length, at, d):
    return pl.BlockSpec((None, length, None, pl.next_power_of_2(d)),
                        lambda n, bh_: (bh(bh_)[0], at(n, bh_), bh(bh_)[1], 0))

  pad_t = lambda x, t_pad: jnp.pad(x, [(0, 0), (0, t_pad - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  arrays = [pad_t(q, t.tq_pad), pad_t(k, t.tk_pad), pad_t(v, t.tk_pad)]
  specs = [seq_spec(qlen, q_at, q.shape[3]), seq_spec(klen, k_at, k.shape[3]), seq_spec(klen, k_at, v.shape[3])]
  if segment_ids is None:
    arrays += [None, None]
    specs += [None, None]
  else:
    arrays += [pad_t(segment_ids[0], t.tq_pad), pad_t(segment_ids[1], t.tk_pad)]
    specs += [pl.BlockSpec((None, qlen), lambda n, bh_: (bh(bh_)[0], q_at(n, bh_))),
              pl.BlockSpec((None, klen), lambda n, bh_: (bh(bh_)[0], k_at(n, bh_)))]
  q_row_spec = pl.BlockSpec((None, None, qlen), lambda n, bh_: (*bh(bh_), q_at(n, bh_)))
  return arrays, specs, q_row_spec, seq_spec(qlen, q_at, v.shape[3])


def _offset(q_offset, tq: int, tk: int):
  """The causal offset as an int32 [1] operand and its BlockSpec: every program reads the whole array."""
  offset = jnp.asarray(resolve_q_offset(q_offset, tq, tk), jnp.int32).reshape(1)
  return offset, pl.BlockSpec((1,), lambda n, bh_: (0,))


def _params(d_max: int):
  return plgpu.CompilerParams(num_warps=4 if d_max <= 64 else 8, num_stages=_NUM_STAGES)


def mla_flash_fwd_gpu(q, k, v, segment_ids=None, *, scale: float, causal: bool = True, q_offset=None,
                      block_q: int | None = None, block_k: int | None = None, interpret: bool = False):
  """Flash attention forward on GPU.

  Args:
    q: [B, Tq, H, Dqk]; k: [B, Tk, H, Dqk]; v: [B, Tk, H, Dv]; Tq <= Tk.
    segment_ids: None or (q_segment_ids [B, Tq], kv_segment_ids [B, Tk]) int32.
    causal: query i sees keys at positions <= q_offset + i.
    q_offset: key position of query 0, a Python int or an int32 scalar that may be traced, in
      [0, Tk - Tq]; None means Tk - Tq (bottom-right aligned). Blocks it hides are skipped.
    block_q, block_k: powers of two >= 16 (clipped to the sequence); None takes the tuned default.
  Returns:
    o: [B, Tq, H, Dv] in q's dtype; lse: [B, H, Tq] float32 logsumexp, +inf where no key is visible.
  """
  b, tq, h, dqk = q.shape
  tk, dv = k.shape[1], v.shape[3]
  t = _tiling(tq, tk, block_q or _FWD_BLOCKS[0], block_k or _FWD_BLOCKS[1])
  offset, offset_spec = _offset(q_offset, tq, tk)
  arrays, specs, q_row_spec, o_spec = _specs(t, h, q, k, v, segment_ids, q_blocked=True)
  kernel = functools.partial(_fwd_kernel, t=t, scale=scale, causal=causal, dqk=dqk, dv=dv)
  o_bthd, lse_bht = pl.pallas_call(
      kernel, grid=(t.tq_pad // t.block_q, b * h), in_specs=[offset_spec] + specs,
      out_specs=[o_spec, q_row_spec],
      out_shape=[jax.ShapeDtypeStruct((b, t.tq_pad, h, dv), q.dtype),
                 jax.ShapeDtypeStruct((b, h, t.tq_pad), jnp.float32)],
      compiler_params=_params(max(dqk, dv)), interpret=interpret, name="mla_flash_fwd_gpu",
  )(offset, *arrays)
  return o_bthd[:, :tq], lse_bht[:, :, :tq]


def mla_flash_bwd_gpu(q, k, v, segment_ids, lse, delta, do, *, scale: float, causal: bool = True,
                      q_offset=None, block_q: int | None = None, block_k: int | None = None,
                      interpret: bool = False):
  """Flash attention backward on GPU: (dq, dk, dv) shaped and typed like (q, k, v).

  lse: [B, H, Tq] from `mla_flash_fwd_gpu`; delta: [B, H, Tq] = rowsum(o * do) in float32;
  do: [B, Tq, H, Dv]. block_q / block_k, when given, override both kernels' tuned tiles.
  Other arguments as in `mla_flash_fwd_gpu`.
  """
  b, tq, h, dqk = q.shape
  tk, dv = k.shape[1], v.shape[3]
  tilings = [_tiling(tq, tk, block_q or dq, block_k or dk) for dq, dk in (_DKV_BLOCKS, _DQ_BLOCKS)]
  offset, offset_spec = _offset(q_offset, tq, tk)

  def call(kernel, t, q_blocked, out_specs, out_shape, name):
    arrays, specs, q_row_spec, do_spec = _specs(t, h, q, k, v, segment_ids, q_blocked=q_blocked)
    pad_row = lambda x, fill: jnp.pad(x, ((0, 0), (0, 0), (0, t.tq_pad - tq)), constant_values=fill)
    residuals = [pad_row(lse, jnp.inf), pad_row(delta, 0.0),
                 jnp.pad(do, ((0, 0), (0, t.tq_pad - tq), (0, 0), (0, 0)))]
    n_blocks = t.tq_pad // t.block_q if q_blocked else t.tk_pad // t.block_k
    return pl.pallas_call(
        functools.partial(kernel, t=t, scale=scale, causal=causal, dqk=dqk, dv=dv), grid=(n_blocks, b * h),
        in_specs=[offset_spec] + specs + [q_row_spec, q_row_spec, do_spec], out_specs=out_specs(specs),
        out_shape=out_shape(t), compiler_params=_params(max(dqk, dv)), interpret=interpret, name=name,
    )(offset, *arrays, *residuals)

  dk_bthd, dv_bthd = call(
      _dkv_kernel, tilings[0], False, lambda specs: [specs[1], specs[2]],
      lambda t: [jax.ShapeDtypeStruct((b, t.tk_pad, h, dqk), k.dtype),
                 jax.ShapeDtypeStruct((b, t.tk_pad, h, dv), v.dtype)], "mla_flash_dkv_gpu")
  dq_bthd = call(_dq_kernel, tilings[1], True, lambda specs: specs[0],
                 lambda t: jax.ShapeDtypeStruct((b, t.tq_pad, h, dqk), q.dtype), "mla_flash_dq_gpu")
  return dq_bthd[:, :tq], dk_bthd[:, :tk], dv_bthd[:, :tk]
