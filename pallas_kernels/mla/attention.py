"""Public MLA attention entry point: dispatches to the TPU / GPU flash kernels or the jnp reference."""
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.mla.attention_gpu import mla_flash_bwd_gpu, mla_flash_fwd_gpu
from pallas_kernels.mla.attention_reference import (check_qkv, mla_attention_reference, resolve_q_offset,
                                                    split_segment_ids)
from pallas_kernels.mla.attention_tpu import mla_flash_bwd_tpu, mla_flash_fwd_tpu

_KERNELS = {"tpu": (mla_flash_fwd_tpu, mla_flash_bwd_tpu), "gpu": (mla_flash_fwd_gpu, mla_flash_bwd_gpu)}
_IMPLS = ("auto", "tpu", "gpu", "reference")


# q_offset is an int32 scalar primal rather than a nondiff argument because it may be traced (e.g.
# `lax.axis_index` under shard_map); like the segment ids it is an integer input with no cotangent.
@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, segs, q_offset, scale, causal, impl, blocks, interpret):
  return _flash_fwd(q, k, v, segs, q_offset, scale, causal, impl, blocks, interpret)[0]


def _flash_fwd(q, k, v, segs, q_offset, scale, causal, impl, blocks, interpret):
  o, lse = _KERNELS[impl][0](q, k, v, segs, scale=scale, causal=causal, q_offset=q_offset,
                             interpret=interpret, **blocks)
  return o, (q, k, v, segs, q_offset, o, lse)


def _flash_bwd(scale, causal, impl, blocks, interpret, residuals, do):
  q, k, v, segs, q_offset, o, lse = residuals
  delta_bht = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  dq, dk, dv = _KERNELS[impl][1](q, k, v, segs, lse, delta_bht, do, scale=scale, causal=causal,
                                 q_offset=q_offset, interpret=interpret, **blocks)
  return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _resolve(impl, interpret):
  if impl not in _IMPLS:
    raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
  if impl == "auto":
    backend = jax.default_backend()
    if backend == "tpu":
      impl = "tpu"
    elif backend in ("gpu", "cuda", "rocm"):
      impl = "gpu"
    else:
      # Interpret mode only makes sense for a kernel: on CPU it selects the TPU kernel.
      impl = "tpu" if interpret is not False else "reference"
  if impl == "gpu" and isinstance(interpret, pltpu.InterpretParams):
    raise ValueError("pltpu.InterpretParams applies to impl='tpu' only; use interpret=True for 'gpu'")
  return impl


def mla_attention(q, k, v, *, scale: float, segment_ids=None, causal: bool = True, q_offset=None,
                  impl: str = "auto", interpret=False, block_q: int | None = None, block_k: int | None = None):
  """Flash attention for MLA prefill and training (differentiable).

  Args:
    q: [B, Tq, H, Dqk]; k: [B, Tk, H, Dqk]; v: [B, Tk, H, Dv]; Tq <= Tk, Dqk != Dv allowed.
    scale: multiplies q·k before the softmax.
    segment_ids: None, [B, T] int (Tq == Tk), or (q_segment_ids [B, Tq], kv_segment_ids [B, Tk]).
    causal: query i sees keys at positions <= q_offset + i.
    q_offset: key position of query 0, in [0, Tk - Tq]; None means Tk - Tq, the queries being the last
      Tq keys. A Python int (checked, ValueError outside the range) or an int32 scalar that may be
      traced, e.g. `lax.axis_index(axis) * chunk` for a context-parallel shard inside `shard_map`
      (unchecked); the kernels skip the key blocks it hides either way. Only the causal mask uses it.
    impl: "auto" (TPU kernel on TPU, GPU kernel on GPU, reference elsewhere), "tpu", "gpu" or
      "reference".
    interpret: run the kernel in Pallas interpret mode (True, or a `pltpu.InterpretParams` for "tpu").
    block_q, block_k: kernel tile sizes for forward and backward; None keeps each kernel's default.
  Returns:
    o: [B, Tq, H, Dv] in q's dtype; rows with no visible key are zeros.
  """
  impl = _resolve(impl, interpret)
  check_qkv(q, k, v)
  if impl == "reference":
    return mla_attention_reference(q, k, v, scale=scale, segment_ids=segment_ids, causal=causal,
                                   q_offset=q_offset)
  segs = split_segment_ids(segment_ids, q.shape[1], k.shape[1], q.shape[0])
  q_offset = jnp.asarray(resolve_q_offset(q_offset, q.shape[1], k.shape[1]), jnp.int32)
  blocks = {name: size for name, size in (("block_q", block_q), ("block_k", block_k)) if size is not None}
  return _flash(q, k, v, segs, q_offset, float(scale), bool(causal), impl, blocks, interpret)
