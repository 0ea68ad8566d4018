"""Exact jnp MLA decode over a paged latent cache: the twin every decode kernel is tested against.

MLA caches one latent vector (kv_lora_rank R) plus one shared rope key (P) per token, and every
head attends to the same latent; the query is already absorbed into latent space (q·W_UK), and the
caller applies W_UV to the returned latent output.

The context is walked in blocks of pages with an online softmax, so memory stays O(B·block) even
for a million-token context, and the loop stops at the longest sequence, not at max_pages.
"""
import jax.numpy as jnp
from jax import lax

_HIGHEST = lax.Precision.HIGHEST
_BLOCK_TOKENS = 2048


def check_decode_args(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths) -> None:
  """Raises ValueError naming the argument unless the shapes and dtypes agree."""
  if q_latent.ndim != 3:
    raise ValueError(f"q_latent must be [B, H, R], got shape {q_latent.shape}")
  b, h, r = q_latent.shape
  if q_rope.ndim != 3 or q_rope.shape[:2] != (b, h):
    raise ValueError(f"q_rope must be [B={b}, H={h}, P], got shape {q_rope.shape}")
  p = q_rope.shape[2]
  if latent_pages.ndim != 3 or latent_pages.shape[2] != r:
    raise ValueError(f"latent_pages must be [num_pages, page_size, R={r}], got shape {latent_pages.shape}")
  if rope_pages.shape != latent_pages.shape[:2] + (p,):
    raise ValueError(f"rope_pages must be {latent_pages.shape[:2] + (p,)} [num_pages, page_size, P], "
                     f"got shape {rope_pages.shape}")
  if page_table.ndim != 2 or page_table.shape[0] != b:
    raise ValueError(f"page_table must be [B={b}, max_pages], got shape {page_table.shape}")
  if lengths.shape != (b,):
    raise ValueError(f"lengths must be [B={b}], got shape {lengths.shape}")
  for name, x in (("page_table", page_table), ("lengths", lengths)):
    if not jnp.issubdtype(x.dtype, jnp.integer):
      raise ValueError(f"{name} must be an integer array, got dtype {x.dtype}")
  for name, x in (("q_latent", q_latent), ("q_rope", q_rope), ("latent_pages", latent_pages),
                  ("rope_pages", rope_pages)):
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"{name} must be a floating array, got dtype {x.dtype}")


def combine_splits(m_bsh, l_bsh, acc_bshr, dtype):
  """Merges per-split softmax partials into the normalised output [B, H, R] in `dtype`.

  m_bsh: running max (-inf for a split that saw no token), l_bsh: sum of exp(s - m),
  acc_bshr: sum of exp(s - m)·latent, all fp32. A sequence with no token gets zeros.
  """
  m_bh = jnp.max(m_bsh, axis=1)
  m_bh = jnp.where(jnp.isfinite(m_bh), m_bh, 0.0)
  w_bsh = jnp.exp(m_bsh - m_bh[:, None])
  l_bh = jnp.sum(w_bsh * l_bsh, axis=1)
  acc_bhr = jnp.sum(w_bsh[..., None] * acc_bshr, axis=1)
  return (acc_bhr / jnp.where(l_bh > 0, l_bh, 1.0)[..., None]).astype(dtype)


def mla_decode_reference(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths, *, scale):
  """One decode step of MLA attention over a paged latent cache, in fp32.

  Args:
    q_latent: [B, H, R] query absorbed into latent space.
    q_rope: [B, H, P] rope part of the query.
    latent_pages: [num_pages, page_size, R] latent cache.
    rope_pages: [num_pages, page_size, P] rope key cache.
    page_table: [B, max_pages] int page ids; entries past a sequence's length are ignored.
    lengths: [B] int number of cached tokens per sequence (0 gives zeros).
    scale: softmax scale applied to the full (latent + rope) score.

  Returns:
    o_latent [B, H, R] in q_latent's dtype: softmax(scores)·latent per head.
  """
  check_decode_args(q_latent, q_rope, latent_pages, rope_pages, page_table, lengths)
  b, h, r = q_latent.shape
  page_size = latent_pages.shape[1]
  max_pages = page_table.shape[1]
  block_pages = max(1, min(max_pages, _BLOCK_TOKENS // page_size))
  num_blocks = -(-max_pages // block_pages)
  page_table = jnp.pad(page_table.astype(jnp.int32), ((0, 0), (0, num_blocks * block_pages - max_pages)))
  lengths = lengths.astype(jnp.int32)
  q_bhr = q_latent.astype(jnp.float32)
  qr_bhp = q_rope.astype(jnp.float32)
  block_tokens = block_pages * page_size

  def body(i, carry):
    m_bh, l_bh, acc_bhr = carry
    ids_bn = lax.dynamic_slice_in_dim(page_table, i * block_pages, block_pages, axis=1)
    # Ids past a sequence's length are garbage: clip keeps the gather in bounds, the mask drops them.
    lat_btr = jnp.take(latent_pages, ids_bn, axis=0, mode="clip").reshape(b, block_tokens, r)
    rope_btp = jnp.take(rope_pages, ids_bn, axis=0, mode="clip").reshape(b, block_tokens, -1)
    valid_bt = (i * block_tokens + jnp.arange(block_tokens))[None] < lengths[:, None]
    # Zero masked rows too: a stale cache slot may hold inf/NaN, and 0·NaN would leak into acc.
    lat_btr = jnp.where(valid_bt[..., None], lat_btr.astype(jnp.float32), 0.0)
    rope_btp = jnp.where(valid_bt[..., None], rope_btp.astype(jnp.float32), 0.0)
    s_bht = (jnp.einsum("bhr,btr->bht", q_bhr, lat_btr, precision=_HIGHEST)
             + jnp.einsum("bhp,btp->bht", qr_bhp, rope_btp, precision=_HIGHEST)) * scale
    s_bht = jnp.where(valid_bt[:, None], s_bht, -jnp.inf)
    m_new_bh = jnp.maximum(m_bh, jnp.max(s_bht, axis=-1))
    m_safe_bh = jnp.where(jnp.isfinite(m_new_bh), m_new_bh, 0.0)
    p_bht = jnp.exp(s_bht - m_safe_bh[..., None])
    alpha_bh = jnp.exp(m_bh - m_safe_bh)
    l_bh = alpha_bh * l_bh + jnp.sum(p_bht, axis=-1)
    acc_bhr = alpha_bh[..., None] * acc_bhr + jnp.einsum("bht,btr->bhr", p_bht, lat_btr, precision=_HIGHEST)
    return m_new_bh, l_bh, acc_bhr

  init = (jnp.full((b, h), -jnp.inf, jnp.float32), jnp.zeros((b, h), jnp.float32),
          jnp.zeros((b, h, r), jnp.float32))
  # The trip count follows the longest sequence: blocks past it are never gathered.
  active_blocks = jnp.minimum((jnp.max(lengths, initial=0) + block_tokens - 1) // block_tokens, num_blocks)
  m_bh, l_bh, acc_bhr = lax.fori_loop(0, active_blocks, body, init)
  return combine_splits(m_bh[:, None], l_bh[:, None], acc_bhr[:, None], q_latent.dtype)
