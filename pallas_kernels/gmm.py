"""Grouped (per-expert) matmul for MoE: rows of lhs sorted by expert, one weight matrix per expert.

TPU runs jax's bundled megablox kernels (gmm forward and dlhs, tgmm for drhs) with tiles picked
from the shapes. GPU runs jax's bundled Mosaic GPU (Hopper wgmma) ragged_dot / transposed_ragged_dot
kernels: XLA's GPU ragged_dot expands lhs to a dense [M, G·K] operand (128 GiB at 256 experts,
measured on an H200), so it is only the GPU fallback for 32-bit or odd shapes. CPU runs
lax.ragged_dot. Every impl goes through one custom_vjp so the forward and both backward products
dispatch the same way.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental.pallas.ops.gpu.ragged_dot_mgpu import ragged_dot as mgpu_ragged_dot
from jax.experimental.pallas.ops.gpu.transposed_ragged_dot_mgpu import (
    transposed_ragged_dot as mgpu_transposed_ragged_dot)
from jax.experimental.pallas.ops.tpu.megablox.gmm import gmm as megablox_gmm
from jax.experimental.pallas.ops.tpu.megablox.gmm import tgmm as megablox_tgmm

_IMPLS = ("auto", "tpu", "gpu", "reference")
# Gradient wrt rhs: contract the ragged row dim of lhs [M, K] with dout [M, N] -> [G, K, N].
_RAGGED_CONTRACT = lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[])


def _check_args(lhs, rhs, group_sizes) -> None:
  if lhs.ndim != 2:
    raise ValueError(f"lhs must be [M, K], got shape {lhs.shape}")
  if rhs.ndim != 3 or rhs.shape[1] != lhs.shape[1]:
    raise ValueError(f"rhs must be [G, K={lhs.shape[1]}, N], got shape {rhs.shape}")
  if group_sizes.shape != (rhs.shape[0],):
    raise ValueError(f"group_sizes must be [G={rhs.shape[0]}], got shape {group_sizes.shape}")
  if group_sizes.dtype != jnp.int32:
    raise ValueError(f"group_sizes must be int32, got dtype {group_sizes.dtype}")


def _mask_rows(x_mn, group_sizes):
  """Zeroes rows past sum(group_sizes): the TPU and GPU kernels leave them unwritten."""
  rows_m = jnp.arange(x_mn.shape[0], dtype=jnp.int32)
  return jnp.where((rows_m < jnp.sum(group_sizes))[:, None], x_mn, 0)


def gmm_reference(lhs, rhs, group_sizes):
  """out[i] = lhs[i] @ rhs[g(i)] for row i in group g; rows past sum(group_sizes) are zero.

  lhs [M, K], rhs [G, K, N], group_sizes [G] int32 -> [M, N] in lhs.dtype (fp32 accumulation).
  """
  _check_args(lhs, rhs, group_sizes)
  out = lax.ragged_dot(lhs, rhs, group_sizes, precision=lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
  return out.astype(lhs.dtype)


def _tile(dim: int) -> int:
  """Largest of 512/256/128 dividing `dim`, else the full dim (always a legal TPU block)."""
  for t in (512, 256, 128):
    if dim % t == 0:
      return t
  return dim


def _tpu_tiling(m: int, k: int, n: int) -> tuple[int, int, int]:
  tm = 512 if m >= 512 else -(-m // 16) * 16
  return tm, _tile(k), _tile(n)


def _pad_rows(x, tm: int):
  pad = -x.shape[0] % tm
  return jnp.pad(x, ((0, pad), (0, 0))) if pad else x


def _tpu_gmm(lhs, rhs, group_sizes, transpose_rhs, interpret):
  m, k = lhs.shape
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  tiling = _tpu_tiling(m, k, n)
  out = megablox_gmm(_pad_rows(lhs, tiling[0]), rhs, group_sizes, jnp.float32, tiling,
                     transpose_rhs=transpose_rhs, interpret=interpret)
  return _mask_rows(out[:m], group_sizes)


def _tpu_tgmm(lhs, dout, group_sizes, interpret):
  m, k = lhs.shape
  tiling = _tpu_tiling(m, k, dout.shape[1])
  lhs_t = _pad_rows(lhs, tiling[0]).swapaxes(0, 1)
  return megablox_tgmm(lhs_t, _pad_rows(dout, tiling[0]), group_sizes, jnp.float32, tiling,
                       interpret=interpret)


def _mgpu_supported(lhs, rhs) -> bool:
  """wgmma needs 16-bit operands; the tiles below need K and N multiples of 128."""
  k, n = rhs.shape[1:]
  return lhs.dtype == rhs.dtype and lhs.dtype in (jnp.bfloat16, jnp.float16) and k % 128 == 0 and n % 128 == 0


def _mgpu_tiles(n: int) -> dict:
  # Group output tiles in bands of up to 8 along N for L2 reuse; the band must divide N's tiles.
  grid_block_n = next(g for g in (8, 4, 2, 1) if (n // 128) % g == 0)
  return dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=grid_block_n)


def _gpu_gmm(lhs, rhs, group_sizes, transpose_rhs):
  # Padding rows to the 128-row tile keeps every TMA read in bounds.
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  out = mgpu_ragged_dot(_pad_rows(lhs, 128), rhs, group_sizes=group_sizes, transpose_rhs=transpose_rhs,
                        **_mgpu_tiles(n))
  return _mask_rows(out[:lhs.shape[0]], group_sizes)


def _gpu_tgmm(lhs, dout, group_sizes):
  return mgpu_transposed_ragged_dot(_pad_rows(lhs, 128), _pad_rows(dout, 128), group_sizes=group_sizes,
                                    **_mgpu_tiles(dout.shape[1]))


def _forward(lhs, rhs, group_sizes, impl, interpret):
  if impl == "tpu":
    return _tpu_gmm(lhs, rhs, group_sizes, False, interpret)
  if impl == "gpu" and _mgpu_supported(lhs, rhs):
    return _gpu_gmm(lhs, rhs, group_sizes, False)
  precision = lax.Precision.HIGHEST if impl == "reference" else None
  return lax.ragged_dot(lhs, rhs, group_sizes, precision=precision, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, group_sizes, impl, interpret):
  return _forward(lhs, rhs, group_sizes, impl, interpret).astype(lhs.dtype)


def _gmm_fwd(lhs, rhs, group_sizes, impl, interpret):
  return _gmm(lhs, rhs, group_sizes, impl, interpret), (lhs, rhs, group_sizes)


def _gmm_bwd(impl, interpret, residuals, dout):
  lhs, rhs, group_sizes = residuals
  if impl == "tpu":
    dlhs = _tpu_gmm(dout, rhs, group_sizes, True, interpret)
    drhs = _tpu_tgmm(lhs, dout, group_sizes, interpret)
  elif impl == "gpu" and _mgpu_supported(lhs, rhs):
    dlhs = _gpu_gmm(dout, rhs, group_sizes, True)
    drhs = _gpu_tgmm(lhs, dout, group_sizes)
  else:
    precision = lax.Precision.HIGHEST if impl == "reference" else None
    dlhs = lax.ragged_dot(dout, rhs.swapaxes(1, 2), group_sizes, precision=precision,
                          preferred_element_type=jnp.float32)
    drhs = lax.ragged_dot_general(lhs, dout, group_sizes, _RAGGED_CONTRACT, precision=precision,
                                  preferred_element_type=jnp.float32)
  return dlhs.astype(lhs.dtype), drhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def _resolve_impl(impl: str) -> str:
  """Maps "auto" to the backend's impl; raises ValueError for an unknown impl."""
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
  if impl != "auto":
    return impl
  return {"tpu": "tpu", "gpu": "gpu"}.get(jax.default_backend(), "reference")


def gmm(lhs, rhs, group_sizes, *, impl: str = "auto", interpret=False):
  """Grouped matmul, differentiable in lhs and rhs.

  Args:
    lhs: [M, K] rows sorted by group.
    rhs: [G, K, N] one matrix per group.
    group_sizes: [G] int32 rows per group, sum <= M; rows past the sum give zeros.
    impl: "auto" (megablox on TPU, Mosaic GPU kernels on GPU, ragged_dot on CPU), "tpu", "gpu"
      or "reference".
    interpret: run the TPU kernels in interpret mode (True or a pltpu.InterpretParams); the GPU
      kernels run on CPU under jax's Mosaic GPU simulator context instead.

  Returns:
    [M, N] in lhs.dtype, accumulated in fp32.
  """
  _check_args(lhs, rhs, group_sizes)
  return _gmm(lhs, rhs, group_sizes, _resolve_impl(impl), interpret)
