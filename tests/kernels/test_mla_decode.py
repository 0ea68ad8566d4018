"""MLA paged decode: reference vs float64 numpy, kernels (interpret mode) vs reference, 1T lowering."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla.decode import mla_decode
from pallas_kernels.mla.decode_gpu import mla_decode_gpu
from pallas_kernels.mla.decode_reference import mla_decode_reference
from pallas_kernels.mla.decode_tpu import mla_decode_tpu

SCALE = 0.3
# bf16 inputs: the kernels round p to bf16 for the PV matmul and the output is rounded to bf16, so
# errors up to a few bf16 ulps of O(1) values are expected.
BF16_TOL = 3e-2


def make_case(seed, lengths, *, h=4, r=32, p=8, page_size=16, max_pages=6, dtype=jnp.float32):
  """Shuffled page tables, garbage (incl. out-of-range) ids past each length, NaN in stale slots."""
  rng = np.random.default_rng(seed)
  b = len(lengths)
  num_pages = b * max_pages + 3
  latent = rng.standard_normal((num_pages, page_size, r)).astype(np.float32)
  rope = rng.standard_normal((num_pages, page_size, p)).astype(np.float32)
  perm = rng.permutation(num_pages)
  page_table = np.empty((b, max_pages), np.int32)
  used = np.zeros(num_pages, bool)
  for i, n in enumerate(lengths):
    need = -(-n // page_size)
    page_table[i] = rng.choice([0, -5, num_pages, 10**6], size=max_pages)
    page_table[i, :need] = perm[i * max_pages:i * max_pages + need]
    used[page_table[i, :need]] = True
    if n % page_size:  # stale rows at the end of the last page
      latent[page_table[i, need - 1], n % page_size:] = np.nan
      rope[page_table[i, need - 1], n % page_size:] = np.nan
  latent[~used] = np.nan
  rope[~used] = np.nan
  q = rng.standard_normal((b, h, r)).astype(np.float32)
  qr = rng.standard_normal((b, h, p)).astype(np.float32)
  cast = lambda x: jnp.asarray(x, dtype)
  return (cast(q), cast(qr), cast(latent), cast(rope), jnp.asarray(page_table),
          jnp.asarray(np.array(lengths, np.int32)))


def decode_float64(q, qr, latent, rope, page_table, lengths):
  q, qr, latent, rope = (np.asarray(x, np.float64) for x in (q, qr, latent, rope))
  page_table, lengths = np.asarray(page_table), np.asarray(lengths)
  out = np.zeros(q.shape)
  for b, n in enumerate(lengths):
    if n == 0:
      continue
    pages = page_table[b, :-(-n // latent.shape[1])]
    lat = latent[pages].reshape(-1, latent.shape[2])[:n]
    rop = rope[pages].reshape(-1, rope.shape[2])[:n]
    s = (q[b] @ lat.T + qr[b] @ rop.T) * SCALE
    w = np.exp(s - s.max(-1, keepdims=True))
    out[b] = (w / w.sum(-1, keepdims=True)) @ lat
  return out


CASES = {
    "ragged": dict(lengths=[1, 16, 37, 0, 96]),
    "multi_block": dict(lengths=[300, 257, 5], max_pages=24),
    "one_token": dict(lengths=[1], max_pages=3),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_float64(case, dtype):
  args = make_case(0, dtype=dtype, **CASES[case])
  out = mla_decode_reference(*args, scale=SCALE)
  assert out.dtype == dtype
  tol = 1e-5 if dtype == jnp.float32 else BF16_TOL
  np.testing.assert_allclose(np.asarray(out, np.float64), decode_float64(*args), atol=tol, rtol=tol)


KERNELS = {
    "tpu": functools.partial(mla_decode_tpu, pages_per_block=2, interpret=True),
    "tpu_splits3": functools.partial(mla_decode_tpu, pages_per_block=3, num_splits=3, interpret=True),
    "gpu": functools.partial(mla_decode_gpu, block_n=8, interpret=True),
    "gpu_splits1": functools.partial(mla_decode_gpu, num_splits=1, interpret=True),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_kernel_matches_reference(kernel, case, dtype):
  args = make_case(1, dtype=dtype, **CASES[case])
  out = KERNELS[kernel](*args, scale=SCALE)
  ref = mla_decode_reference(*args, scale=SCALE)
  assert out.shape == ref.shape and out.dtype == dtype
  tol = 2e-5 if dtype == jnp.float32 else BF16_TOL
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=tol, rtol=tol)


def test_tpu_kernel_under_tpu_simulator():
  # The simulator raises on out-of-bounds reads and fills uninitialised VMEM with NaN.
  args = make_case(2, [21, 0, 3], max_pages=4)
  out = mla_decode_tpu(*args, scale=SCALE, pages_per_block=2, num_splits=2,
                       interpret=pltpu.InterpretParams())
  np.testing.assert_allclose(np.asarray(out), decode_float64(*args), atol=2e-5, rtol=2e-5)


def test_dispatch():
  args = make_case(3, [7, 40])
  ref = decode_float64(*args)
  for impl, interpret in (("auto", False), ("reference", False), ("tpu", True), ("gpu", True)):
    out = mla_decode(*args, scale=SCALE, impl=impl, interpret=interpret)
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-5, rtol=2e-5, err_msg=impl)


def test_bad_arguments():
  q, qr, latent, rope, page_table, lengths = make_case(4, [3, 4])
  with pytest.raises(ValueError, match="impl"):
    mla_decode(q, qr, latent, rope, page_table, lengths, scale=SCALE, impl="cuda")
  with pytest.raises(ValueError, match="q_rope"):
    mla_decode(q, qr[:1], latent, rope, page_table, lengths, scale=SCALE)
  with pytest.raises(ValueError, match="latent_pages"):
    mla_decode(q, qr, latent[..., :8], rope, page_table, lengths, scale=SCALE)
  with pytest.raises(ValueError, match="rope_pages"):
    mla_decode(q, qr, latent, rope[:, :4], page_table, lengths, scale=SCALE)
  with pytest.raises(ValueError, match="page_table"):
    mla_decode(q, qr, latent, rope, page_table.astype(jnp.float32), lengths, scale=SCALE)
  with pytest.raises(ValueError, match="lengths"):
    mla_decode(q, qr, latent, rope, page_table, lengths[:1], scale=SCALE)


def test_reference_long_context_is_memory_bounded():
  n, page_size = 131072, 256
  rng = np.random.default_rng(5)
  num_pages = n // page_size
  latent = rng.standard_normal((num_pages, page_size, 32)).astype(np.float32)
  rope = rng.standard_normal((num_pages, page_size, 8)).astype(np.float32)
  page_table = rng.permutation(num_pages).astype(np.int32)[None]
  q = rng.standard_normal((1, 4, 32)).astype(np.float32)
  qr = rng.standard_normal((1, 4, 8)).astype(np.float32)
  lengths = np.array([n - 100], np.int32)
  out = jax.jit(functools.partial(mla_decode_reference, scale=SCALE))(q, qr, latent, rope, page_table, lengths)
  np.testing.assert_allclose(np.asarray(out), decode_float64(q, qr, latent, rope, page_table, lengths),
                             atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("batch", [1, 8])
def test_lowers_at_1t_shapes(batch, platform):
  # Ling 1T: 64 heads, kv_lora_rank 512, rope 64; a 1M-token context in 256-token pages.
  h, r, p, page_size, max_pages = 64, 512, 64, 256, 4096
  sds = jax.ShapeDtypeStruct
  args = (sds((batch, h, r), jnp.bfloat16), sds((batch, h, p), jnp.bfloat16),
          sds((batch * max_pages, page_size, r), jnp.bfloat16), sds((batch * max_pages, page_size, p), jnp.bfloat16),
          sds((batch, max_pages), jnp.int32), sds((batch,), jnp.int32))
  kernel = mla_decode_tpu if platform == "tpu" else mla_decode_gpu
  text = jax.jit(functools.partial(kernel, scale=0.1)).trace(*args).lower(lowering_platforms=(platform,)).as_text()
  assert ("tpu_custom_call" if platform == "tpu" else "triton") in text
