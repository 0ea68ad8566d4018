"""MLA decode over a paged latent cache: Mosaic TPU flash-decoding kernel.

Grid (B, splits, blocks per split). Each step owns `pages_per_block` consecutive logical pages of
one sequence; their page ids come from the scalar-prefetched page table and the pages are DMA'd
from HBM straight into a double-buffered VMEM block (the next block's copies are in flight while
this one is computed). All H heads share the latent, so a block costs two MXU matmuls:
q[H, R]·latentᵀ[R, T] for the scores and p[H, T]·latent[T, R] for the output.

Blocks past a sequence's length issue no DMA and no compute; inside the last block, pages past the
length are replaced by the last valid page so no garbage page id is ever dereferenced, and rows
past the length are masked. Each split leaves (max, sum, acc) partials, merged by
`combine_splits` afterwards.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla.decode_reference import check_decode_args, combine_splits

_LANES = 128
_BLOCK_TOKENS = 2048
_NT = (((1,), (1,)), ((), ()))  # contract the last dims: x[H, D]·y[T, D]ᵀ


def _decode_kernel(page_table_ref, lengths_ref, q_ref, qr_ref, latent_hbm, rope_hbm,
                   m_out, l_out, acc_out, latent_buf, rope_buf, sems, m_scr, l_scr, acc_scr, *,
                   scale, page_size, pages_per_block, blocks_per_split, max_pages):
  b, split, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  length = lengths_ref[b]
  block_tokens = pages_per_block * page_size

  def block_start(j):
    return (split * blocks_per_split + j) * block_tokens

  def copies(j, slot):
    # lax.div/rem, not // and %: operands are non-negative and Mosaic cannot lower jnp's sign fix-up.
    last_page = lax.div(length + page_size - 1, page_size) - 1
    first_page = (split * blocks_per_split + j) * pages_per_block
    out = []
    for t in range(pages_per_block):
      page_id = page_table_ref[b * max_pages + jnp.minimum(first_page + t, last_page)]
      rows = pl.ds(t * page_size, page_size)
      out.append(pltpu.make_async_copy(latent_hbm.at[page_id], latent_buf.at[slot, rows], sems.at[0, slot]))
      out.append(pltpu.make_async_copy(rope_hbm.at[page_id], rope_buf.at[slot, rows], sems.at[1, slot]))
    return out

  @pl.when(i == 0)
  def _init():
    m_scr[...] = jnp.full(m_scr.shape, -jnp.inf, jnp.float32)
    l_scr[...] = jnp.zeros(l_scr.shape, jnp.float32)
    acc_scr[...] = jnp.zeros(acc_scr.shape, jnp.float32)

    @pl.when(block_start(0) < length)
    def _first_fetch():
      for c in copies(0, 0):
        c.start()

  @pl.when((i + 1 < blocks_per_split) & (block_start(i + 1) < length))
  def _prefetch_next():
    for c in copies(i + 1, lax.rem(i + 1, 2)):
      c.start()

  def accumulate(slot, masked: bool):
    latent_tr = latent_buf[slot]
    s_ht = lax.dot_general(q_ref[...], latent_tr, _NT, preferred_element_type=jnp.float32)
    s_ht += lax.dot_general(qr_ref[...], rope_buf[slot], _NT, preferred_element_type=jnp.float32)
    s_ht *= scale
    if masked:
      pos_ht = block_start(i) + lax.broadcasted_iota(jnp.int32, s_ht.shape, 1)
      s_ht = jnp.where(pos_ht < length, s_ht, -jnp.inf)
      # Rows past the length are stale cache slots: zero them so 0·inf cannot reach acc.
      pos_tr = block_start(i) + lax.broadcasted_iota(jnp.int32, latent_tr.shape, 0)
      latent_tr = jnp.where(pos_tr < length, latent_tr, jnp.zeros_like(latent_tr))
    m_prev = m_scr[...]
    # The block holds at least one valid token, so m_new is finite and exp never sees inf - inf.
    m_new = jnp.maximum(m_prev, jnp.max(s_ht, axis=1, keepdims=True))
    p_ht = jnp.exp(s_ht - m_new[:, :1])
    alpha = jnp.exp(m_prev - m_new)
    l_scr[...] = alpha * l_scr[...] + jnp.sum(p_ht, axis=1, keepdims=True)
    pv_hr = jnp.dot(p_ht.astype(latent_tr.dtype), latent_tr, preferred_element_type=jnp.float32)
    acc_scr[...] = alpha[:, :1] * acc_scr[...] + pv_hr
    m_scr[...] = m_new

  start = block_start(i)

  @pl.when(start < length)
  def _compute():
    slot = lax.rem(i, 2)
    for c in copies(i, slot):
      c.wait()
    pl.when(start + block_tokens <= length)(lambda: accumulate(slot, False))
    pl.when(start + block_tokens > length)(lambda: accumulate(slot, True))

  @pl.when(i == blocks_per_split - 1)
  def _store():
    m_out[...] = m_scr[...]
    l_out[...] = l_scr[...]
    acc_out[...] = acc_scr[...]


def mla_decode_tpu(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths, *, scale,
                   num_splits=None, pages_per_block=None, interpret=False):
  """Paged MLA decode on TPU; same contract as `mla_decode_reference`.

  Args (beyond the reference's):
    num_splits: context splits per sequence, each a parallel grid slice (default: 2 when the
      context spans 2+ blocks, so both TensorCores of a megacore chip stay busy at batch 1).
    pages_per_block: pages fetched per grid step (default: ~2048 tokens per step).
    interpret: True or a pltpu.InterpretParams to run on CPU.

  Returns:
    o_latent [B, H, R] in q_latent's dtype.
  """
  check_decode_args(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths)
  b, h, r = q_latent.shape
  p = q_rope.shape[2]
  num_pages, page_size, _ = latent_pages.shape
  max_pages = page_table.shape[1]
  pages_per_block = pages_per_block or max(1, min(max_pages, _BLOCK_TOKENS // page_size))
  num_blocks = -(-max_pages // pages_per_block)
  num_splits = min(num_splits or 2, num_blocks)
  blocks_per_split = -(-num_blocks // num_splits)
  block_tokens = pages_per_block * page_size
  # Clamping here makes every id the kernel can read a valid page, and no length outrun its table.
  page_table_flat = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1).reshape(-1)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_pages * page_size)

  kernel = functools.partial(_decode_kernel, scale=scale, page_size=page_size,
                             pages_per_block=pages_per_block, blocks_per_split=blocks_per_split,
                             max_pages=max_pages)
  q_spec = lambda d: pl.BlockSpec((None, h, d), lambda bi, si, i, *_: (bi, 0, 0))
  part_spec = lambda d: pl.BlockSpec((None, None, h, d), lambda bi, si, i, *_: (bi, si, 0, 0))
  any_spec = pl.BlockSpec(memory_space=pl.ANY)
  m_bsh, l_bsh, acc_bshr = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=2,
          grid=(b, num_splits, blocks_per_split),
          in_specs=[q_spec(r), q_spec(p), any_spec, any_spec],
          out_specs=[part_spec(_LANES), part_spec(_LANES), part_spec(r)],
          scratch_shapes=[
              pltpu.VMEM((2, block_tokens, r), latent_pages.dtype),
              pltpu.VMEM((2, block_tokens, p), rope_pages.dtype),
              pltpu.SemaphoreType.DMA((2, 2)),
              pltpu.VMEM((h, _LANES), jnp.float32),
              pltpu.VMEM((h, _LANES), jnp.float32),
              pltpu.VMEM((h, r), jnp.float32),
          ]),
      out_shape=[jax.ShapeDtypeStruct((b, num_splits, h, _LANES), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h, _LANES), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h, r), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      interpret=interpret,
  )(page_table_flat, lengths, q_latent.astype(latent_pages.dtype), q_rope.astype(rope_pages.dtype),
    latent_pages, rope_pages)
  return combine_splits(m_bsh[..., 0], l_bsh[..., 0], acc_bshr, q_latent.dtype)
