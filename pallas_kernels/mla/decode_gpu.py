"""MLA decode over a paged latent cache: Triton-style GPU flash-decoding kernel.

Grid (head blocks, B, splits). A program owns `block_h` heads of one sequence and a contiguous
slice of its context; it walks that slice in blocks of `block_n` tokens that lie inside one page,
looking the page id up in the page table inside the kernel, so pages are read in place and a
sequence is never copied out contiguously. Every head in the block shares the latent tile, so one
tile feeds two tensor-core matmuls: q[Hb, R]·latentᵀ and p[Hb, n]·latent.

Only full blocks before the length are walked unmasked; the one partial block (if any) is masked
and its stale rows zeroed. Splits leave (max, sum, acc) partials merged by `combine_splits`.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.mla.decode_reference import check_decode_args, combine_splits

_TARGET_PROGRAMS = 264  # two waves over an H100/H200's 132 SMs


def _triton_dot_dim(x: int) -> bool:
  return x >= 16 and x & (x - 1) == 0


def gpu_shapes_supported(head_dim_latent: int, head_dim_rope: int, page_size: int) -> bool:
  """Triton's dot needs power-of-two dims of at least 16; other shapes must use the reference."""
  return _triton_dot_dim(head_dim_latent) and _triton_dot_dim(head_dim_rope) and page_size % 16 == 0


def _decode_kernel(page_table_ref, lengths_ref, q_ref, qr_ref, latent_ref, rope_ref,
                   m_ref, l_ref, acc_ref, *, scale, page_size, block_n, tokens_per_split):
  b, split = pl.program_id(1), pl.program_id(2)
  length = lengths_ref[b]
  start = split * tokens_per_split
  end = jnp.minimum(start + tokens_per_split, length)
  q_hr, qr_hp = q_ref[...], qr_ref[...]
  block_h, r = q_hr.shape

  def step(t0, carry, masked: bool):
    m_h, l_h, acc_hr = carry
    t0 = pl.multiple_of(t0, block_n)
    page_id = page_table_ref[b, t0 // page_size]
    rows = pl.ds(pl.multiple_of(t0 % page_size, block_n), block_n)
    latent_nr = latent_ref[page_id, rows, :]
    s_hn = (plgpu.dot(q_hr, latent_nr, trans_b=True)
            + plgpu.dot(qr_hp, rope_ref[page_id, rows, :], trans_b=True))
    s_hn *= scale
    if masked:
      valid_n = t0 + jnp.arange(block_n) < end
      s_hn = jnp.where(valid_n[None, :], s_hn, -jnp.inf)
      # Stale cache rows past the length may hold inf/NaN; 0·NaN would poison acc.
      latent_nr = jnp.where(valid_n[:, None], latent_nr, jnp.zeros_like(latent_nr))
    # Every block holds a valid token, so m_new is finite: no inf - inf below.
    m_new = jnp.maximum(m_h, jnp.max(s_hn, axis=1))
    p_hn = jnp.exp(s_hn - m_new[:, None])
    alpha = jnp.exp(m_h - m_new)
    acc_hr = alpha[:, None] * acc_hr + plgpu.dot(p_hn.astype(latent_nr.dtype), latent_nr)
    return m_new, alpha * l_h + jnp.sum(p_hn, axis=1), acc_hr

  carry = (jnp.full((block_h,), -jnp.inf, jnp.float32), jnp.zeros((block_h,), jnp.float32),
           jnp.zeros((block_h, r), jnp.float32))
  num_full = jnp.maximum(end - start, 0) // block_n
  carry = lax.fori_loop(0, num_full, lambda j, c: step(start + j * block_n, c, False), carry)
  tail = start + num_full * block_n
  m_h, l_h, acc_hr = lax.cond(tail < end, lambda c: step(tail, c, True), lambda c: c, carry)
  m_ref[...] = m_h
  l_ref[...] = l_h
  acc_ref[...] = acc_hr


def mla_decode_gpu(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths, *, scale,
                   num_splits=None, block_h=32, block_n=None, num_warps=4, num_stages=2,
                   interpret=False):
  """Paged MLA decode on GPU; same contract as `mla_decode_reference`.

  Args (beyond the reference's):
    num_splits: context splits per sequence (default: enough programs for two waves of SMs).
    block_h: heads per program, a power of two >= 16; H is padded to a multiple. 32 heads with
      64-token blocks and 4 warps was fastest of 16/32/64 x 32/64 x 4/8 on an H200 (1T shapes).
    block_n: tokens per inner step, dividing page_size (default min(page_size, 64)).
    num_warps, num_stages: Triton launch parameters.
    interpret: run on CPU through the Pallas interpreter.

  Returns:
    o_latent [B, H, R] in q_latent's dtype.
  """
  check_decode_args(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths)
  b, h, r = q_latent.shape
  p = q_rope.shape[2]
  num_pages, page_size, _ = latent_pages.shape
  max_pages = page_table.shape[1]
  block_n = block_n or min(page_size, 64)
  block_h = min(block_h, max(16, pl.next_power_of_2(h)))
  if page_size % block_n:
    raise ValueError(f"block_n={block_n} must divide page_size={page_size}")
  h_pad = -(-h // block_h) * block_h
  num_hb = h_pad // block_h
  if num_splits is None:
    num_splits = max(1, min(max_pages, -(-_TARGET_PROGRAMS // (b * num_hb))))
  # A split covers whole token blocks so every block lies inside one page.
  blocks_per_split = -(-max_pages * page_size // block_n // num_splits)
  tokens_per_split = blocks_per_split * block_n
  page_table = jnp.clip(page_table.astype(jnp.int32), 0, num_pages - 1)
  lengths = jnp.clip(lengths.astype(jnp.int32), 0, max_pages * page_size)
  pad_h = ((0, 0), (0, h_pad - h), (0, 0))
  q_latent_p = jnp.pad(q_latent.astype(latent_pages.dtype), pad_h)
  q_rope_p = jnp.pad(q_rope.astype(rope_pages.dtype), pad_h)

  kernel = functools.partial(_decode_kernel, scale=scale, page_size=page_size, block_n=block_n,
                             tokens_per_split=tokens_per_split)
  whole = pl.no_block_spec
  q_spec = lambda d: pl.BlockSpec((None, block_h, d), lambda hb, bi, si: (bi, hb, 0))
  part_spec = lambda *d: pl.BlockSpec((None, None, block_h) + d, lambda hb, bi, si: (bi, si, hb) + (0,) * len(d))
  m_bsh, l_bsh, acc_bshr = pl.pallas_call(
      kernel,
      grid=(num_hb, b, num_splits),
      in_specs=[whole, whole, q_spec(r), q_spec(p), whole, whole],
      out_specs=[part_spec(), part_spec(), part_spec(r)],
      out_shape=[jax.ShapeDtypeStruct((b, num_splits, h_pad), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h_pad), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h_pad, r), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(page_table, lengths, q_latent_p, q_rope_p, latent_pages, rope_pages)
  return combine_splits(m_bsh[:, :, :h], l_bsh[:, :, :h], acc_bshr[:, :, :h], q_latent.dtype)
